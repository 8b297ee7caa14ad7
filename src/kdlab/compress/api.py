"""One function per compression command (``kdlab profile | prune | quantize | export | deploy``).

Each takes a checkpoint (or model name), does the work, writes CSV/JSON/Markdown tables (and
derived models) under ``out_dir`` (default ``runs/compress/<name>``) and returns a dict with at
least ``"markdown"`` (the table printed by the CLI) and ``"out_dir"``. Derived models are kdlab
checkpoints readable by :func:`kdlab.compress.load_compressed`.

Common keywords: ``device`` (``"auto"``: CUDA when available, else CPU; used for PyTorch timing
and fine-tuning), ``threads`` (``torch.set_num_threads``, None: as is), ``seed`` (data order,
fine-tuning and the global torch seed), ``warmup``/``repeats`` (untimed and timed runs of the
latency measurement) and ``latency_batch`` (the larger batch timed besides batch 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kdlab.core.io import atomic_write_text
from kdlab.compress import input_shape_of, load_compressed, save_compressed
from kdlab.core.checkpoint import check_fits
from kdlab.compress.pipeline import make_loaders, markdown_table, measure, write_report
from kdlab.evaluate import efficiency as eff


# --------------------------------------------------------------------------- helpers
def setup(threads: int | None, seed: int) -> None:
    """``torch.set_num_threads(threads)`` (when given) and ``torch.manual_seed(seed)``."""
    if threads:
        from kdlab.core.threads import pin_threads

        pin_threads(threads)
    torch.manual_seed(seed)


def run_name(path: str) -> str:
    """A short name for a checkpoint path: ``runs/study/kd/seed0/best.pt -> study-kd-seed0-best``
    (the last three path parts, without ``runs``); other targets (model names) as they are."""
    p = Path(path)
    if p.suffix in (".pt", ".onnx", ".safetensors"):
        parts = [q for q in p.with_suffix("").parts[-3:] if q not in (".", "runs")]
        return "-".join(parts)
    return p.name


def default_out(out_dir, name: str, create: bool = True) -> Path:
    """``out_dir``, or ``runs/compress/<name>``, checked (a folder that can be written) before any
    work; ``create=False``: only checked, not made."""
    from kdlab.core.io import check_out_dir

    return check_out_dir(Path(out_dir) if out_dir else Path("runs") / "compress" / name, "--out folder",
                         create=create)


def claims_out(suffix: str):
    """Decorator of a command ``fn(checkpoint, ..., out_dir=None, model_out=None)`` that writes
    under ``default_out(out_dir, <checkpoint name>-<suffix>)``: while it runs the folder is locked
    (:class:`kdlab.core.lock.RunLock`: two commands never write the same files), and the temporary
    files a killed earlier run left there (and beside ``model_out``) are removed first. A folder
    the command created and left empty (it failed before writing) is removed again."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def run(checkpoint, *args, **kwargs):
            from kdlab.core.io import TMP_GLOB, check_out_dir, clean_tmp
            from kdlab.core.lock import RunLock

            if kwargs.get("model_out") and Path(kwargs["model_out"]).resolve() == Path(checkpoint).resolve():
                raise ValueError(f"--model-out {kwargs['model_out']} is the input checkpoint; writing there would "
                                 f"replace it: give another file")
            out = default_out(kwargs.get("out_dir"), f"{run_name(checkpoint)}-{suffix}", create=False)
            top = next((p for p in [out, *out.parents] if p.exists()), None)
            made = [p for p in [out, *out.parents] if top is None or p not in (top, *top.parents)]
            check_out_dir(out)
            try:
                with RunLock(out, "output folder"):
                    clean_tmp(out, depth=3)
                    if kwargs.get("model_out"):
                        mo = Path(kwargs["model_out"])
                        for t in mo.parent.glob(mo.name + TMP_GLOB[1:]):
                            t.unlink(missing_ok=True)
                    return fn(checkpoint, *args, **kwargs)
            finally:
                for p in made:  # innermost first
                    if p.is_dir() and not any(p.iterdir()):
                        p.rmdir()
        return run
    return wrap


