"""Quantization: the affine mapping, fake quantization (accuracy at b bits, QAT), and real int8.

The affine mapping (b bits, signed integer range ``[-2^(b-1), 2^(b-1)-1]``)::

    q     = clip(round(x / s - z), -2^(b-1), 2^(b-1) - 1)
    x_hat = s * (q + z)                                   (dequantization)

* **symmetric**: ``z = 0`` and ``s = max|x| / 2^(b-1)``. So 4-bit over ``[-1, 1]`` has
  ``s = 1/8`` and maps ``[-1, -0.5, 0, 0.5, 1]`` to ``[-8, -4, 0, 4, 8]``, where ``8`` is clipped
  to ``7`` (the largest value loses one step; this is the convention of the issue).
* **asymmetric**: the range ``[lo, hi]`` (widened to contain 0) is spread over all ``2^b``
  levels: ``s = (hi - lo) / (2^b - 1)`` and ``z = round(lo / s) + 2^(b-1)``, an integer, so
  ``lo -> -2^(b-1)``, ``hi -> 2^(b-1) - 1`` and ``0`` is represented exactly (``q = -z``).
* **per tensor** (one ``s, z``) or **per channel** (one per slice along ``axis``, e.g. the output
  channels of a weight, ``axis=0``).

Rounding is ``torch.round`` (half to even).

Fake quantization (``x -> x_hat``) measures accuracy at b bits in float arithmetic; with the
straight-through estimator it is also the forward pass of quantization-aware training (QAT).
Real int8 inference for CPU deployment goes through ONNX Runtime's static quantization
(:func:`quantize_onnx_static`): export to ONNX, calibrate activation ranges on real batches,
write a QDQ int8 model. (``torch.ao.quantization`` is deprecated and is not used.)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn


# --------------------------------------------------------------------------- the affine mapping
def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``: ``(-2^(b-1), 2^(b-1) - 1)``."""
    if int(bits) != bits or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 2 to 16 (e.g. 4 or 8), got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _reduce(x: torch.Tensor, axis: int | None, fn) -> torch.Tensor:
    """min/max over everything (axis None) or over all dims but ``axis`` (kept for broadcasting)."""
    if axis is None:
        return fn(x)
    axis = axis % x.dim()
    dims = tuple(d for d in range(x.dim()) if d != axis)
    return fn(x, dim=dims, keepdim=True) if dims else x.clone()


