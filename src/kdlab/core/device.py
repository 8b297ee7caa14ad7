"""The one device resolver of kdlab (recipes, commands and library functions alike)."""

from __future__ import annotations

import torch


def resolve_device(spec="auto") -> torch.device:
    """``auto`` (or None) is ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:N]`` without one
    is an error naming the fix; anything else is ``torch.device(spec)``."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(spec, torch.device):
        spec = str(spec)
    if str(spec).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device is '{spec}' but no CUDA device is visible; use device: cpu or auto")
    return torch.device(spec)