def load_torch(path, device, what: str):
    """A PyTorch model from a checkpoint (not an ONNX file), ``(model, checkpoint)``."""
    model, ck = load_compressed(path, device)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} needs a PyTorch checkpoint (.pt), not an ONNX file")
    return model, ck


#: How a compression command is told to use a model on another data set than its own.
OTHER_DATA = "pass --allow-other-dataset"


def data_for(ck: dict, dataset, data_dir, *, batch_size: int, seed: int, device,
             allow_other_dataset: bool = False):
    """``(info, train, val, test)`` loaders of ``dataset`` (default: the checkpoint's), after
    checking the checkpoint fits it (and was trained on it, unless ``allow_other_dataset``)."""
    from kdlab.data.registry import check_trained_on

    dataset = dataset or ck.get("dataset")
    if not dataset:
        raise ValueError("the checkpoint names no dataset; pass --dataset")
    info, tr, va, te = make_loaders(dataset, data_dir, batch_size=batch_size, seed=seed,
                                    device=device)
    check_fits(ck, info, "the checkpoint")
    check_trained_on(ck, info, "the checkpoint", allow=allow_other_dataset, override=OTHER_DATA)
    return info, tr, va, te


def open_checkpoint(checkpoint: str, what: str, *, dataset, data_dir, batch_size: int, out_dir, device,
                    threads: int | None, seed: int, allow_other_dataset: bool = False):
    """What a command that changes a PyTorch checkpoint (``what``: prune, quantize) starts from:
    :func:`setup`, then ``(device, model, checkpoint, info, train, val, test, input shape (C, H, W),
    output folder)``: the resolved device, :func:`load_torch`, :func:`data_for` and
    ``default_out(out_dir, <run name>-<what>)``, in that order."""
    setup(threads, seed)
    dev = eff.resolve_device(device)
    model, ck = load_torch(checkpoint, dev, what)
    info, tr, va, te = data_for(ck, dataset, data_dir, batch_size=batch_size, seed=seed, device=dev,
                                allow_other_dataset=allow_other_dataset)
    shape = (info.in_channels, info.image_size, info.image_size)
    out = default_out(out_dir, f"{run_name(checkpoint)}-{what}")
    return dev, model, ck, info, tr, va, te, shape, out


def kd_target(distill: str, model, teacher, device, info=None, allow_other_dataset: bool = False):
    """The KD target while fine-tuning: None (``"none"``), the uncompressed ``model`` itself
    (``"self"``) or the ``teacher`` checkpoint (``"teacher"``), checked against the data ``info``
    (class counts and names, and the data set it was trained on unless ``allow_other_dataset``)."""
    from kdlab.data.registry import check_trained_on

    if distill == "none":
        return None
    if distill == "self":
        return model
    if distill != "teacher":
        raise ValueError(f"distill must be none, self or teacher, got {distill!r}")
    if not teacher:
        raise ValueError("--distill teacher needs --teacher <checkpoint>")
    t_model, t_ck = load_compressed(teacher, device)
    if info is not None and isinstance(t_ck, dict) and t_ck.get("format") != "onnx":
        check_fits(t_ck, info, f"teacher {teacher}")
        check_trained_on(t_ck, info, f"teacher {teacher}", allow=allow_other_dataset, override=OTHER_DATA)
    return t_model


