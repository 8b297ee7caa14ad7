"""ONNX export, checked by running the file in ONNX Runtime against PyTorch.

:func:`export_onnx` uses ``torch.onnx.export`` (the ``torch.export``-based exporter, with a
dynamic batch dimension). :func:`check_onnx` runs the same random inputs through PyTorch and
ONNX Runtime and compares the logits within ``atol + rtol * |torch|``.
:class:`OnnxModel` wraps an ONNX Runtime session as a callable on torch tensors, so the same
accuracy and latency code (:func:`kdlab.evaluate.efficiency.measure_latency`) measures it; its
thread count is ``torch.get_num_threads()`` unless given, so PyTorch and ONNX Runtime timings
use the same number of threads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn


def _full_shape(input_shape: Sequence[int], batch: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return (batch,) + shape
    return (batch,) + shape[1:]


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                              "onnxscript", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def write_model_bytes(f, data: bytes) -> None:
    """Write a serialized model to the open temporary file ``f`` (one place, so tests can make the
    write fail half-way)."""
    f.write(data)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], *,
                opset: int = 18, dynamic_batch: bool = True) -> Path:
    """Export ``model`` (eval mode, on CPU) to ``path``; input ``"input"``, output ``"logits"``.

    ``input_shape`` is ``(C,H,W)`` or ``(N,C,H,W)``; with ``dynamic_batch`` any batch size runs.
    The file is written atomically (a temporary file beside ``path``, renamed over it): a failed
    write leaves the previous file as it was and names the path. The file's opset must be
    ``opset``: the exporter silently keeps its own (18) when it cannot convert, which is refused.
    """
    from kdlab.core.io import atomic_write

    path = Path(path)
    try:
        import onnx

        newest = int(onnx.defs.onnx_opset_version())
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'kdlab[deploy]'") from None
    if not isinstance(opset, int) or isinstance(opset, bool) or not 7 <= opset <= newest:
        raise ValueError(f"--opset {opset} is out of range; give an ONNX opset from 7 to {newest} "
                         f"(default 18)")
    model = model.cpu().eval()
    x = torch.zeros(_full_shape(input_shape, 2))
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset,
                  dynamo=True, external_data=False, verbose=False)
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    with _quiet():
        program = torch.onnx.export(model, (x,), None, **kwargs)
        proto = program.model_proto
    got = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ValueError(f"--opset {opset} cannot be honoured: the exporter converts this model only to "
                         f"opset {got}; give --opset {got} or one the ONNX version converter supports "
                         f"for every operator of the model")
    data = proto.SerializeToString()
    try:
        atomic_write(path, lambda f: write_model_bytes(f, data))
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ValueError(f"cannot write {path} ({why}); the previous file, if any, is unchanged: free "
                         f"space or give another --model-out") from None
    return path


class OnnxModel:
    """An ONNX Runtime session callable on torch tensors: ``OnnxModel(path)(x) -> logits``."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("ONNX models need onnxruntime: pip install 'kdlab[deploy]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path} (run kdlab export first)")
        so = ort.SessionOptions()
        self.threads = int(threads or torch.get_num_threads())
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), so,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime's own errors (empty file, bad protobuf, unknown ops)
            why = str(e).split(":")[-1].strip() or type(e).__name__
            raise ValueError(f"{self.path} is not a valid ONNX model ({why}); re-create it with "
                             f"`kdlab export CKPT --model-out {self.path}`") from None
        if not self.session.get_inputs():
            raise ValueError(f"{self.path} is an ONNX model without inputs; re-create it with `kdlab export`")
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.input_shape = [d if isinstance(d, int) else None for d in shape]

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_numpy(x.detach().cpu().numpy()))

    def eval(self):  # lets code treat it like a module in eval mode
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({self.path}, threads={self.threads})"


@torch.no_grad()
def check_onnx(model: nn.Module, onnx_path: str | os.PathLike, input_shape: Sequence[int], *,
               batch_size: int = 4, atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0,
               x: torch.Tensor | None = None) -> dict:
    """Compare PyTorch and ONNX Runtime on the same inputs.

    Returns ``{"max_abs_diff", "ok", "argmax_agree", "atol", "rtol", "batch_size"}``; ``ok`` is
    ``|onnx - torch| <= atol + rtol * |torch|`` everywhere. ``x`` defaults to uniform random
    inputs of ``input_shape`` with ``batch_size`` rows (a batch size other than the export's, so
    the dynamic batch dimension is checked too).
    """
    if x is None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(_full_shape(input_shape, batch_size), generator=g)
    model = model.cpu().eval()
    ref = model(x).float()
    got = OnnxModel(onnx_path)(x).float()
    if got.shape != ref.shape:
        raise ValueError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}; "
                         f"re-export the model")
    diff = (got - ref).abs()
    ok = bool((diff <= atol + rtol * ref.abs()).all())
    return {"max_abs_diff": float(diff.max()), "ok": ok,
            "argmax_agree": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            "atol": atol, "rtol": rtol, "batch_size": int(x.shape[0])}


__all__ = ["export_onnx", "OnnxModel", "check_onnx"]
