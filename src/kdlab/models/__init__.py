"""Model registry: ``create_model(name, num_classes, in_channels, **kw)`` and ``list_models()``.

Every model built here has ``stage_names`` (names in ``named_modules()`` of the submodules whose
outputs are the stage feature maps, shallow to deep), ``feature_dim`` (classifier input size) and
``classifier_name``; its ``forward`` returns logits only (features are read with
:class:`kdlab.models.taps.Taps`). Our own models also carry ``stage_channels``.

Families: CIFAR ResNet-18/34/50/101 with ``width``/``cbam`` (:mod:`.resnet`), the KD-benchmark
CIFAR ResNets and wide ResNets (:mod:`.cifar_resnet`), small CNNs (:mod:`.small`). Names
``timm:<name>`` and ``torchvision:<name>`` build models from those libraries when installed.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

from ._registry import MODELS, register_model
from . import cifar_resnet, detection, faces, resnet, small, tv_detection  # noqa: F401  (registers the models)

__all__ = ["MODELS", "create_model", "list_models", "register_model", "model_kwargs"]

_FIXED = ("num_classes", "in_channels")


def list_models() -> list[tuple[str, str]]:
    """``(name, description)`` for every registered model, sorted by name."""
    return [(e.name, e.description) for e in MODELS.entries()]


def _builder(name: str) -> Callable:
    if name not in MODELS:
        m = cifar_resnet.WRN_PATTERN.fullmatch(name)
        if m:
            return cifar_resnet.wrn_builder(int(m.group(1)), int(m.group(2)))
    return MODELS.get(name)  # KeyError with close names


def model_kwargs(name: str) -> dict:
    """The extra keyword arguments a registered model accepts, with their defaults."""
    sig = inspect.signature(_builder(name))
    return {k: p.default for k, p in sig.parameters.items() if k not in _FIXED}


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way linear head on ``in_channels`` inputs.

    Raises ``KeyError`` for an unknown name (listing close names) and ``ValueError`` for an unknown
    keyword argument, ``num_classes < 2`` or ``in_channels < 1``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    if name.startswith("timm:"):
        return _timm_model(name[5:], num_classes, in_channels, kwargs)
    if name.startswith("torchvision:"):
        return _torchvision_model(name[12:], num_classes, in_channels, kwargs)
    builder = _builder(name)
    accepted = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        ok = ", ".join(accepted) if accepted else "none"
        raise ValueError(
            f"model '{name}' does not accept {', '.join(map(repr, unknown))}; "
            f"its keyword arguments are: {ok}"
        )
    model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    for attr in ("stage_names", "feature_dim", "classifier_name"):
        if not hasattr(model, attr):  # guards models registered by third parties
            raise TypeError(f"model '{name}' lacks attribute '{attr}' required by kdlab.models")
    return model


# --------------------------------------------------------------------------- optional libraries
def _require(lib: str):
    try:
        return importlib.import_module(lib)
    except ImportError:
        raise ImportError(
            f"model names '{lib}:<name>' need the '{lib}' package: pip install kdlab[vision]"
        ) from None


def _timm_model(arch: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    timm = _require("timm")
    kwargs = {"pretrained": False, **kwargs}
    model = timm.create_model(arch, num_classes=num_classes, in_chans=in_channels, **kwargs)
    info = getattr(model, "feature_info", None) or []
    model.stage_names = tuple(d["module"] for d in info if isinstance(d, dict) and "module" in d)
    model.feature_dim = int(getattr(model, "num_features", 0))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cls = cfg.get("classifier")
    if isinstance(cls, (list, tuple)):
        cls = cls[0]
    model.classifier_name = cls or _last_linear(model)[0]
    return model


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear | None]:
    found = ("", None)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (n, m)
    return found


def _torchvision_model(arch: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    tvm = _require("torchvision").models
    if in_channels != 3:
        raise ValueError(f"torchvision:{arch} expects 3 input channels, got in_channels={in_channels}; "
                         "use a kdlab model (see `kdlab models`) for other inputs")
    kwargs = {"weights": None, **kwargs}
    model = tvm.get_model(arch, num_classes=num_classes, **kwargs)
    modules = dict(model.named_modules())
    if all(f"layer{i}" in modules for i in range(1, 5)):  # ResNet / ResNeXt / Wide ResNet
        model.stage_names = tuple(f"layer{i}" for i in range(1, 5))
    elif isinstance(modules.get("features"), nn.Sequential):  # VGG, MobileNet, EfficientNet, ...
        model.stage_names = tuple(f"features.{n}" for n, _ in model.features.named_children())
    else:
        model.stage_names = ()
    name, lin = _last_linear(model)
    model.classifier_name = name
    model.feature_dim = lin.in_features if lin is not None else 0
    return model
