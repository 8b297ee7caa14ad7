"""Does a student look where its teacher looks? The explanation report of ``kdlab explain``
and of the study's KD-strength sweep.

For each student: accuracy (student and teacher), attention rank alignment, top-k focus, logit
alignment, top-1 agreement and KL to the teacher, each as mean ± 95% CI over the images
(see :mod:`kdlab.evaluate.alignment`). :func:`explain_report` compares models in memory and
writes into ``out_dir``: ``explain.md``, ``explain.csv`` (one row per student), ``explain.json``
(rows + settings), ``per_image.csv`` and ``overlays.png`` (inputs with teacher and student
attribution overlays). When every student has an ``alpha`` (the KD sweep: alpha is the weight
of the hard-label term, 1.0 = no KD) it also writes ``sweep.png``: accuracy and alignment
against alpha per student. :func:`explain_checkpoints` does the same from checkpoint files.
"""

from __future__ import annotations

from kdlab.core.io import atomic_write_text
from kdlab.core.checkpoint import check_fits

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from kdlab.report.tables import markdown_table, write_csv

TABLE_METRICS = ("student_acc", "teacher_acc", "rank_alignment", "topk_focus", "topk_fraction",
                 "logit_alignment", "top1_agreement", "kl_to_teacher",
                 "ig_completeness_student", "ig_completeness_teacher")


def pick_images(n_total: int, n: int, seed: int) -> np.ndarray:
    """``min(n, n_total)`` distinct indices drawn with ``seed``, sorted ascending."""
    if n < 1:
        raise ValueError(f"--n-images must be >= 1, got {n}")
    if n >= n_total:
        return np.arange(n_total)
    from kdlab.core.seeding import derive_seed

    rng = np.random.default_rng(derive_seed(seed, "explain", "images"))
    return np.sort(rng.choice(n_total, size=n, replace=False))


def explain_checkpoints(teacher_path, student_paths, *, alphas=None, labels=None, dataset=None,
                        data_dir=None, split: str = "test", n_images: int = 256, seed: int = 0,
                        out_dir=None, device="auto", **kwargs) -> list[dict]:
    """:func:`explain_report` for checkpoints: load the teacher and the students (with an
    optional ``alpha`` and display label each), draw ``n_images`` images of ``split`` with
    ``seed`` (:func:`pick_images`), compare, and write the report to ``out_dir`` (default
    ``runs/explain``). ``kwargs`` go to :func:`explain_report` (method, target, grid, k, ...);
    a ``target`` given as a digit string is a class index. Returns the rows."""
    from kdlab.models.adapters import load_model
    from kdlab.data import load_dataset
    from kdlab.core.device import resolve_device

    device = resolve_device(device)
    student_paths = list(student_paths)
    n_st = len(student_paths)
    for opt, vals in (("--alpha", alphas), ("--label", labels)):
        if vals is not None and len(vals) != n_st:
            raise ValueError(f"give {opt} once per --student ({n_st}), got {len(vals)}")
    if out_dir is not None:  # a folder that cannot be written fails now, not after the attributions
        from kdlab.core.io import check_out_dir

        check_out_dir(out_dir, "--out folder", create=False)  # created when the report is written
    method = kwargs.get("method", "ig")
    for flag, key in (("--layer-teacher", "layer_teacher"), ("--layer-student", "layer_student")):
        if kwargs.get(key) is not None and method != "gradcam":
            raise ValueError(f"{flag} sets the Grad-CAM layer; it applies to --method gradcam only (got --method {method})")
    teacher, t_ck = load_model(teacher_path, device)
    splits = load_dataset(dataset or t_ck.get("dataset") or "digits", data_dir, seed=seed)
    info = splits.info
    check_fits(t_ck, info, teacher_path)
    loaded = []
    for i, path in enumerate(student_paths):
        model, ck = load_model(path, device)
        check_fits(ck, info, path)
        meta = {"checkpoint": str(path), "model": ck.get("model_name", "?"), "size": size_name(ck)}
        if alphas is not None:
            meta["alpha"] = alphas[i]
        loaded.append((model, meta))
    labels = list(labels) if labels else unique_labels(
        [m["size"] + (f" a={m['alpha']:g}" if "alpha" in m else "") for _, m in loaded],
        student_paths)
    students = [(lbl, model, meta) for lbl, (model, meta) in zip(labels, loaded)]
    tset = getattr(splits, split)
    idx = pick_images(len(tset), n_images, seed)
    x, y = tset.x[torch.as_tensor(idx)], tset.y[torch.as_tensor(idx)]
    target = kwargs.pop("target", "label")
    if isinstance(target, str) and target.lstrip("-").isdigit():
        target = int(target)
    if target not in ("label", "teacher", "pred") and not (
            isinstance(target, int) and 0 <= target < info.num_classes):
        raise ValueError(f"--target {target}: give label, teacher, pred or a class index of {info.name} "
                         f"(0 to {info.num_classes - 1})")
    if method == "gradcam":  # a layer the models lack fails now, naming its flag
        from kdlab.evaluate.explain import resolve_layer

        for flag, layer, models in (("--layer-teacher", kwargs.get("layer_teacher"), [teacher]),
                                    ("--layer-student", kwargs.get("layer_student"), [m for m, _ in loaded])):
            for model in models:
                try:
                    resolve_layer(model, layer)
                except KeyError as e:
                    raise ValueError(f"{flag}: {e.args[0]}") from None
    settings = {"teacher": str(teacher_path), "students": [str(p) for p in student_paths],
                "alphas": alphas, "labels": labels, "dataset": info.name, "data_dir": data_dir,
                "split": split, "n_images": n_images, "seed": seed, "device": str(device),
                "target": target, **kwargs,
                "teacher_model": t_ck.get("model_name"), "image_indices": idx.tolist()}
    return explain_report(teacher, students, x, y, mean=info.mean, std=info.std,
                          out_dir=out_dir or "runs/explain", target=target, device=device,
                          settings=settings, **kwargs)