def compute_qparams(x: torch.Tensor | None = None, bits: int = 8, *, symmetric: bool = True,
                    axis: int | None = None, lo: torch.Tensor | float | None = None,
                    hi: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``s`` and zero point ``z`` for ``x`` (or for a given range ``[lo, hi]``).

    ``axis=None``: per tensor (scalars); ``axis=k``: per channel along dim ``k``, shaped to
    broadcast against ``x``. See the module docstring for the formulas. A zero range gets
    ``s = 1`` so nothing divides by zero.
    """
    qmin, qmax = qrange(bits)
    if lo is None or hi is None:
        if x is None:
            raise ValueError("compute_qparams needs a tensor x or both lo and hi")
        x = x.detach().float()
        lo = _reduce(x, axis, torch.amin)
        hi = _reduce(x, axis, torch.amax)
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / (2 ** (bits - 1))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(lo / scale) - qmin
    return scale, zero


def quantize(x: torch.Tensor, scale, zero_point, bits: int = 8) -> torch.Tensor:
    """``q = clip(round(x/s - z), -2^(b-1), 2^(b-1)-1)`` as an integer tensor (int8 for b <= 8)."""
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(x / scale - zero_point), qmin, qmax)
    return q.to(torch.int8 if bits <= 8 else torch.int32)


def dequantize(q: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """``x_hat = s * (q + z)``."""
    return scale * (q.float() + zero_point)


class _FakeQuantSTE(torch.autograd.Function):
    """``clip(round(v), q_min, q_max)`` with the straight-through estimator as its gradient.

    Forward: ``q = clip(round(v), q_min, q_max)`` (``round`` half to even).
    Backward (the STE of Bengio et al. 2013, "Estimating or Propagating Gradients Through
    Stochastic Neurons", arXiv:1308.3432, as used for quantization-aware training by Jacob et al.
    2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR, Sec. 3)::

        dq/dv = 1  if q_min <= round(v) <= q_max   (the closed range: both ends pass)
                0  otherwise                        (the value was clipped)

    The mask is taken on the rounded value, as in ``torch.fake_quantize_per_tensor_affine``; it
    is written out here so that the gradient at the clip boundaries does not depend on the
    subgradient that ``torch.clamp``'s backward picks there, which differs between torch
    releases: at ``v = q_min`` and ``v = q_max`` exactly, torch 2.13 passes the gradient (1) and
    torch 2.14 blocks it (0).
    """

    @staticmethod
    def forward(ctx, v, qmin: int, qmax: int):
        r = torch.round(v)
        ctx.save_for_backward((r >= qmin) & (r <= qmax))
        return torch.clamp(r, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside.to(g.dtype), None, None


def fake_quantize(x: torch.Tensor, bits: int = 8, *, symmetric: bool = True,
                  axis: int | None = None, scale=None, zero_point=None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, differentiable with the straight-through estimator.

    ``x_hat = s * (clip(round(x/s - z), q_min, q_max) + z)``. Gradient (see
    :class:`_FakeQuantSTE`): ``d x_hat / dx = 1`` where ``round(x/s - z)`` lies in the closed
    range ``[q_min, q_max]`` (the boundary values included), ``0`` where it was clipped.
    ``scale``/``zero_point`` default to :func:`compute_qparams` of ``x``.
    """
    qmin, qmax = qrange(bits)
    if scale is None or zero_point is None:
        scale, zero_point = compute_qparams(x, bits, symmetric=symmetric, axis=axis)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    q = _FakeQuantSTE.apply(x / scale - zero_point, qmin, qmax)
    return scale * (q + zero_point)


def quantization_error(x: torch.Tensor, bits: int = 8, *, symmetric: bool = True,
                       axis: int | None = None) -> float:
    """Mean squared error of fake quantization of ``x`` (a quick sanity figure)."""
    with torch.no_grad():
        return float(((fake_quantize(x, bits, symmetric=symmetric, axis=axis) - x) ** 2).mean())


# --------------------------------------------------------------------------- fake-quant modules
class QuantWrapper(nn.Module):
    """A Conv/Linear with fake-quantized weights and (optionally) fake-quantized input.

    Weights: ``weight_bits``, symmetric, per output channel (``per_channel``) or per tensor,
    recomputed from the current weights every forward (so QAT sees its own updates).
    Input activations: ``act_bits`` (None: left in float), per tensor, asymmetric unless
    ``act_symmetric``; the range is the running min/max recorded while ``observing`` (an
    exponential moving average with ``momentum`` after the first batch), frozen otherwise.
    The wrapped layer stays at ``.inner``, so its parameters are ``inner.weight`` etc.
    """

    def __init__(self, inner: nn.Module, weight_bits: int = 8, act_bits: int | None = 8, *,
                 per_channel: bool = True, weight_symmetric: bool = True,
                 act_symmetric: bool = False, momentum: float = 0.1):
        super().__init__()
        qrange(weight_bits)
        if act_bits is not None:
            qrange(act_bits)
        self.inner = inner
        self.weight_bits = int(weight_bits)
        self.act_bits = None if act_bits is None else int(act_bits)
        self.per_channel = bool(per_channel)
        self.weight_symmetric = bool(weight_symmetric)
        self.act_symmetric = bool(act_symmetric)
        self.momentum = float(momentum)
        self.observing = True
        self.register_buffer("act_lo", torch.tensor(0.0))
        self.register_buffer("act_hi", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))

    def _qweight(self) -> torch.Tensor:
        w = self.inner.weight
        return fake_quantize(w, self.weight_bits, symmetric=self.weight_symmetric,
                             axis=0 if self.per_channel else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            if self.observing:
                with torch.no_grad():
                    lo, hi = x.detach().amin().float(), x.detach().amax().float()
                    if not bool(self.observed):
                        self.act_lo.copy_(lo)
                        self.act_hi.copy_(hi)
                        self.observed.fill_(True)
                    else:
                        m = self.momentum
                        self.act_lo.mul_(1 - m).add_(m * lo)
                        self.act_hi.mul_(1 - m).add_(m * hi)
            if bool(self.observed):
                s, z = compute_qparams(bits=self.act_bits, symmetric=self.act_symmetric,
                                       lo=self.act_lo, hi=self.act_hi)
                x = fake_quantize(x, self.act_bits, scale=s.to(x.device), zero_point=z.to(x.device))
        w = self._qweight()
        inner = self.inner
        if isinstance(inner, nn.Linear):
            return nn.functional.linear(x, w, inner.bias)
        return inner._conv_forward(x, w, inner.bias)

    def extra_repr(self) -> str:
        return (f"w{self.weight_bits}{'/ch' if self.per_channel else ''} "
                f"a{self.act_bits if self.act_bits is not None else 'fp'}")


QUANT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prepare_fake_quant(model: nn.Module, weight_bits: int = 8, act_bits: int | None = 8, *,
                       per_channel: bool = True, weight_symmetric: bool = True,
                       act_symmetric: bool = False, skip: Sequence[str] = (),
                       inplace: bool = False) -> nn.Module:
    """Wrap every Conv/Linear (except names in ``skip``) in a :class:`QuantWrapper`.

    Returns the (copied unless ``inplace``) model with activation observers on; run
    :func:`calibrate` on a few batches, then evaluate (accuracy at b bits) or fine-tune (QAT).
    """
    model = model if inplace else copy.deepcopy(model)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, QUANT_TYPES) and n not in skip]
    if not targets:
        raise ValueError("the model has no Conv/Linear layer to quantize")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantWrapper(mod, weight_bits, act_bits, per_channel=per_channel,
                                            weight_symmetric=weight_symmetric,
                                            act_symmetric=act_symmetric))
    return model


