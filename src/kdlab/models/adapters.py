"""Any model as a kdlab teacher or student.

A model *spec* names how to build one:

* a registered name (``resnet18``, ``cnn_tiny``; see ``kdlab models``),
* ``timm:<name>`` / ``torchvision:<name>`` (the ``vision`` extra; never downloads weights),
* ``hf:<local folder or config.json>``: a HuggingFace image classifier
  (``AutoModelForImageClassification``): weights when the folder has them, else built from the config,
* ``module:function``: a factory on the user's path, called with ``num_classes`` / ``in_channels``
  when it takes them, and the recipe's ``kwargs``.

``weights: path`` loads a local state dict or a full checkpoint (``{"model": state_dict}``) into it.
Outputs are adapted by a forward hook (the model is not edited, its layer names stay those of
``named_modules()``): a tensor is kept, a tuple/list gives its first item, a dict or a HuggingFace
``ModelOutput`` its ``logits``.

A model given as an *object* (``kdlab.fit(student=my_module)``) has no spec; its checkpoint then
stores a ``torch.export`` program of the trained model beside the state dict, so ``kdlab
evaluate/profile/export/robustness`` can rebuild it (:class:`ExportedModel`) without the user's code.
"""

from __future__ import annotations

import importlib
import inspect
import io
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


def as_logits(out: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, the first item of a tuple/list, or ``logits`` of a
    dict / ``ModelOutput``-like object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out:
            return out["logits"]
        raise ValueError(f"the model returned a mapping without 'logits' (keys: {list(out.keys())}); "
                         f"return the logits tensor or a dict with a 'logits' entry")
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return as_logits(out[0])
    raise ValueError(f"cannot find logits in a model output of type {type(out).__name__}; return a "
                     f"tensor, a tuple whose first item is the logits, or an object with .logits")


def _logits_hook(module, inputs, output):
    return output if isinstance(output, torch.Tensor) else as_logits(output)


def adapt_outputs(model: nn.Module) -> nn.Module:
    """Make ``model(x)`` return its logits tensor, by a forward hook (added once)."""
    if not getattr(model, "_kdlab_logits_hook", False):
        model.register_forward_hook(_logits_hook)
        model._kdlab_logits_hook = True
    return model


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a local state dict, or a checkpoint holding one under ``model`` / ``state_dict``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} not found; give a local state-dict or checkpoint file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"weights file {p} is not a torch file ({type(e).__name__}); give a state dict") from None
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"weights file {p} holds no state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights file {p} does not fit the model: {str(e).splitlines()[0]}") from None
    return model


def _factory(spec: str):
    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model factory '{spec}' not found ({e}); give module:function on the Python path") from None


def _call_factory(fn, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    params = inspect.signature(fn).parameters
    kw = dict(kwargs)
    for k, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kw.setdefault(k, v)
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {fn.__module__}:{fn.__name__} returned {type(model).__name__}, "
                         f"not an nn.Module")
    return model


def _hf_model(ref: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModelForImageClassification
    except ImportError:
        raise ImportError("model names 'hf:<path>' need HuggingFace transformers: pip install kdlab[hf]") from None
    p = Path(ref)
    if not p.exists():
        raise FileNotFoundError(f"hf:{ref}: no such local folder or config file (nothing is downloaded)")
    folder = p.parent if p.is_file() else p
    has_weights = any((folder / f).exists() for f in ("model.safetensors", "pytorch_model.bin"))
    cfg = AutoConfig.from_pretrained(str(folder), num_labels=num_classes, num_channels=in_channels, **kwargs)
    if has_weights:
        return AutoModelForImageClassification.from_pretrained(str(folder), config=cfg,
                                                               ignore_mismatched_sizes=True)
    return AutoModelForImageClassification.from_config(cfg)


def build_model(spec: str, num_classes: int, in_channels: int, kwargs: Optional[dict] = None,
                weights: Optional[str] = None) -> nn.Module:
    """The model named by ``spec`` (see the module doc), with ``weights`` loaded and its outputs
    adapted to logits."""
    from kdlab.models import create_model

    kwargs = dict(kwargs or {})
    if spec.startswith("hf:"):
        model = _hf_model(spec[3:], num_classes, in_channels, kwargs)
    elif ":" in spec and not spec.startswith(("timm:", "torchvision:")):
        model = _call_factory(_factory(spec), num_classes, in_channels, kwargs)
    else:
        model = create_model(spec, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if weights:
        load_weights(model, weights)
    return adapt_outputs(model)


class ExportedModel(nn.Module):
    """A model rebuilt from a ``torch.export`` program (inference only: ``train()`` only sets the
    flag; the program was exported in eval mode)."""

    def __init__(self, program_module: nn.Module):
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, x):
        return self.program(x)


def export_program(model: nn.Module, example: torch.Tensor) -> bytes:
    """A ``torch.export`` program of ``model`` in eval mode, with a dynamic batch size, as bytes."""
    was = model.training
    model.eval()
    try:
        batch = torch.export.Dim("batch", min=1)
        ep = torch.export.export(model, (example.detach().to(next(model.parameters()).device),),
                                 dynamic_shapes=({0: batch},))
    finally:
        model.train(was)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def load_program(data: bytes) -> nn.Module:
    """The model of :func:`export_program`'s bytes, as an :class:`ExportedModel`."""
    ep = torch.export.load(io.BytesIO(data))
    return ExportedModel(ep.module())
