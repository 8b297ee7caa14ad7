"""The model registry (kept apart from ``__init__`` so model modules can import it)."""

from __future__ import annotations

from typing import Callable

from kdlab.core.registry import Registry

MODELS = Registry("model", "kdlab models")


def register_model(name: str, description: str = "", **meta) -> Callable:
    """Decorator registering a model builder ``fn(num_classes, in_channels, **kw) -> nn.Module``.

    The builder's keyword parameters (besides ``num_classes`` and ``in_channels``) are the kwargs
    :func:`kdlab.models.create_model` accepts for that name; it must not take ``**kwargs``.
    """
    return MODELS.register(name, description=description, **meta)


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


def check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number (e.g. 0.5 or 2), got {width!r}")
    return float(width)
