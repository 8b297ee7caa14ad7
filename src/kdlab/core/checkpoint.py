"""Atomic checkpoint writing and careful loading.

Loading never runs code from the file: ``.pt`` files are read with ``torch.load(weights_only=True)``
(tensors, containers, numbers, strings, bytes; a pickle naming any other Python object is refused
with one line, before anything in it runs), ``.safetensors`` files with ``safetensors`` (a JSON
header and raw tensor bytes; kdlab's metadata in the header). Exported programs of models given as
objects are checked before ``torch.export.load`` (:func:`kdlab.models.adapters.load_program`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from kdlab.core.safeload import (SAFETENSORS_FORMAT, SAFETENSORS_META, CheckpointError,
                                 is_safetensors, read_safetensors, safe_torch_load)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`kdlab.core.io.atomic_write`)."""
    from kdlab.core.io import atomic_write

    return atomic_write(path, lambda f: torch.save(obj, f))


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (named as) an ONNX model rather than a torch checkpoint."""
    return Path(path).suffix.lower() == ".onnx"


def save_safetensors(ck: dict, path: str | os.PathLike) -> Path:
    """Write the checkpoint dict ``ck`` (:func:`model_checkpoint`) as a safetensors file, atomically:
    its ``model`` tensors, and its identity (:data:`SAFETENSORS_META`) as JSON in the header."""
    from safetensors.torch import save as st_save

    from kdlab.core.io import atomic_write

    if ck.get("program") is not None:
        raise ValueError("this checkpoint holds a model given as an object (an exported program, no "
                         "model spec); safetensors keeps weights only: export it to ONNX (--format onnx) "
                         "or keep the .pt")
    state = ck.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint's 'model' entry is not a state dict of tensors; give a kdlab "
                         "model checkpoint (best.pt)")
    # clone: safetensors refuses tensors sharing memory (tied weights); each is stored on its own
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {"kdlab": SAFETENSORS_FORMAT}
    for key in SAFETENSORS_META:
        if key in ck:  # None too: ``normalize: None`` means "no normalisation" (kdlab.fit)
            try:
                meta[key] = json.dumps(ck[key])
            except TypeError:
                raise ValueError(f"checkpoint entry '{key}' cannot be written as JSON; keep the .pt") from None
    data = st_save(tensors, metadata=meta)
    return atomic_write(path, lambda f: f.write(data))


def _plain(obj, where: str):
    """``obj`` as tensors, containers, numbers, strings and bytes (numpy values converted);
    anything else raises CheckpointError naming where it sits."""
    import collections

    if obj is None or type(obj) in (bool, int, float, complex, str, bytes) or isinstance(
            obj, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, (dict, collections.OrderedDict)):
        return type(obj)((k, _plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
    except ImportError:  # pragma: no cover
        pass
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a "
                          f"weights-only file cannot hold; save its state dict instead")


def convert_trusted(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """Re-save a checkpoint **you trust** (it is unpickled with ``weights_only=False``, which runs
    any code in it) as a weights-only file kdlab loads: numpy values become Python numbers or
    tensors; any other object is refused. ``dst`` defaults to ``<src stem>.converted.pt``."""
    src = Path(src)
    dst = Path(dst) if dst else src.with_name(src.stem + ".converted.pt")
    obj = torch.load(src, map_location="cpu", weights_only=False)  # the caller trusts this file
    clean = _plain(obj, str(src))
    atomic_save(clean, dst)
    safe_torch_load(dst)
    return dst


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, fix: str = "") -> dict:
    """Load a checkpoint written by kdlab (``.pt``, or ``.safetensors`` with kdlab's metadata); a
    missing, corrupt, foreign or unsafe file raises CheckpointError with one line naming the file.
    Nothing in the file is run (see the module doc). ``fix``: what the user should do about a
    corrupt file (default: re-create it with the command that wrote it)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint file "
                              f"(e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train it first, or fix the path)")
    if is_onnx(path):
        raise CheckpointError(f"{path} is an ONNX model, not a kdlab checkpoint; give the .pt "
                              f"checkpoint it was exported from (`kdlab profile` reads ONNX files)")
    if is_safetensors(path):
        return read_safetensors(path)
    obj = safe_torch_load(path, map_location, fix=fix)
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
        # a copy, also on the CPU (where .cpu() is the same tensor): a kept checkpoint dict (last.pt's
        # copy of best.pt) must hold the weights of its epoch, not the ones training moves on to
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "dataset": dataset,
        **extra,
    }


def check_fits(ck: dict, info, who: str) -> None:
    """A model (its checkpoint dict, or any dict with ``num_classes`` / ``in_channels``) fits the data
    set ``info``: same class count and input channels, and the same class names when the checkpoint
    records them (``classes``), else one ValueError line naming the fix."""
    if ck.get("num_classes") is not None and int(ck["num_classes"]) != info.num_classes:
        raise ValueError(f"{who} predicts {ck['num_classes']} classes but data set '{info.name}' has "
                         f"{info.num_classes}; use the data set it was trained on (--dataset)")
    if ck.get("in_channels") is not None and int(ck["in_channels"]) != info.in_channels:
        raise ValueError(f"{who} takes {ck['in_channels']} input channels but data set '{info.name}' has "
                         f"{info.in_channels}; use the data set it was trained on (--dataset)")
    have, want = list(ck.get("classes") or []), [str(c) for c in (getattr(info, "classes", None) or [])]
    if have and want and [str(c) for c in have] != want:
        def show(names):
            return ", ".join(map(str, names[:4])) + (", ..." if len(names) > 4 else "")

        how = ("in another order" if sorted(map(str, have)) == sorted(want)
               else f"'{show(have)}' against '{show(want)}'")
        raise ValueError(f"{who} was trained on other class names than data set '{info.name}' has "
                         f"({how}): its outputs would be read as the wrong classes; use data whose "
                         f"class folders are named as in training")