# --------------------------------------------------------------------------- profile
def profile_target(target: str, *, out_dir=None, input_size: int | None = None,
                   num_classes: int | None = None, in_channels: int | None = None, per_layer: bool = False,
                   latency: bool = True, device="auto", threads: int | None = None, seed: int = 0,
                   warmup: int = 10, repeats: int = 50, latency_batch: int = 32) -> dict:
    """Parameters, memory per dtype, file size, FLOPs and latency of a checkpoint, an ONNX file
    or a registry model name (built with ``num_classes``/``in_channels``, default 10 and 3, at
    ``input_size``, default 32; a file has its own, so they are refused for one). Writes ``profile.{csv,json,md}`` (and ``profile_layers.*`` with ``per_layer``)."""
    from kdlab.compress.export import OnnxModel

    setup(threads, seed)
    dev = eff.resolve_device(device)
    path = Path(target)
    file = None
    if path.suffix in (".pt", ".onnx", ".safetensors") or path.exists():
        if num_classes is not None or in_channels is not None:
            raise ValueError(f"--num-classes and --in-channels apply to a model name; the file {target} "
                             f"has its own (drop them)")
        model, ck = load_compressed(target, dev)
        file = path
        shape = (tuple(ck["input_shape"]) if ck.get("format") == "onnx" and input_size is None
                 else input_shape_of(ck, input_size))
        name = run_name(target)
    else:
        from kdlab.models import create_model

        num_classes, in_channels = num_classes or 10, in_channels or 3
        model = create_model(target, num_classes=num_classes, in_channels=in_channels)
        shape = (in_channels, input_size or 32, input_size or 32)
        name = target
    out = default_out(out_dir, name)
    bs = (1, latency_batch)
    row: dict = {"model": name, "input": "x".join(map(str, shape))}
    meta: dict = {"target": target, "input_shape": list(shape)}
    if isinstance(model, OnnxModel):
        lats = [] if not latency else [
            eff.measure_latency(model, (1,) + shape, batch_size=b, warmup=warmup,
                                repeats=repeats, device="cpu") for b in bs]
        prof = {"latency": lats, "file_mb": eff.file_size_mb(file)}
        row["runtime"] = "onnxruntime cpu"
    else:
        prof = eff.profile_model(model, shape, batch_sizes=bs, warmup=warmup, repeats=repeats,
                                 device=str(dev), latency=latency, per_layer=per_layer, path=file)
        row["runtime"] = f"torch {dev.type}"
    row.update(eff.profile_row(prof))
    meta["profile"] = prof
    write_report(out, "profile", [row], meta=meta)
    # vertical table: one metric per line reads best for a single model
    md = markdown_table([{"metric": k, "value": v} for k, v in row.items()], ["metric", "value"])
    notes = ["FLOPs = 2 x MACs, per sample, counted by torch.utils.flop_counter "
             "(conv/matmul only; bias, BN, activations not counted)",
             "memory per dtype = parameters x bytes (fp32 4, fp16/bf16 2, int8 1); MB = 10^6 bytes"]
    if prof.get("latency"):
        notes.append(f"latency: median/p90 over {repeats} runs after {warmup} warm-up, "
                     f"{prof['latency'][0]['threads']} thread(s), device {prof['latency'][0]['device']}")
    md += "\n\n" + "\n".join(f"- {n}" for n in notes)
    if per_layer and "per_layer" in prof:
        layers = [{"layer": r["name"], "type": r["type"], "MFLOPs": r["flops"] / 1e6,
                   "MMACs": r["macs"] / 1e6,
                   "share %": 100.0 * r["flops"] / max(prof["flops"], 1)} for r in prof["per_layer"]]
        write_report(out, "profile_layers", layers)
        md += "\n\n" + markdown_table(layers)
    from kdlab.core.io import atomic_write_text

    atomic_write_text(out / "profile.md", md + "\n")
    return {"markdown": md, "out_dir": out, "row": row}


