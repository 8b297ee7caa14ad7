"""What a model costs: parameters, memory, FLOPs, latency and throughput.

Every figure the study's tables and the compression report show comes from here.

Conventions (fixed, so numbers from different runs compare):

* **FLOPs** are counted by the framework (:class:`torch.utils.flop_counter.FlopCounterMode`) on
  one forward pass and reported **per sample**. FlopCounterMode counts a multiply-add as two
  FLOPs, so ``flops = 2 * macs``. It counts the matrix products and convolutions only: **bias
  additions, batch-norm, activations, pooling and residual additions are not counted.** So a
  convolution ``k x k``, ``d_in -> d_out`` on an ``h x w`` output counts
  ``2*h*w*d_out*k*k*d_in`` FLOPs (the textbook formula with bias, ``2*h*w*d_out*(k*k*d_in + 1)``,
  minus the ``2*h*w*d_out`` bias term) and a linear layer ``I -> O`` counts ``2*I*O`` FLOPs,
  i.e. ``I*O`` MACs (the textbook ``I*O + O`` minus the ``O`` bias additions).
* **Memory** per dtype is ``parameters x bytes per element`` (fp32 4, fp16/bf16 2, int8 1);
  ``size_mb`` is the fp32 parameters plus buffers. MB means 10^6 bytes throughout.
* **Latency** is wall-clock time of one forward pass of a whole batch, after warm-up, as the
  median and 90th percentile over repeats, with the thread count stated; on CUDA every timed call
  is bracketed by ``torch.cuda.synchronize()``. Throughput is ``batch_size / median``.
"""

from __future__ import annotations

from kdlab.core.device import resolve_device  # noqa: F401  (re-exported for the efficiency API)

import os
import time
from typing import Callable, Sequence

import torch
from torch import nn

MB = 1e6
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


# --------------------------------------------------------------------------- parameters / memory
def count_params(model: nn.Module) -> dict:
    """``{"total", "trainable"}`` numbers of parameter elements (shared tensors counted once)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"total": int(total), "trainable": int(trainable)}


def memory_footprint(model: nn.Module, dtypes: Sequence[str] = ("fp32", "fp16", "bf16", "int8")
                     ) -> dict:
    """Bytes the parameters take stored in each dtype: ``{dtype: params x bytes}``."""
    n = count_params(model)["total"]
    out = {}
    for d in dtypes:
        if d not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {d!r}; use one of {sorted(DTYPE_BYTES)}")
        out[d] = n * DTYPE_BYTES[d]
    return out


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the fp32 parameters plus buffers as held in memory (each tensor's own dtype)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return int(total)


def file_size_mb(path: str | os.PathLike) -> float:
    """Size of a saved file (checkpoint, ONNX model) in MB (10^6 bytes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path} (save or export the model first)")
    return os.path.getsize(path) / MB