def set_observing(model: nn.Module, on: bool) -> nn.Module:
    """Turn activation-range recording of all :class:`QuantWrapper` on or off."""
    for m in model.modules():
        if isinstance(m, QuantWrapper):
            m.observing = bool(on)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> nn.Module:
    """Record activation ranges on ``batches`` (tensors or ``(x, ...)`` tuples), then freeze them."""
    was = model.training
    model.eval()
    set_observing(model, True)
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = b[0] if isinstance(b, (tuple, list)) else b
        model(x)
    set_observing(model, False)
    model.train(was)
    return model


def strip_fake_quant(model: nn.Module, *, bake: bool = True, inplace: bool = False) -> nn.Module:
    """Replace each :class:`QuantWrapper` by its layer; with ``bake`` the layer's weight becomes
    its fake-quantized value (so the float model carries exactly the b-bit weights)."""
    model = model if inplace else copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantWrapper):
            if bake:
                with torch.no_grad():
                    mod.inner.weight.copy_(mod._qweight())
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.inner)
    return model


def fake_quant_config(model: nn.Module) -> dict:
    """The settings of the wrappers in ``model`` (stored in a checkpoint's ``quantized`` key)."""
    ws = [m for m in model.modules() if isinstance(m, QuantWrapper)]
    if not ws:
        raise ValueError("the model has no fake-quant layers (run prepare_fake_quant first)")
    names = [n for n, m in model.named_modules() if isinstance(m, QuantWrapper)]
    w = ws[0]
    return {"kind": "fake", "weight_bits": w.weight_bits, "act_bits": w.act_bits,
            "per_channel": w.per_channel, "weight_symmetric": w.weight_symmetric,
            "act_symmetric": w.act_symmetric, "layers": names}


# --------------------------------------------------------------------------- real int8 (ORT)
class _BatchReader:
    """onnxruntime CalibrationDataReader over a list of float32 numpy batches."""

    def __init__(self, input_name: str, batches):
        self.input_name = input_name
        self.batches = list(batches)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        b = self.batches[self.i]
        self.i += 1
        return {self.input_name: b}

    def rewind(self):
        self.i = 0


def quantize_onnx_static(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                         calib_batches: Iterable, *, per_channel: bool = True,
                         fmt: str = "qdq", activation_symmetric: bool = False,
                         method: str = "minmax", max_batches: int | None = 16) -> Path:
    """Int8 post-training static quantization of an ONNX model with ONNX Runtime.

    ``calib_batches``: normalised input batches (tensors or ``(x, ...)`` tuples) whose
    activation ranges fix the int8 scales (``method`` "minmax", "entropy" or "percentile").
    Weights int8 symmetric (per output channel with ``per_channel``); activations int8
    (asymmetric unless ``activation_symmetric``). ``fmt``: "qdq" (QuantizeLinear/
    DequantizeLinear pairs, fused by ORT into int8 kernels) or "qoperator" (QLinearConv ...).
    The model is first pre-processed (shape inference, graph optimisation) as ORT recommends.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {fp32_path} (export it first: kdlab export)")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; use one of {sorted(methods)}")
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if fmt not in formats:
        raise ValueError(f"unknown format {fmt!r}; use 'qdq' or 'qoperator'")
    arrays = []
    for i, b in enumerate(calib_batches):
        if max_batches is not None and i >= max_batches:
            break
        x = b[0] if isinstance(b, (tuple, list)) else b
        arrays.append(x.detach().cpu().float().numpy())
    if not arrays:
        raise ValueError("no calibration batches given; pass some training or validation batches")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Reader(_BatchReader, CalibrationDataReader):
        pass

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # both files are temporary (``<name>.<random>.tmp``, removed by kdlab.core.io.clean_tmp if a
    # kill leaves them); the int8 model is renamed over ``out_path`` only when complete
    tag = os.urandom(4).hex()
    pre = out_path.with_name(f"{out_path.name}.pre{tag}.tmp")
    tmp = out_path.with_name(f"{out_path.name}.{tag}.tmp")
    try:
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception:  # pre-processing is an optimisation; quantize the raw model if it fails
            src = fp32_path
        try:
            quantize_static(str(src), str(tmp), Reader(input_name, arrays),
                            quant_format=formats[fmt], per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method],
                            extra_options={"ActivationSymmetric": bool(activation_symmetric),
                                           "WeightSymmetric": True})
        except OSError as e:
            raise ValueError(f"cannot write {out_path} ({e.strerror or e}); the previous file, if "
                             f"any, is unchanged: free space or give another --model-out") from None
        os.replace(tmp, out_path)
    finally:
        for f in (pre, tmp):
            if f.exists():
                f.unlink()
    return out_path


__all__ = [
    "qrange", "compute_qparams", "quantize", "dequantize", "fake_quantize", "quantization_error",
    "QuantWrapper", "prepare_fake_quant", "set_observing", "calibrate", "strip_fake_quant",
    "fake_quant_config", "quantize_onnx_static",
]