# --------------------------------------------------------------------------- prune
@claims_out("prune")
def prune_checkpoint(checkpoint: str, sparsity: float, *, method: str = "unstructured",
                     scope: str | None = None, importance: str = "magnitude", steps: int = 1,
                     schedule: str = "linear", importance_batches: int = 8,
                     include_classifier: bool = True, finetune_epochs: int = 0, lr: float = 0.01,
                     distill: str = "self", teacher: str | None = None, alpha: float = 0.9,
                     T: float = 4.0, max_steps: int | None = None, dataset: str | None = None,
                     data_dir=None, batch_size: int = 128, out_dir=None, model_out=None,
                     device="auto", threads: int | None = None, seed: int = 0, warmup: int = 10,
                     repeats: int = 50, latency_batch: int = 32, progress: bool = True,
                     allow_other_dataset: bool = False) -> dict:
    """Prune ``checkpoint`` to ``sparsity`` (fraction of weights, unstructured, or of channels,
    structured) in ``steps`` stages, each followed by ``finetune_epochs`` of (distilled)
    fine-tuning; write the pruned checkpoint (``model_out``, default
    ``<out_dir>/pruned_<method><pct>.pt``) and a table of the original against the pruned model
    (accuracy, parameters, zero weights, size, FLOPs, latency). ``scope`` defaults to ``global``
    for unstructured and ``local`` for structured pruning."""
    from kdlab.compress.finetune import evaluate_accuracy, finetune
    from kdlab.compress.prune import layer_specs, prune_iterative, sparsity_report

    dev, model, ck, info, tr, va, te, shape, out = open_checkpoint(
        checkpoint, "prune", dataset=dataset, data_dir=data_dir, batch_size=batch_size, out_dir=out_dir,
        device=device, threads=threads, seed=seed, allow_other_dataset=allow_other_dataset)
    kd = kd_target(distill, model, teacher, dev, info, allow_other_dataset)
    if scope is None:
        scope = "local" if method == "structured" else "global"

    def ft(m, masks):
        if finetune_epochs <= 0:
            return None
        h = finetune(m, tr, epochs=finetune_epochs, lr=lr, teacher=kd, alpha=alpha, T=T,
                     masks=masks, seed=seed, device=dev, progress=progress, max_steps=max_steps)
        return {"loss": h[-1]["loss"], "val_acc": evaluate_accuracy(m, va, dev)}

    pruned, masks, hist = prune_iterative(
        model, sparsity, steps=steps, method=method, scope=scope, importance=importance,
        input_shape=shape, batches_fn=lambda: ((x, y) for x, y, _ in tr.epoch(0)),
        finetune_fn=ft, schedule=schedule, include_classifier=include_classifier,
        max_batches=importance_batches, progress=progress)
    pruned.eval()
    info_p = {"method": method, "importance": importance, "scope": scope, "steps": steps,
              "schedule": schedule, "finetune_epochs": finetune_epochs, "distill": distill,
              "history": hist}
    if method == "structured":
        info_p.update(ratio=sparsity, arch=layer_specs(pruned))
    else:
        rep = sparsity_report(pruned)
        info_p.update(sparsity=sparsity, achieved=rep["sparsity"], zeros=rep["zeros"],
                      total=rep["total"])
    tag = int(round(sparsity * 100))
    out_ckpt = Path(model_out) if model_out else out / f"pruned_{method}{tag}.pt"
    save_compressed(pruned, out_ckpt, ck, pruned=info_p, input_shape=list(shape))
    ref_file = out / "original.pt"
    save_compressed(model, ref_file, ck, input_shape=list(shape))
    common = dict(input_shape=shape, test_loader=te, device=dev, batch_sizes=(1, latency_batch),
                  warmup=warmup, repeats=repeats)
    rows = [measure(model, name="original", file=ref_file, runtime=f"torch {dev.type}", **common),
            measure(pruned, name=f"pruned {tag}% ({method}, {importance}, {scope})",
                    file=out_ckpt, runtime=f"torch {dev.type}", **common)]
    for r, m in zip(rows, (model, pruned)):
        r["weight_sparsity"] = 100.0 * sparsity_report(m)["sparsity"]
    notes = [f"pruned checkpoint: {out_ckpt} (load with kdlab.compress.load_compressed)"]
    if method == "unstructured":
        notes.append("unstructured zeros are stored densely: file size, FLOPs and latency do not "
                     "drop; use --method structured for a smaller, faster network")
    md = write_report(out, "prune", rows,
                      ["model", "acc", "params", "weight_sparsity", "file_mb", "mflops",
                       "latency_b1_ms", "latency_b1_p90_ms", f"images_per_s_b{latency_batch}"],
                      {"acc": "test acc %", "weight_sparsity": "zero weights %",
                       "file_mb": "size MB", "mflops": "MFLOPs", "latency_b1_ms": "latency b1 ms",
                       "latency_b1_p90_ms": "p90 b1 ms",
                       f"images_per_s_b{latency_batch}": f"img/s b{latency_batch}"},
                      meta={"checkpoint": checkpoint,
                            "pruned": {k: v for k, v in info_p.items() if k != "arch"}},
                      notes=notes)
    return {"markdown": md, "out_dir": out, "rows": rows, "checkpoint": out_ckpt}


