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
        raise ValueError(f"device is '{spec}' but no CUDA device is visible; use --device cpu or auto (in a recipe, train.device: cpu)")
    return torch.device(spec)


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: x86 with AVX512-BF16 or AMX tiles (oneDNN's bf16
    kernels), ARM with its bf16 extension (oneDNN reports bf16 support there only when the
    instructions exist). On an x86 CPU with plain AVX-512 or AVX2, torch converts bf16 to fp32 and
    back around every operation: it works but is emulated, and usually slower than fp32."""
    import platform

    cpu = getattr(torch, "cpu", None)
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(c()) for c in checks if c is not None)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_BF16_NOTED: set = set()


def note_emulated_bf16(device: torch.device, log=None) -> bool:
    """Say once per process, in one line on stderr, when ``train.amp: bf16`` runs on a CPU without
    native bf16 (emulated: correct, not faster). Returns True when the line applies."""
    import sys

    if device.type != "cpu" or cpu_native_bf16():
        return False
    if "cpu" not in _BF16_NOTED:
        _BF16_NOTED.add("cpu")
        msg = ("kdlab: train.amp: bf16 on a CPU without native bf16 instructions (no AVX512-BF16 / AMX): "
               "it is emulated, so expect no speed-up (amp: none is usually faster here)")
        (log or (lambda m: print(m, file=sys.stderr)))(msg)
    return True