# --------------------------------------------------------------------------- FLOPs
def _full_shape(input_shape: Sequence[int], batch_size: int | None = None) -> tuple[int, ...]:
    """``(C,H,W)`` or ``(N,C,H,W)`` -> a 4-d shape; ``batch_size`` replaces N when given."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) < 2:
        raise ValueError(f"input_shape must be (C,H,W) or (N,C,H,W), got {tuple(input_shape)}")
    if batch_size is not None:
        shape = (int(batch_size),) + shape[1:]
    return shape


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def count_flops(model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32),
                per_layer: bool = False) -> dict:
    """FLOPs of one forward pass, **per sample**: ``{"flops", "macs"}`` (+ ``"per_layer"``).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` in eval mode without
    gradients; ``flops = 2 * macs``. Bias additions are *not* counted (see the module docstring):
    a conv layer counts ``2*h*w*d_out*k*k*d_in`` and a linear layer ``2*I*O``.

    ``input_shape`` is ``(N,C,H,W)`` (or ``(C,H,W)``); the counts are divided by N.
    With ``per_layer=True`` the result has ``per_layer``: a list of
    ``{"name", "type", "flops", "macs"}`` for every leaf module that does arithmetic, in the
    order of ``model.named_modules()`` (names as there, so they match ``state_dict`` keys).
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = _full_shape(input_shape)
    n = shape[0]
    x = torch.zeros(shape, device=_model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    total = int(fc.get_total_flops())
    out = {"flops": total // n, "macs": total // (2 * n)}
    if per_layer:
        counts = fc.get_flop_counts()
        root = type(model).__name__
        by_name = {}
        for key, ops in counts.items():
            if key == "Global":
                continue
            if key == root:
                name = ""
            elif key.startswith(root + "."):
                name = key[len(root) + 1:]
            else:
                continue
            by_name[name] = int(sum(ops.values()))
        rows = []
        for name, mod in model.named_modules():
            if any(True for _ in mod.children()):
                continue
            f = by_name.get(name, 0)
            if f:
                rows.append({"name": name, "type": type(mod).__name__,
                             "flops": f // n, "macs": f // (2 * n)})
        out["per_layer"] = rows
    return out


# --------------------------------------------------------------------------- latency
def time_callable(fn: Callable[[], object], *, warmup: int = 10, repeats: int = 50,
                  sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times; return each time in ms.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before starting and after finishing
    every timed call so asynchronous devices are timed honestly.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    v = sorted(values)
    if len(v) == 1:
        return float(v[0])
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def latency_stats(times_ms: Sequence[float], batch_size: int) -> dict:
    """``{"median_ms", "p90_ms", "images_per_s"}`` from per-call times of a batch."""
    med = _percentile(times_ms, 50)
    return {"median_ms": med, "p90_ms": _percentile(times_ms, 90),
            "images_per_s": batch_size / (med / 1e3) if med > 0 else float("inf")}


def measure_latency(model: nn.Module | Callable, input_shape: Sequence[int], batch_size: int = 1,
                    warmup: int = 10, repeats: int = 50, device: str = "cpu") -> dict:
    """Time forward passes of a batch of ``batch_size`` random inputs of ``input_shape``.

    Returns ``{"median_ms", "p90_ms", "images_per_s", "threads", "batch_size", "device"}``;
    ``threads`` is ``torch.get_num_threads()`` at the time. ``input_shape`` is ``(N,C,H,W)`` or
    ``(C,H,W)``; N is replaced by ``batch_size``. ``device="auto"`` uses CUDA when present.

    ``model`` may also be any callable taking a CPU/GPU tensor (e.g. a wrapped ONNX Runtime
    session, see :mod:`kdlab.compress.export`); then it is called as is.
    """
    dev = resolve_device(device)
    shape = _full_shape(input_shape, batch_size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dev)
    if isinstance(model, nn.Module):
        model = model.to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else None

    def call():
        with torch.inference_mode():
            return model(x)

    times = time_callable(call, warmup=warmup, repeats=repeats, sync=sync)
    out = latency_stats(times, shape[0])
    out.update(threads=torch.get_num_threads(), batch_size=int(shape[0]), device=str(dev))
    return out


# --------------------------------------------------------------------------- everything at once
def profile_model(model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32), *,
                  batch_sizes: Sequence[int] = (1, 32), warmup: int = 10, repeats: int = 50,
                  device: str = "cpu", latency: bool = True, per_layer: bool = False,
                  path: str | os.PathLike | None = None) -> dict:
    """All the figures for one model.

    Keys: ``params`` ({total, trainable}), ``params_total``, ``params_trainable``, ``flops``,
    ``macs`` (per sample), ``size_mb`` (fp32 params + buffers), ``memory_mb``
    ({fp32, fp16, bf16, int8}: params x bytes / 10^6), ``latency`` (list of
    :func:`measure_latency` results, one per batch size; absent when ``latency=False``),
    ``per_layer`` (when asked), ``file_mb`` (when ``path`` is given), ``input_shape``.
    """
    shape = _full_shape(input_shape, 1)
    params = count_params(model)
    fl = count_flops(model, shape, per_layer=per_layer)
    out = {
        "input_shape": list(shape[1:]),
        "params": params,
        "params_total": params["total"],
        "params_trainable": params["trainable"],
        "flops": fl["flops"],
        "macs": fl["macs"],
        "size_mb": model_size_bytes(model) / MB,
        "memory_mb": {k: v / MB for k, v in memory_footprint(model).items()},
    }
    if per_layer:
        out["per_layer"] = fl["per_layer"]
    if path is not None:
        out["file_mb"] = file_size_mb(path)
    if latency:
        out["latency"] = [measure_latency(model, shape, batch_size=b, warmup=warmup,
                                          repeats=repeats, device=device) for b in batch_sizes]
    return out


def profile_row(prof: dict) -> dict:
    """One flat table row (CSV / Markdown) of a profile: the one row builder of kdlab's size and
    speed tables, whatever part of :func:`profile_model`'s result ``prof`` holds.

    Columns: ``params`` (``params_total``), ``trainable``, ``flops`` and ``mflops``, ``macs`` and
    ``mmacs``, ``size_mb`` (parameters in memory), ``mem_<dtype>_mb``, ``file_mb`` (size on disk),
    and per timed batch size b ``latency_b<b>_ms`` (median), ``latency_b<b>_p90_ms``,
    ``images_per_s_b<b>``, with ``threads`` and ``device``."""
    row: dict = {}
    if "params_total" in prof:
        row["params"] = prof["params_total"]
    if "params_trainable" in prof:
        row["trainable"] = prof["params_trainable"]
    for k, scaled in (("flops", "mflops"), ("macs", "mmacs")):
        if k in prof:
            row[k], row[scaled] = prof[k], prof[k] / 1e6
    if "size_mb" in prof:
        row["size_mb"] = prof["size_mb"]
    for k, v in prof.get("memory_mb", {}).items():
        row[f"mem_{k}_mb"] = v
    if "file_mb" in prof:
        row["file_mb"] = prof["file_mb"]
    for lat in prof.get("latency", []):
        b = lat["batch_size"]
        row[f"latency_b{b}_ms"] = lat["median_ms"]
        row[f"latency_b{b}_p90_ms"] = lat["p90_ms"]
        row[f"images_per_s_b{b}"] = lat["images_per_s"]
        row["threads"] = lat["threads"]
        row["device"] = lat["device"]
    return row


__all__ = [
    "count_params", "memory_footprint", "model_size_bytes", "file_size_mb", "count_flops",
    "resolve_device", "time_callable", "latency_stats", "measure_latency", "profile_model",
    "profile_row", "DTYPE_BYTES", "MB",
]