# --------------------------------------------------------------------------- quantize
@claims_out("quantize")
def quantize_checkpoint(checkpoint: str, *, mode: str = "fake", bits: Sequence[int] = (8,),
                        act_bits: int | str | None = 8, per_channel: bool = True,
                        weight_symmetric: bool = True, act_symmetric: bool = False,
                        calib_batches: int = 8, calibration: str = "minmax", fmt: str = "qdq",
                        epochs: int = 1, lr: float = 0.001, distill: str = "none",
                        teacher: str | None = None, alpha: float = 0.9, T: float = 4.0,
                        max_steps: int | None = None, dataset: str | None = None, data_dir=None,
                        batch_size: int = 128, out_dir=None, model_out=None, device="auto",
                        threads: int | None = None, seed: int = 0, warmup: int = 10,
                        repeats: int = 50, latency_batch: int = 32, progress: bool = True,
                        allow_other_dataset: bool = False) -> dict:
    """Quantize ``checkpoint``:

    * ``mode="fake"``: test accuracy with weights (and activations, ``act_bits``; ``None`` or
      ``"none"`` keeps them float) rounded to each of ``bits``, calibrated on
      ``calib_batches`` training batches (accuracy only, no speed-up);
    * ``"static"``: real int8 through ONNX Runtime's static quantization (``fmt`` qdq or
      qoperator, ``calibration`` minmax / entropy / percentile), timed against the fp32 ONNX
      model; the int8 model goes to ``model_out`` (default ``<out_dir>/model_int8.onnx``);
    * ``"qat"``: quantization-aware fine-tuning at ``bits[0]`` for ``epochs`` (optionally
      distilled), saved to ``model_out`` (default ``<out_dir>/qat_w<b>.pt``).
    """
    from kdlab.compress.export import OnnxModel, check_onnx, export_onnx
    from kdlab.compress.finetune import evaluate_accuracy, finetune
    from kdlab.compress.quantize import (QuantWrapper, calibrate, fake_quant_config,
                                         prepare_fake_quant, quantize_onnx_static, set_observing,
                                         strip_fake_quant)

    if mode not in ("fake", "static", "qat"):
        raise ValueError(f"mode must be fake, static or qat, got {mode!r}")
    dev, model, ck, info, tr, va, te, shape, out = open_checkpoint(
        checkpoint, "quantize", dataset=dataset, data_dir=data_dir, batch_size=batch_size, out_dir=out_dir,
        device=device, threads=threads, seed=seed, allow_other_dataset=allow_other_dataset)
    act_bits = None if act_bits is None or str(act_bits) in ("none", "fp", "0") else int(act_bits)
    calib = lambda: [(x, y) for _, (x, y, _) in zip(range(calib_batches), tr.epoch(0))]
    fq_opts = dict(per_channel=per_channel, weight_symmetric=weight_symmetric,
                   act_symmetric=act_symmetric)
    base_acc = evaluate_accuracy(model, te, dev)
    notes = []
    if mode == "fake":
        rows = [{"model": "fp32", "weight_bits": 32, "act_bits": 32, "acc": 100 * base_acc}]
        for b in bits:
            fq = prepare_fake_quant(model, b, act_bits, **fq_opts)
            calibrate(fq, calib())
            rows.append({"model": f"fake-quant w{b}" + ("" if act_bits is None else f"/a{act_bits}"),
                         "weight_bits": b, "act_bits": act_bits or 32,
                         "acc": 100 * evaluate_accuracy(fq, te, dev)})
        notes.append("fake quantization: weights and activations rounded to b bits in float "
                     "arithmetic; measures accuracy only (no speed-up)")
        md = write_report(out, "quantize", rows, ["model", "weight_bits", "act_bits", "acc"],
                          {"acc": "test acc %"}, meta={"checkpoint": checkpoint}, notes=notes)
        return {"markdown": md, "out_dir": out, "rows": rows}
    if mode == "static":
        if any(isinstance(m, QuantWrapper) for m in model.modules()):
            model = strip_fake_quant(model, bake=True)  # QAT weights, float graph for ORT
            notes.append("started from a fake-quant checkpoint: its quantized weights were baked in")
        mcpu = model.cpu().eval()
        fp32 = export_onnx(mcpu, out / "model_fp32.onnx", shape)
        chk = check_onnx(mcpu, fp32, shape)
        int8 = quantize_onnx_static(fp32, Path(model_out) if model_out else out / "model_int8.onnx",
                                    calib(), per_channel=per_channel, fmt=fmt, method=calibration,
                                    activation_symmetric=act_symmetric)
        common = dict(input_shape=shape, test_loader=te, device="cpu",
                      batch_sizes=(1, latency_batch), warmup=warmup, repeats=repeats)
        rows = [measure(OnnxModel(fp32), name="fp32 (ONNX)", file=fp32, flops_model=mcpu,
                        runtime="onnxruntime cpu", **common),
                measure(OnnxModel(int8), name="int8 (ONNX static)", file=int8, flops_model=mcpu,
                        runtime="onnxruntime cpu", **common)]
        f, q = rows
        notes += [f"int8 file {f['file_mb'] / q['file_mb']:.2f}x smaller; latency b1 "
                  f"x{q['latency_b1_ms'] / f['latency_b1_ms']:.2f} of fp32 ONNX",
                  f"export check: max |onnx - torch| = {chk['max_abs_diff']:.2e}",
                  f"int8 model: {int8}"]
        md = write_report(out, "quantize", rows,
                          ["model", "runtime", "acc", "params", "file_mb", "mflops", "latency_b1_ms",
                           "latency_b1_p90_ms", f"images_per_s_b{latency_batch}"],
                          {"acc": "test acc %", "file_mb": "size MB", "mflops": "MFLOPs",
                           "latency_b1_ms": "latency b1 ms", "latency_b1_p90_ms": "p90 b1 ms",
                           f"images_per_s_b{latency_batch}": f"img/s b{latency_batch}"},
                          meta={"checkpoint": checkpoint, "onnx_check": chk}, notes=notes)
        return {"markdown": md, "out_dir": out, "rows": rows, "model": int8}
    # qat
    b = list(bits)[0]
    qat = prepare_fake_quant(model, b, act_bits, **fq_opts)
    calibrate(qat, calib())
    before = evaluate_accuracy(qat, te, dev)
    kd = kd_target(distill, model, teacher, dev, info, allow_other_dataset)
    set_observing(qat, True)
    finetune(qat, tr, epochs=epochs, lr=lr, teacher=kd, alpha=alpha, T=T, seed=seed, device=dev,
             progress=progress, desc="QAT", max_steps=max_steps)
    set_observing(qat, False)
    after = evaluate_accuracy(qat, te, dev)
    out_ckpt = Path(model_out) if model_out else out / f"qat_w{b}.pt"
    save_compressed(qat, out_ckpt, ck, quantized=fake_quant_config(qat), input_shape=list(shape))
    rows = [{"model": "fp32", "acc": 100 * base_acc},
            {"model": f"fake-quant w{b} (calibrated, before QAT)", "acc": 100 * before},
            {"model": f"QAT w{b} ({epochs} epoch(s), distill={distill})", "acc": 100 * after}]
    notes.append(f"QAT checkpoint: {out_ckpt} (load with kdlab.compress.load_compressed)")
    md = write_report(out, "quantize", rows, ["model", "acc"], {"acc": "test acc %"},
                      meta={"checkpoint": checkpoint}, notes=notes)
    return {"markdown": md, "out_dir": out, "rows": rows, "checkpoint": out_ckpt}


