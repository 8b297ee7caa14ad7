"""The model registry and the building helpers model modules share (kept apart from
``__init__`` so model modules can import them)."""

from __future__ import annotations

from typing import Callable

from torch import nn

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


def add_classifier_head(model: nn.Module, cin: int, num_classes: int, stage_names, stage_channels,
                        dropout: nn.Module | None = None) -> None:
    """Finish a CNN classifier's ``__init__`` after its stages: a global average pool
    (``avgpool``), ``dropout`` when given, a linear classifier ``fc`` on ``cin`` features, the
    stage metadata (``stage_names``, ``stage_channels``, ``feature_dim = cin``) and He (fan-out)
    initialisation of every conv."""
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    if dropout is not None:
        model.dropout = dropout
    model.fc = nn.Linear(cin, num_classes)
    model.stage_names = tuple(stage_names)
    model.stage_channels = tuple(stage_channels)
    model.feature_dim = cin
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
