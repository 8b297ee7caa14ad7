"""The deploy pipeline: teacher and distilled student → pruned students → int8 student, measured.

:func:`deploy` takes a student checkpoint and a teacher checkpoint (any kdlab model files, e.g.
``runs/<study>/<method>/seed<k>/best.pt`` and the study's teacher) and

1. measures teacher and student (test accuracy, parameters, size on disk, FLOPs, latency);
2. prunes the student structurally (channels removed, Torch-Pruning) at each of ``sparsities``
   (fraction of channels removed per layer), one-shot or iteratively, fine-tuning after pruning,
   distilled from the unpruned student by default, and measures each;
3. exports the student to ONNX (checked against PyTorch), quantizes it to int8 with ONNX
   Runtime static quantization calibrated on training batches, and measures both ONNX models in
   ONNX Runtime, so the int8 size and latency ratios compare like with like;
4. prints a Markdown table and writes ``deploy.{md,csv,json}`` and the models under ``out_dir``.

Sizes on disk are of the files written under ``out_dir/models`` (kdlab checkpoints for PyTorch
models, ``.onnx`` files for ONNX Runtime). FLOPs are counted on the PyTorch graph; the int8 model
executes the same multiply-adds in integer arithmetic, so its row repeats the student's count.
"""

from __future__ import annotations

from kdlab.core.checkpoint import check_fits
from kdlab.core.io import atomic_write_text, write_csv, write_json

import os
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kdlab.evaluate import efficiency as eff


# --------------------------------------------------------------------------- data
def make_loaders(dataset: str, data_dir=None, *, batch_size: int = 128, seed: int = 0,
                 device="cpu"):
    """``(info, train, val, test)`` BatchLoaders (train shuffled, no augmentation)."""
    from kdlab.data import BatchLoader, load_dataset

    splits = load_dataset(dataset, data_dir, seed=seed)
    info = splits.info
    mk = lambda ts, shuffle: BatchLoader(ts, batch_size, shuffle=shuffle, seed=seed, augment=None,
                                         mean=info.mean, std=info.std, device=device)
    return info, mk(splits.train, True), mk(splits.val, False), mk(splits.test, False)