# --------------------------------------------------------------------------- export
@claims_out("export")
def export_checkpoint(checkpoint: str, *, out_dir=None, model_out=None, opset: int = 18,
                      atol: float = 1e-4, rtol: float = 1e-3, input_size: int | None = None,
                      threads: int | None = None, seed: int = 0, fmt: str = "onnx") -> dict:
    """Export ``checkpoint`` (on the CPU), written atomically.

    ``fmt="onnx"`` (``model_out`` default ``<out_dir>/model.onnx``): checked in ONNX Runtime, ``ok``
    when ``|onnx - torch| <= atol + rtol |torch|`` on random inputs; fake-quant layers are removed
    first (their quantized weights exported in float). ``fmt="safetensors"`` (default
    ``<out_dir>/model.safetensors``): the weights, with the model's identity (name, kwargs, classes,
    channels, data set) in the header; read back and ``ok`` when every tensor is bit-identical."""
    from kdlab.compress.export import check_onnx, export_onnx
    from kdlab.compress.quantize import QuantWrapper, strip_fake_quant
    from kdlab.core.checkpoint import read_safetensors, save_safetensors

    if fmt not in ("onnx", "safetensors"):
        raise ValueError(f"unknown export format {fmt!r}; use --format onnx or --format safetensors")
    setup(threads, seed)
    model, ck = load_torch(checkpoint, "cpu", "export")
    out = default_out(out_dir, f"{run_name(checkpoint)}-export")
    if fmt == "safetensors":
        path = Path(model_out) if model_out else out / "model.safetensors"
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"--model-out {path} must end in .safetensors (kdlab reads the format by "
                             f"the file's suffix)")
        try:
            save_safetensors(ck, path)
        except OSError as e:
            raise ValueError(f"cannot write {path} ({e.strerror or e}); the previous file, if any, is "
                             f"unchanged: free space or give another --model-out") from None
        back = read_safetensors(path)["model"]
        same = back.keys() == ck["model"].keys() and all(torch.equal(back[k], ck["model"][k]) for k in back)
        row = {"safetensors": str(path), "size_mb": eff.file_size_mb(path), "tensors": len(back),
               "ok": same}
        chk = {"ok": same, "max_abs_diff": 0.0 if same else float("nan")}
        md = write_report(out, "export", [row], meta={"checkpoint": checkpoint, "format": fmt},
                          notes=["ok = every tensor read back from the file is bit-identical; the file "
                                 "holds no code (safetensors: a JSON header and raw tensor bytes)"])
        return {"markdown": md, "out_dir": out, "ok": same, "check": chk, "model": path}
    notes = []
    if any(isinstance(m, QuantWrapper) for m in model.modules()):
        model = strip_fake_quant(model, bake=True)
        notes.append("fake-quant layers removed; their quantized weights are exported in float "
                     "(run kdlab quantize --mode static for a real int8 model)")
    shape = input_shape_of(ck, input_size)
    path = Path(model_out) if model_out else out / "model.onnx"
    if path.suffix != ".onnx":
        raise ValueError(f"--model-out {path} must end in .onnx (an ONNX model; kdlab and ONNX Runtime read the "
                         f"format by its suffix)")
    export_onnx(model, path, shape, opset=opset)
    chk = check_onnx(model, path, shape, atol=atol, rtol=rtol)
    row = {"onnx": str(path), "size_mb": eff.file_size_mb(path), "max_abs_diff": chk["max_abs_diff"],
           "argmax_agree": chk["argmax_agree"], "ok": chk["ok"]}
    md = write_report(out, "export", [row], meta={"checkpoint": checkpoint, "check": chk},
                      notes=notes + [f"ok = |onnx - torch| <= {atol} + {rtol}|torch| "
                                     f"on {chk['batch_size']} random inputs (ONNX Runtime)"])
    return {"markdown": md, "out_dir": out, "ok": chk["ok"], "check": chk, "model": path}


# --------------------------------------------------------------------------- deploy
@claims_out("deploy")
def deploy_checkpoints(student: str, teacher: str, *, out_dir=None, threads: int | None = None,
                       seed: int = 0, **kwargs) -> dict:
    """:func:`kdlab.compress.pipeline.deploy` with the common set-up; ``out_dir`` defaults to
    ``runs/compress/<student name>-deploy``. Returns the pipeline's result plus ``out_dir``."""
    from kdlab.compress.pipeline import deploy

    setup(threads, seed)
    out = default_out(out_dir, f"{run_name(student)}-deploy")
    res = deploy(student, teacher, out_dir=out, seed=seed, **kwargs)
    return {**res, "out_dir": out}


__all__ = ["profile_target", "prune_checkpoint", "quantize_checkpoint", "export_checkpoint",
           "deploy_checkpoints", "run_name"]
