"""Reading model files without running code from them (imports nothing else of kdlab).

``.pt`` files are read with ``torch.load(weights_only=True)``: tensors, containers, numbers, strings,
bytes; a pickle naming any other Python object is refused with one line before anything in it
runs. ``.safetensors`` files are a JSON header and raw tensor bytes; kdlab keeps a model's identity
in the header's metadata (:data:`SAFETENSORS_META`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (named as) a safetensors file."""
    return Path(path).suffix.lower() == ".safetensors"


#: The checkpoint keys kept in a safetensors file's header (JSON-encoded strings).
SAFETENSORS_META = ("model_name", "model_kwargs", "num_classes", "in_channels", "dataset",
                    "input_shape", "input", "classes", "normalize", "pruned", "quantized", "epoch",
                    "val", "seed", "method")
#: Value of the header key ``kdlab`` in kdlab's safetensors files.
SAFETENSORS_FORMAT = "model/1"


def _refused(path, err: str) -> str:
    """The one-line refusal of a pickle that ``torch.load(weights_only=True)`` would not load."""
    found = re.search(r"GLOBAL ([\w.]+)", err)
    what = f"the Python object {found.group(1)}" if found else "Python objects"
    return (f"checkpoint {path} holds {what}, which loading would run as code; kdlab loads only "
            f"tensors and plain values and refused it (nothing in it ran). If the file is yours and "
            f"you trust it, convert it once: python -c \"from kdlab.core.checkpoint import "
            f"convert_trusted; convert_trusted('{path}')\" (or export it with kdlab export --format "
            f"safetensors)")


def safe_torch_load(path, map_location="cpu", *, what: str = "checkpoint", fix: str = ""):
    """``torch.load(path, weights_only=True)``; a file holding other Python objects, or a corrupt
    one, raises :class:`CheckpointError` with one line (nothing in the file is run)."""
    import warnings

    try:
        with warnings.catch_warnings():  # a legacy (non-zip) pickle makes torch warn before it refuses:
            warnings.simplefilter("ignore")  # the refusal stays one line
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if re.search(r"GLOBAL [\w.]+", str(e)):  # else: garbage the unpickler could not parse
            raise CheckpointError(_refused(path, str(e)).replace("checkpoint", what, 1)) from None
        fix = fix or "re-create it with the command that wrote it (or restore a copy)"
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file (UnpicklingError); {fix}") from None
    except Exception as e:  # torn zip, truncated pickle, wrong format
        fix = fix or "re-create it with the command that wrote it (or restore a copy)"
        raise CheckpointError(
            f"{what} {path} is corrupt or not a torch file ({type(e).__name__}); {fix}"
        ) from None


def read_safetensors(path: str | os.PathLike, *, need_meta: bool = True) -> dict:
    """A kdlab model file in safetensors format as the checkpoint dict :func:`model_checkpoint`
    builds (``model``: the tensors; the header's kdlab metadata decoded). ``need_meta=False`` also
    accepts a plain safetensors file (only ``model``)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # bad header, truncated data
        raise CheckpointError(f"{path} is not a valid safetensors file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); re-export it "
                              f"(kdlab export CHECKPOINT --format safetensors)") from None
    ck: dict = {"model": state, "format": "safetensors"}
    if meta.get("kdlab") != SAFETENSORS_FORMAT:
        if need_meta:
            raise CheckpointError(f"{path} is a safetensors file without kdlab's metadata (model name, "
                                  f"classes, data set); give it as student.weights / teacher.weights "
                                  f"with the model named in the recipe, or write it with kdlab export "
                                  f"CHECKPOINT --format safetensors")
        return ck
    for key in SAFETENSORS_META:
        if key in meta:
            try:
                ck[key] = json.loads(meta[key])
            except ValueError:
                raise CheckpointError(f"{path}: header entry '{key}' is not JSON; re-export the file "
                                      f"(kdlab export CHECKPOINT --format safetensors)") from None
    kinds = {"model_name": str, "num_classes": int, "in_channels": int, "dataset": str, "model_kwargs": dict}
    for key, kind in kinds.items():
        if key in ck and not isinstance(ck[key], kind):
            raise CheckpointError(f"{path}: header entry '{key}' should be {kind.__name__}, got "
                                  f"{type(ck[key]).__name__}; re-export the file")
    return ck


__all__ = ["CheckpointError", "is_safetensors", "safe_torch_load", "read_safetensors",
           "SAFETENSORS_META", "SAFETENSORS_FORMAT"]