def size_name(ck: dict) -> str:
    """A student's size label from its checkpoint: the model name, plus ``(w=...)`` for a
    width other than 1."""
    name = str(ck.get("model_name", "model"))
    w = (ck.get("model_kwargs") or {}).get("width", 1.0)
    return name if w in (1, 1.0) else f"{name}(w={w:g})"


def unique_labels(labels: Sequence[str], paths: Sequence[str]) -> list[str]:
    """Make duplicate labels distinct: append the checkpoint's folder, then ``#i`` if needed."""
    out = list(labels)
    for i, lbl in enumerate(labels):
        if labels.count(lbl) > 1:
            out[i] = f"{lbl} [{Path(paths[i]).parent.name or Path(paths[i]).stem}]"
    for i, lbl in enumerate(list(out)):
        if out.count(lbl) > 1:
            out[i] = f"{lbl} #{i}"
    return out


def explain_report(teacher: nn.Module, students, x: torch.Tensor, y: torch.Tensor | None, *,
                   mean=None, std=None, out_dir=None, method: str = "ig", target="label",
                   grid=(4, 4), superpixel: int | None = None, k: int = 5, T: float = 1.0,
                   baseline="zeros", steps: int = 32, internal_batch_size: int | None = None,
                   layer_teacher: str | None = None, layer_student: str | None = None,
                   batch_size: int = 64, n_overlay: int = 8, device="cpu",
                   settings: dict | None = None) -> list[dict]:
    """Compare each student with ``teacher`` on images ``x`` (``[N, C, H, W]`` in ``[0, 1]``,
    normalised inside with ``mean``/``std``) and labels ``y``.

    ``students``: list of ``(label, model, meta)``; ``meta`` (a dict, may be empty) is copied into
    the row. With an ``"alpha"`` in every meta the sweep plot is drawn, one line per
    ``meta["size"]`` (default: per label); rows sharing (size, alpha), e.g. seeds, are averaged. Returns one row per
    student: ``{"student", **meta, "n_images", metric, metric + "_ci", metric + "_n", ...}``.
    With ``out_dir`` it writes explain.md / .csv / .json, per_image.csv, overlays.png and, for
    a sweep, sweep.png.
    """
    from kdlab.evaluate.alignment import compare_models
    from kdlab.evaluate.explain import attribute

    if not students:
        raise ValueError("give at least one student")
    labels = [s[0] for s in students]
    if len(set(labels)) != len(labels):
        raise ValueError(f"student labels must be distinct, got {labels}")
    rows, per_image = [], []
    for label, model, meta in students:
        summary, arrays = compare_models(
            model, teacher, (x, y), method, grid, k, target=target, layer_student=layer_student,
            layer_teacher=layer_teacher, baseline=baseline, steps=steps,
            internal_batch_size=internal_batch_size, T=T, batch_size=batch_size, mean=mean,
            std=std, superpixel=superpixel, device=device, return_per_image=True,
        )
        row = {"student": label, **dict(meta or {}), "n_images": int(x.shape[0])}
        for name, (m, ci, n) in summary.items():
            row[name], row[name + "_ci"], row[name + "_n"] = m, ci, n
            if name.startswith("ig_completeness"):
                # the relative error is heavy-tailed (it explodes where F(x) ~ F(baseline)),
                # so the median is reported beside the mean
                finite = arrays[name][np.isfinite(arrays[name])]
                row[name + "_median"] = float(np.median(finite)) if finite.size else float("nan")
        rows.append(row)
        for i in range(int(x.shape[0])):
            per_image.append({"student": label, "image": i,
                              **{name: float(a[i]) for name, a in arrays.items()}})
    if out_dir is None:
        return rows
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "explain.csv", rows)
    write_csv(out / "per_image.csv", per_image)
    atomic_write_text(out / "explain.md", markdown(rows, n_images=int(x.shape[0])) + "\n")
    atomic_write_text(out / "explain.json", json.dumps(
        {"rows": _jsonable(rows), "settings": _jsonable(settings or {
            "method": method, "target": target, "grid": list(grid), "superpixel": superpixel,
            "k": k, "T": T, "baseline": baseline if isinstance(baseline, str) else "tensor",
            "steps": steps})}, indent=2) + "\n")
    # overlays: the first n_overlay images, teacher then each student
    m = min(int(n_overlay), int(x.shape[0]))
    if m > 0:
        dev = torch.device(device)
        xs = x[:m].to(dev).float()
        xn = xs
        if mean is not None:
            mt = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
            st = torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
            xn = (xs - mt) / st
        ys = None if y is None else y[:m].to(dev)
        with torch.no_grad():
            t_pred = teacher.to(dev).eval()(xn).argmax(1)
        models = [("teacher", teacher, layer_teacher)] + [(lbl, mdl, layer_student) for lbl, mdl, _ in students]
        maps = {}
        for name, model, layer in models:
            with torch.no_grad():
                pred = model.to(dev).eval()(xn).argmax(1)
            tgt = {"label": ys, "teacher": t_pred, "pred": pred}.get(target, target) \
                if isinstance(target, str) else target
            if tgt is None:
                raise ValueError("target='label' needs labels")
            maps[name] = attribute(model, xn, tgt, method, layer=layer, baseline=baseline,
                                   steps=steps, internal_batch_size=internal_batch_size).cpu()
        titles = [(f"y={int(ys[i])} " if ys is not None else "") + f"t={int(t_pred[i])}"
                  for i in range(m)]
        from kdlab.report.overlays import overlay_grid

        overlay_grid(xs.cpu(), maps, out / "overlays.png", n=m, titles=titles, attribution=method)
    if all("alpha" in r for r in rows):
        from kdlab.report.overlays import plot_sweep

        sweep_rows = [{**r, "student": r.get("size", r["student"])} for r in rows]
        st = settings or {}
        plot_sweep(sweep_rows, out / "sweep.png", teacher=st.get("teacher_model") or st.get("teacher"),
                   dataset=st.get("dataset"))
    return rows


