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
import os
import re
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
    """Load a local state dict (``.pt``, read with ``weights_only=True``, or ``.safetensors``), or a
    checkpoint holding one under ``model`` / ``state_dict``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} not found; give a local state-dict or checkpoint file")
    from kdlab.core.safeload import is_safetensors, read_safetensors, safe_torch_load

    if is_safetensors(p):
        obj = read_safetensors(p, need_meta=False)
    else:  # weights_only: a pickle that would run code is refused, nothing in it runs
        obj = safe_torch_load(p, what="weights file", fix="give a state dict (.pt) or a .safetensors file")
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


#: Graph call targets an exported program may hold: ATen / prims operators and a few pure
#: arithmetic helpers (what ``torch.export`` writes for a module's forward pass).
_SAFE_TARGET = re.compile(
    r"^(torch\.ops\.(aten|prims)\.\w+\.\w+"
    r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pow|eq|ne|lt|le|gt|ge|and_|or_|not_)"
    r"|math\.(ceil|floor|trunc|sqrt)"
    r"|torch\.(sym_int|sym_float|sym_max|sym_min|sym_not|sym_ite|sym_sqrt|_sym_sqrt))$")
#: Tokens of a symbolic shape expression (``Symbol('s31', positive=True, integer=True)``,
#: ``2*s0 + 1``, ``FloorDiv(s0, 2)``): torch.export parses them with ``sympy.sympify`` (``eval``).
_EXPR_TOKEN = re.compile(r"\s+|\d+(\.\d+)?|'[a-z]\d+'|\*\*|[-+*/(),=<>%]|[A-Za-z_]\w*")
_EXPR_NAMES = {"Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "positive", "integer",
               "nonnegative", "real", "finite", "True", "False", "FloorDiv", "ModularIndexing", "Mod",
               "PythonMod", "CleanDiv", "CeilDiv", "CeilToInt", "FloorToInt", "Where", "LShift",
               "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat",
               "TruncToInt", "ToFloat", "Identity", "floor", "ceiling"}


def _expr_ok(expr: str) -> bool:
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if not m:
            return False
        tok = m.group(0)
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _EXPR_NAMES \
                and not re.fullmatch(r"[a-z]\d+", tok):
            return False
        pos = m.end()
    return True


def check_program(data: bytes) -> None:
    """Refuse (ValueError, one line) a ``torch.export`` archive that could run code when loaded or
    called: ``torch.export.load`` unpickles some entries with ``weights_only=False``, evaluates
    symbolic shapes with ``sympy.sympify`` and resolves call targets by name under ``torch``. The
    archive must hold exactly what :func:`export_program` writes: one model, raw tensor payloads
    (no pickled weights or constants, no custom objects), a weights-only sample-input file, call
    targets among ATen/prims operators and pure arithmetic, shape expressions in a small arithmetic
    grammar. This is kdlab's check of the loader's code paths (PyTorch itself documents
    ``torch.export.load`` as unsafe for untrusted files), not a guarantee from PyTorch."""
    import json
    import zipfile

    def bad(why: str):
        return ValueError(f"the exported program {why}; kdlab refused to load it (nothing in it ran)")

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, ValueError) as e:
        raise bad(f"is not a torch.export archive ({type(e).__name__})") from None
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise bad("has an unexpected layout")
    root = roots.pop() + "/"
    allowed = re.compile(
        r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
        r"|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+"
        r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
        r"|data/sample_inputs/model\.pt)$")
    for n in names:
        if not allowed.match(n[len(root):]):
            raise bad(f"holds an entry kdlab does not write ({n[len(root):]})")
    for cfg in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        if root + cfg not in names:
            continue
        try:
            entries = json.loads(zf.read(root + cfg)).get("config", {})
        except (ValueError, AttributeError):
            raise bad(f"has an unreadable {cfg}") from None
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False \
                    or not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name", ""))):
                raise bad(f"stores '{fqn}' as a pickle or custom object")
    if root + "models/model.json" not in names:
        raise bad("holds no model")
    try:
        model = json.loads(zf.read(root + "models/model.json"))
    except ValueError:
        raise bad("has an unreadable models/model.json") from None

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("as_custom_obj", "custom_obj", "class_fqn", "as_graph"):
                    raise bad(f"holds a '{k}' entry (custom objects and sub-graphs are not loaded)")
                if k == "target" and isinstance(v, str) and not _SAFE_TARGET.match(v):
                    raise bad(f"calls {v!r}, not an ATen operator")
                if k == "expr_str" and isinstance(v, str) and not _expr_ok(v):
                    raise bad(f"has a shape expression outside kdlab's grammar ({v[:40]!r})")
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(model)
    sample = root + "data/sample_inputs/model.pt"
    if sample in names:
        try:
            torch.load(io.BytesIO(zf.read(sample)), weights_only=True)
        except Exception:
            raise bad("has sample inputs that are not plain tensors") from None


def load_program(data: bytes) -> nn.Module:
    """The model of :func:`export_program`'s bytes, as an :class:`ExportedModel`, after
    :func:`check_program`; every ``torch.load`` inside ``torch.export.load`` is forced to
    ``weights_only`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) while it runs."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"the checkpoint's 'program' entry is {type(data).__name__}, not an exported "
                         f"program's bytes; re-save the model")
    check_program(bytes(data))
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        ep = torch.export.load(io.BytesIO(data))
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
    return ExportedModel(ep.module())


def load_model(path: str | os.PathLike, device="cpu"):
    """Rebuild a model saved with :func:`kdlab.core.checkpoint.model_checkpoint`; returns
    ``(model in eval mode, checkpoint_dict)``. A model saved with a ``program`` (a user's module
    given as an object) is rebuilt from its ``torch.export`` program; any other from its spec
    (``model_name``, a registered name, ``timm:``/``torchvision:``/``hf:`` or ``module:function``)
    and kwargs."""
    from kdlab.core.checkpoint import CheckpointError, load_checkpoint

    ck = load_checkpoint(path)
    for key in ("model_name", "num_classes", "in_channels"):
        if key not in ck:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'; it is not a kdlab model file")
    if str(ck.get("model_name") or "").startswith("lm:") or "tokenizer" in ck:
        raise CheckpointError(f"checkpoint {path} holds a language model ({ck.get('model_name')}); this "
                              f"command takes image classifiers: use `kdlab lm generate {path} --prompt TEXT`")
    if isinstance(ck.get("diffusion"), dict):
        steps = ck["diffusion"].get("steps")
        what = f"a {steps}-step distilled sampler" if steps else "a diffusion teacher"
        raise CheckpointError(f"checkpoint {path} holds a diffusion model ({ck.get('model_name')}, {what}); this "
                              f"command takes image classifiers: its FD is scored by "
                              f"`kdlab diffusion study RECIPE --seeds SEED --out RUN_FOLDER` (docs/diffusion.md)")
    if (ck.get("pruned") or {}).get("arch") or ck.get("quantized"):
        kind = "structurally pruned" if (ck.get("pruned") or {}).get("arch") else "quantized"
        raise CheckpointError(f"checkpoint {path} holds a {kind} {ck['model_name']}; read it with "
                              f"kdlab.compress.load_compressed (this command reads plain checkpoints)")
    if ck.get("program") is not None:
        try:
            program = load_program(ck["program"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        return program.to(device).eval(), ck
    if not ck["model_name"]:
        raise CheckpointError(f"checkpoint {path} records no model spec and no exported program; "
                              f"load its state dict into your own module (torch.load(path, weights_only=True)['model'])")
    model = build_model(ck["model_name"], ck["num_classes"], ck["in_channels"], ck.get("model_kwargs", {}))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit model {ck['model_name']}: {first}") from None
    return model.to(device).eval(), ck