# --------------------------------------------------------------------------- tables
def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1 or a == 0:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                   headers: dict | None = None) -> str:
    """A Markdown table of ``rows`` (missing cells shown as ``–``)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, stem: str, rows: Sequence[dict],
                 columns: Sequence[str] | None = None, headers: dict | None = None,
                 meta: dict | None = None, notes: Sequence[str] = ()) -> str:
    """Write ``stem.csv`` (all keys), ``stem.json`` (rows + meta) and ``stem.md``; return the
    Markdown text (table plus notes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and not isinstance(v, (dict, list)):
                keys.append(k)
    from kdlab.core.io import atomic_write_text, write_csv, write_json

    write_csv(out / f"{stem}.csv", rows, keys)  # all three atomically: a crash leaves old or new
    write_json(out / f"{stem}.json", {"rows": list(rows), **(meta or {})})
    md = markdown_table(rows, columns, headers)
    if notes:
        md += "\n\n" + "\n".join(f"- {n}" for n in notes)
    atomic_write_text(out / f"{stem}.md", md + "\n")
    return md


# --------------------------------------------------------------------------- measuring
def measure(model, *, name: str, input_shape, test_loader=None, file: str | os.PathLike | None = None,
            flops_model: nn.Module | None = None, runtime: str = "torch", device="cpu",
            batch_sizes: Sequence[int] = (1, 32), warmup: int = 10, repeats: int = 50,
            acc: float | None = None) -> dict:
    """One table row: accuracy, then :func:`kdlab.evaluate.efficiency.profile_row`'s columns
    (parameters, FLOPs, size on disk ``file_mb``, latency per batch size).

    ``model`` is an ``nn.Module`` or a callable (ONNX Runtime); ``flops_model`` is the module
    whose parameters and FLOPs the row reports (defaults to ``model``).
    """
    from kdlab.compress.finetune import evaluate_accuracy

    fm = flops_model if flops_model is not None else model
    row: dict = {"model": name, "runtime": runtime}
    if acc is None and test_loader is not None:
        acc = evaluate_accuracy(model, test_loader,
                                device=device if isinstance(model, nn.Module) else "cpu")
    row["acc"] = None if acc is None else 100.0 * acc
    prof: dict = {}
    if isinstance(fm, nn.Module):
        prof["params_total"] = eff.count_params(fm)["total"]
        prof["flops"] = eff.count_flops(fm, (1,) + tuple(input_shape))["flops"]
    if file is not None:
        prof["file_mb"] = eff.file_size_mb(file)
    dev = device if isinstance(model, nn.Module) else "cpu"
    prof["latency"] = [eff.measure_latency(model, (1,) + tuple(input_shape), batch_size=b, warmup=warmup,
                                           repeats=repeats, device=dev) for b in batch_sizes]
    row.update(eff.profile_row(prof))
    return row


# --------------------------------------------------------------------------- deploy
def deploy(student_path, teacher_path, *, dataset: str | None = None, data_dir=None,
           out_dir="runs/compress/deploy", sparsities: Sequence[float] = (0.3, 0.6),
           prune_method: str = "structured", importance: str = "magnitude", scope: str = "local",
           steps: int = 1, finetune_epochs: int = 5, lr: float = 0.05, distill: str = "student",
           alpha: float = 0.9, T: float = 4.0, calib_batches: int = 8, quant_format: str = "qdq",
           batch_size: int = 128, latency_batch: int | None = None, warmup: int = 10, repeats: int = 50,
           device: str = "auto", seed: int = 0, max_steps: int | None = None,
           progress: bool = True, log=print, allow_other_dataset: bool = False) -> dict:
    """Run the pipeline described in the module docstring; returns ``{"rows", "notes", ...}``.

    ``latency_batch``: the larger batch timed besides batch 1 (default 256 for images of at
    most 16 pixels a side, else 32). ``max_steps`` caps fine-tuning steps per epoch (tests).
    """
    from kdlab.compress import load_compressed, save_compressed
    from kdlab.compress.export import OnnxModel, check_onnx, export_onnx
    from kdlab.compress.finetune import evaluate_accuracy, finetune
    from kdlab.compress.prune import (layer_specs, prune_iterative, sparsity_report)
    from kdlab.compress.quantize import quantize_onnx_static

    if distill not in ("student", "teacher", "none"):
        raise ValueError(f"distill must be 'student', 'teacher' or 'none', got {distill!r}")
    if not sparsities:
        raise ValueError("give at least one pruning level (--sparsities 0.3 0.6)")
    dev = eff.resolve_device(device)
    out = Path(out_dir)
    mdir = out / "models"
    t0 = time.time()

    student, s_ck = load_compressed(student_path, dev)
    teacher, t_ck = load_compressed(teacher_path, dev)
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise ValueError("deploy needs PyTorch checkpoints (.pt) for teacher and student, not ONNX")
    dataset = dataset or s_ck.get("dataset")
    if not dataset:
        raise ValueError("the student checkpoint names no dataset; pass --dataset")
    info, train_l, val_l, test_l = make_loaders(dataset, data_dir, batch_size=batch_size,
                                                seed=seed, device=dev)
    check_fits(s_ck, info, "student")
    check_fits(t_ck, info, "teacher")
    from kdlab.data.registry import check_trained_on

    for who, c in (("student", s_ck), ("teacher", t_ck)):
        check_trained_on(c, info, who, allow=allow_other_dataset, override="pass --allow-other-dataset")
    shape = (info.in_channels, info.image_size, info.image_size)
    if latency_batch is None:  # small images: a batch large enough for compute to dominate
        latency_batch = 256 if info.image_size <= 16 else 32
    bs = (1, latency_batch)
    common = dict(input_shape=shape, test_loader=test_l, device=dev, batch_sizes=bs,
                  warmup=warmup, repeats=repeats)
    rows, meta = [], {"student": str(student_path), "teacher": str(teacher_path),
                      "dataset": info.name, "input_shape": list(shape)}

    mdir.mkdir(parents=True, exist_ok=True)  # once the models and the data are checked
    # 1. teacher and student as they are
    t_file = save_compressed(teacher, mdir / "teacher.pt", t_ck, input_shape=list(shape))
    s_file = save_compressed(student, mdir / "student.pt", s_ck, input_shape=list(shape))
    log(f"measuring teacher ({t_ck.get('model_name')}) and student ({s_ck.get('model_name')}) ...")
    rows.append(measure(teacher, name=f"teacher ({t_ck.get('model_name')})", file=t_file,
                        runtime=f"torch {dev.type}", **common))
    rows.append(measure(student, name=f"student ({s_ck.get('model_name')})", file=s_file,
                        runtime=f"torch {dev.type}", **common))
    s_row = rows[-1]

    # 2. pruning at each level
    kd_teacher = {"student": student, "teacher": teacher, "none": None}[distill]
    for level in sparsities:
        tag = f"{int(round(level * 100))}"
        log(f"pruning the student ({prune_method}, {tag}%, {steps} stage(s)), "
            f"fine-tuning {finetune_epochs} epoch(s), distill={distill} ...")

        def ft(model, masks, _tag=tag):
            if finetune_epochs <= 0:
                return None
            h = finetune(model, train_l, epochs=finetune_epochs, lr=lr, teacher=kd_teacher,
                         alpha=alpha, T=T, masks=masks, seed=seed, max_steps=max_steps,
                         device=dev, progress=progress, desc=f"fine-tune pruned {_tag}%")
            return {"loss": h[-1]["loss"], "val_acc": evaluate_accuracy(model, val_l, dev)}

        batches_fn = lambda: ((x, y) for x, y, _ in train_l.epoch(0))
        pruned, masks, hist = prune_iterative(
            student, level, steps=steps, method=prune_method, scope=scope, importance=importance,
            input_shape=shape, batches_fn=batches_fn, finetune_fn=ft, progress=progress)
        pruned.eval()
        info_p = {"method": prune_method, "importance": importance, "scope": scope,
                  "steps": steps, "finetune_epochs": finetune_epochs, "distill": distill,
                  "history": hist}
        if prune_method == "structured":
            info_p.update(ratio=level, arch=layer_specs(pruned))
        else:
            info_p.update(sparsity=level, achieved=sparsity_report(pruned)["sparsity"])
        p_file = save_compressed(pruned, mdir / f"student_pruned{tag}.pt", s_ck, pruned=info_p,
                                 input_shape=list(shape))
        rows.append(measure(pruned, name=f"student pruned {tag}% ({prune_method})", file=p_file,
                            runtime=f"torch {dev.type}", **common))

    # 3. ONNX fp32 and int8 (ONNX Runtime, CPU)
    log("exporting the student to ONNX and quantizing to int8 (ONNX Runtime static) ...")
    student_cpu = student.cpu().eval()
    fp32_path = export_onnx(student_cpu, mdir / "student_fp32.onnx", shape)
    chk = check_onnx(student_cpu, fp32_path, shape)
    if not chk["ok"]:
        raise RuntimeError(f"ONNX export disagrees with PyTorch (max |diff| {chk['max_abs_diff']:.2e}); "
                           f"file a bug with the model name")
    meta["onnx_check"] = chk
    calib = [x.cpu() for i, (x, _, _) in zip(range(calib_batches), train_l.epoch(0))]
    int8_path = quantize_onnx_static(fp32_path, mdir / "student_int8.onnx", calib,
                                     fmt=quant_format)
    ort_common = dict(common, device="cpu")
    fp32_sess, int8_sess = OnnxModel(fp32_path), OnnxModel(int8_path)
    rows.append(measure(fp32_sess, name="student fp32 (ONNX)", file=fp32_path,
                        flops_model=student_cpu, runtime="onnxruntime cpu", **ort_common))
    rows.append(measure(int8_sess, name="student int8 (ONNX, static)", file=int8_path,
                        flops_model=student_cpu, runtime="onnxruntime cpu", **ort_common))
    f_row, q_row = rows[-2], rows[-1]

    # 4. ratios and report
    notes = [f"threads: {s_row['threads']} (torch.get_num_threads(); ONNX Runtime uses the same); "
             f"latency = median over {repeats} runs after {warmup} warm-up runs",
             f"ONNX export check: max |onnx - torch| = {chk['max_abs_diff']:.2e} "
             f"(ok within atol {chk['atol']}, rtol {chk['rtol']})"]
    for r in rows[2:2 + len(sparsities)]:
        notes.append(
            f"{r['model']}: FLOPs x{r['flops'] / s_row['flops']:.2f}, params "
            f"x{r['params'] / s_row['params']:.2f}, latency b1 x{r['latency_b1_ms'] / s_row['latency_b1_ms']:.2f}, "
            f"b{latency_batch} x{r[f'latency_b{latency_batch}_ms'] / s_row[f'latency_b{latency_batch}_ms']:.2f} "
            f"of the student")
    notes.append(f"int8 vs fp32 ONNX: size {f_row['file_mb'] / q_row['file_mb']:.2f}x smaller, "
                 f"latency b1 x{q_row['latency_b1_ms'] / f_row['latency_b1_ms']:.2f}, "
                 f"b{latency_batch} x{q_row[f'latency_b{latency_batch}_ms'] / f_row[f'latency_b{latency_batch}_ms']:.2f}; "
                 f"accuracy {q_row['acc'] - f_row['acc']:+.2f} points")
    notes.append("batch-1 latency of very small models is mostly per-call framework overhead, "
                 "so FLOP savings show first in the larger-batch throughput")
    n_par = s_row["params"]
    notes.append(f"parameter bytes: fp32 {4 * n_par / 1e6:.3g} MB -> int8 {n_par / 1e6:.3g} MB (4x); "
                 f"the int8 file adds {max(q_row['file_mb'] - n_par / 1e6, 0) * 1e3:.1f} KB of graph, "
                 f"scales and zero points, a fixed cost that dominates for very small models")
    columns = ["model", "runtime", "acc", "params", "file_mb", "mflops", "latency_b1_ms",
               "latency_b1_p90_ms", f"images_per_s_b{latency_batch}"]
    headers = {"acc": "test acc %", "file_mb": "size MB", "mflops": "MFLOPs",
               "latency_b1_ms": "latency b1 ms", "latency_b1_p90_ms": "p90 b1 ms",
               f"images_per_s_b{latency_batch}": f"img/s b{latency_batch}"}
    meta.update(settings=dict(sparsities=list(sparsities), prune_method=prune_method,
                              importance=importance, scope=scope, steps=steps,
                              finetune_epochs=finetune_epochs, lr=lr, distill=distill,
                              alpha=alpha, T=T, calib_batches=calib_batches,
                              quant_format=quant_format, warmup=warmup, repeats=repeats,
                              latency_batch=latency_batch,
                              seed=seed, device=str(dev)),
                notes=notes, elapsed_s=time.time() - t0, torch=torch.__version__)
    md = write_report(out, "deploy", rows, columns, headers, meta, notes)
    return {"rows": rows, "notes": notes, "markdown": md, "out_dir": str(out), **meta}


__all__ = ["make_loaders", "markdown_table", "write_report", "measure", "deploy"]