def _fmt(m, ci, n=None, n_all=None) -> str:
    if m is None or not math.isfinite(m):
        return "—"
    f = ".2e" if 0 < abs(m) < 1e-3 else ".3f"
    s = format(m, f)
    if ci is not None and math.isfinite(ci):
        s += " ± " + format(ci, ".2e" if 0 < abs(ci) < 1e-3 else ".3f")
    if n is not None and n_all is not None and n < n_all:
        s += f" (n={n})"
    return s


def markdown(rows: list[dict], n_images: int | None = None) -> str:
    """Markdown table: one row per student, metrics as ``mean ± 95% CI`` (``(n=...)`` when some
    images were excluded because the metric is undefined there)."""
    metrics = [m for m in TABLE_METRICS if any(m in r for r in rows)]
    has_alpha = any("alpha" in r for r in rows)
    head = ["student"] + (["alpha"] if has_alpha else []) + metrics
    body = []
    for r in rows:
        cells = [str(r["student"])]
        if has_alpha:
            cells.append(str(r.get("alpha", "—")))
        cells += [_fmt(r.get(m), r.get(m + "_ci"), r.get(m + "_n"), n_images)
                  + (f" (median {r[m + '_median']:.2e})" if m + "_median" in r else "")
                  for m in metrics]
        body.append(cells)
    return markdown_table(head, body)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj
