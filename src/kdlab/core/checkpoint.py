"""Atomic checkpoint writing and careful loading."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`kdlab.core.io.atomic_write`)."""
    from kdlab.core.io import atomic_write

    return atomic_write(path, lambda f: torch.save(obj, f))


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (named as) an ONNX model rather than a torch checkpoint."""
    return Path(path).suffix.lower() == ".onnx"


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, fix: str = "") -> dict:
    """Load a checkpoint written by kdlab; a missing, corrupt or foreign file raises
    CheckpointError with one line naming the file. ``fix``: what the user should do about a corrupt
    file (default: re-create it with the command that wrote it)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint file "
                              f"(e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train it first, or fix the path)")
    if is_onnx(path):
        raise CheckpointError(f"{path} is an ONNX model, not a kdlab checkpoint; give the .pt "
                              f"checkpoint it was exported from (`kdlab profile` reads ONNX files)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torn zip, truncated pickle, wrong format
        fix = fix or "re-create it with the command that wrote it (or restore a copy)"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch file ({type(e).__name__}); {fix}"
        ) from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry; it was not written by kdlab")
    if not isinstance(obj["model"], dict):
        raise CheckpointError(f"checkpoint {path}: its 'model' entry is a {type(obj['model']).__name__}, not a "
                              f"state dict of weights; it was not written by kdlab (re-create it, or save "
                              f"model.state_dict())")
    return obj


def file_hash(path: str | os.PathLike, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def model_checkpoint(model, *, model_name: str, model_kwargs: dict, num_classes: int,
                     in_channels: int, dataset: str, **extra) -> dict:
    """The dict kdlab saves for a trained model (``best.pt``): enough to rebuild it by name."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "dataset": dataset,
        **extra,
    }


def check_fits(ck: dict, info, who: str) -> None:
    """A model (its checkpoint dict, or any dict with ``num_classes`` / ``in_channels``) fits the data
    set ``info``: same class count and input channels, else one ValueError line naming the fix."""
    if ck.get("num_classes") is not None and int(ck["num_classes"]) != info.num_classes:
        raise ValueError(f"{who} predicts {ck['num_classes']} classes but data set '{info.name}' has "
                         f"{info.num_classes}; use the data set it was trained on (--dataset)")
    if ck.get("in_channels") is not None and int(ck["in_channels"]) != info.in_channels:
        raise ValueError(f"{who} takes {ck['in_channels']} input channels but data set '{info.name}' has "
                         f"{info.in_channels}; use the data set it was trained on (--dataset)")


def load_model(path: str | os.PathLike, device="cpu"):
    """Rebuild a model saved with :func:`model_checkpoint`; returns ``(model in eval mode,
    checkpoint_dict)``. A model saved with a ``program`` (a user's module given as an object) is
    rebuilt from its ``torch.export`` program; any other from its spec (``model_name``, a
    registered name, ``timm:``/``torchvision:``/``hf:`` or ``module:function``) and kwargs."""
    from kdlab.models.adapters import build_model, load_program

    ck = load_checkpoint(path)
    for key in ("model_name", "num_classes", "in_channels"):
        if key not in ck:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'; it is not a kdlab model file")
    if str(ck.get("model_name") or "").startswith("lm:") or "tokenizer" in ck:
        raise CheckpointError(f"checkpoint {path} holds a language model ({ck.get('model_name')}); this "
                              f"command takes image classifiers: use `kdlab lm generate {path} --prompt TEXT`")
    if (ck.get("pruned") or {}).get("arch") or ck.get("quantized"):
        kind = "structurally pruned" if (ck.get("pruned") or {}).get("arch") else "quantized"
        raise CheckpointError(f"checkpoint {path} holds a {kind} {ck['model_name']}; read it with "
                              f"kdlab.compress.load_compressed (this command reads plain checkpoints)")
    if ck.get("program") is not None:
        return load_program(ck["program"]).to(device).eval(), ck
    if not ck["model_name"]:
        raise CheckpointError(f"checkpoint {path} records no model spec and no exported program; "
                              f"load its state dict into your own module (torch.load(path)['model'])")
    model = build_model(ck["model_name"], ck["num_classes"], ck["in_channels"], ck.get("model_kwargs", {}))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit model {ck['model_name']}: {first}") from None
    return model.to(device).eval(), ck
