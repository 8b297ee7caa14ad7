"""Where the students look: the explanation metrics applied to a finished study.

For every method of a study (``<study>/<method>/seed<k>/best.pt``) and the teacher its runs
distilled from (``teacher.checkpoint`` in the runs' recipe), on the same fixed test images:

* attention rank alignment – Spearman of the student's and the teacher's part importances
  (attribution mass per cell of a ``grid``), :func:`kdlab.evaluate.alignment.rank_alignment`;
* focus on the teacher's top-k parts – the share of the student's attribution mass inside the k
  cells the teacher ranks highest (:func:`~kdlab.evaluate.alignment.topk_fraction`, in [0, 1];
  the unbounded inside/outside ratio :func:`~kdlab.evaluate.alignment.topk_focus` is kept too);
* logit agreement – Spearman of the logit vectors (``logit_alignment``), top-1 agreement and
  ``KL(p_teacher ‖ p_student)``; and the student's accuracy on those images.

Each (method, seed) gives one number per metric: the mean over the images where the metric is
defined. Over seeds: mean and 95% t-interval; against the baseline: the paired t-test and
Wilcoxon p, Holm-adjusted over the methods (per metric), and d_z
(:mod:`kdlab.report.statistics`). Teacher attributions are computed once and shared.

Writes ``<study>/report/explain_study.{md,csv,json}``, ``explain_study.png/.pdf`` (each metric per
method with its interval and the per-seed values) and ``explain_overlays.png/.pdf`` (teacher and
each method's seed-``overlay_seed`` student on the first images, colour bar, method names).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from kdlab.core.io import atomic_write_text, read_json

__all__ = ["explain_study", "STUDY_METRICS", "default_grid"]

#: metrics reported per method (table order); the figure shows the first five
STUDY_METRICS = ("rank_alignment", "topk_fraction", "logit_alignment", "top1_agreement",
                 "kl_to_teacher", "topk_focus", "student_acc")


def default_grid(image_size: int) -> tuple[int, int]:
    """Parts for attention alignment: a 4x4 grid on images up to 16 px (2x2-pixel cells on the
    8x8 digits), 7x7 above (4x4-pixel cells on 28x28 MNIST)."""
    return (4, 4) if image_size <= 16 else (7, 7)


def _seed_of(p: Path) -> int:
    s = p.name[4:]
    if not (p.name.startswith("seed") and s.isdigit()):
        raise ValueError(f"run directory {p} is not named seed<k>")
    return int(s)


def _study_runs(study_dir: Path) -> tuple[dict[str, dict[int, Path]], str]:
    if not study_dir.is_dir():
        what = "is a file, not a study folder" if study_dir.exists() else "not found"
        raise FileNotFoundError(f"study folder {study_dir} {what}; give the --out folder of a finished "
                                f"`kdlab ablate`")
    tj = study_dir / "report" / "table.json"
    only: dict[str, set] = {}
    if tj.is_file():  # the table's seeds: runs of other seeds lying in the folder are not the study's
        table = read_json(tj, "study table", need=("methods", "baseline"), fix=f"rebuild it with `kdlab report {study_dir}`")
        methods, baseline = [r["method"] for r in table["methods"]], table["baseline"]
        only = {r["method"]: {int(s) for s in r.get("seeds", [])} for r in table["methods"] if r.get("seeds")}
    else:
        methods = sorted(p.name for p in study_dir.iterdir() if p.is_dir() and any(p.glob("seed*/best.pt")))
        baseline = "baseline" if "baseline" in methods else (methods[0] if methods else "")
    runs = {}
    for m in methods:
        found = {_seed_of(p.parent): p for p in (study_dir / m).glob("seed*/best.pt")
                 if m not in only or _seed_of(p.parent) in only[m]}
        if found:
            runs[m] = dict(sorted(found.items()))
    if not runs:
        raise FileNotFoundError(f"no <method>/seed<k>/best.pt under {study_dir}; run `kdlab ablate` first")
    return runs, baseline


def _resolve_teacher(study_dir: Path, runs: dict, teacher) -> Path:
    if teacher is not None:
        p = Path(teacher)
        if not p.is_file():
            raise FileNotFoundError(f"teacher checkpoint {p} not found; pass the teacher's best.pt")
        return p
    recipe = None
    for seeds in runs.values():
        for best in seeds.values():
            rj = best.parent / "run.json"
            if rj.is_file():
                recipe = read_json(rj, "run record").get("recipe")
                if recipe and (recipe.get("teacher") or {}).get("checkpoint"):
                    break
        if recipe and (recipe.get("teacher") or {}).get("checkpoint"):
            break
    ck = ((recipe or {}).get("teacher") or {}).get("checkpoint")
    if not ck:
        raise FileNotFoundError(f"no run under {study_dir} records a teacher checkpoint; pass teacher=PATH")
    cands = [Path(ck)] if Path(ck).is_absolute() else [Path.cwd() / ck, study_dir / ck, study_dir.parent / ck]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"the study's teacher checkpoint {ck} is not found (looked in "
                            f"{', '.join(str(c.parent) for c in cands)}); pass teacher=PATH "
                            f"(or run from the directory the study ran in)")


def pick_test_images(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """``min(n, n_total)`` distinct test indices, drawn with ``torch.Generator().manual_seed(seed)``
    and sorted (the same images for every method and seed)."""
    if n < 1:
        raise ValueError(f"n_images must be >= 1, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[: min(n, n_total)].sort().values


def overlay_indices(y: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` positions into ``y`` covering as many classes as possible: the first image of each
    class in order of appearance, then the following images in order."""
    first, seen = [], set()
    for i, c in enumerate(y.tolist()):
        if c not in seen:
            seen.add(c)
            first.append(i)
    rest = [i for i in range(len(y)) if i not in set(first)]
    return torch.as_tensor((first + rest)[:n], dtype=torch.long)


def _per_image(student, teacher_logits, imp_t, x, y, *, method, grid, k, steps, T, batch_size):
    """Per-image metric arrays of one student against the (precomputed) teacher."""
    from kdlab.evaluate import alignment as al
    from kdlab.evaluate.explain import attribute, region_importance

    per: dict[str, list] = {}
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        tl, it = teacher_logits[i:i + batch_size], imp_t[i:i + batch_size]
        with torch.no_grad():
            sl = student(xb)
        amap = attribute(student, xb, yb, method, steps=steps)
        imp_s = region_importance(amap, grid)
        vals = {
            "rank_alignment": al.rank_alignment(imp_s, it),
            "topk_fraction": al.topk_fraction(imp_s, it, k),
            "topk_focus": al.topk_focus(imp_s, it, k),
            "logit_alignment": al.logit_alignment(sl, tl),
            "top1_agreement": al.top1_agreement(sl, tl),
            "kl_to_teacher": al.kl_to_teacher(sl, tl, T),
            "student_acc": (sl.argmax(1) == yb).double(),
        }
        for name, v in vals.items():
            per.setdefault(name, []).append(torch.as_tensor(v).detach().double().cpu().reshape(-1))
    return {name: torch.cat(parts).numpy() for name, parts in per.items()}


def _fmt(m, ci, digits=3) -> str:
    if m is None or not math.isfinite(m):
        return "—"
    s = f"{m:.{digits}f}"
    return s + (f" ± {ci:.{digits}f}" if ci is not None and math.isfinite(ci) else "")


def explain_study(study_dir, *, teacher=None, n_images: int = 200, method: str = "ig",
                  grid: Optional[Sequence[int]] = None, k: Optional[int] = None, steps: int = 16,
                  T: float = 1.0, image_seed: int = 0, batch_size: int = 100, n_overlay: int = 6,
                  overlay_seed: Optional[int] = None, data_dir=None, device: str = "cpu",
                  methods: Optional[Sequence[str]] = None, log=print, progress: bool = True) -> dict:
    """Alignment of every study student with the teacher, per method with intervals over seeds
    (``progress``: a bar over the students, plain lines when piped; :mod:`kdlab.core.progress`).

    ``teacher``: a checkpoint path (default: the ``teacher.checkpoint`` the runs recorded,
    resolved against the current directory, the study directory and its parent).
    ``n_images`` test images (fixed by ``image_seed``), attributions ``method`` (``"ig"`` with
    ``steps`` points, ``"saliency"``, or ``"gradcam"`` at each model's last stage) for the true
    label; parts: a ``grid`` (default :func:`default_grid`) and the teacher's top ``k`` cells
    (default ``round(0.3 · cells)``: 5 of 16, 15 of 49). Returns ``{"rows", "settings", "paths"}``;
    each row has per metric ``metric`` (mean over seeds), ``metric_ci`` (95% t half-width),
    ``metric_seeds`` and, except for the baseline, ``metric_diff``, ``metric_p_ttest``,
    ``metric_p_wilcoxon``, ``metric_p_holm``, ``metric_d_z``.
    """
    from kdlab.models.adapters import load_model
    from kdlab.data import load_dataset, normalize
    from kdlab.evaluate.explain import attribute, region_importance
    from kdlab.report.figures import alignment_plot, study_title
    from kdlab.report.overlays import overlay_grid
    from kdlab.report.statistics import compare_to_baseline, t_interval
    from kdlab.report.tables import fmt_p, markdown_table, write_csv

    study_dir = Path(study_dir)
    from kdlab.core.io import check_out_dir

    _study_runs(study_dir)  # a missing study folder is named as such, not as an unwritable one
    check_out_dir(study_dir / "report", "study report folder")  # before the attributions
    runs, baseline = _study_runs(study_dir)
    if methods is not None:
        missing = [m for m in methods if m not in runs]
        if missing:
            raise KeyError(f"methods {missing} have no runs in {study_dir}; pick from {list(runs)}")
        runs = {m: runs[m] for m in methods}
    dev = torch.device(device)
    t_path = _resolve_teacher(study_dir, runs, teacher)
    t_model, t_ck = load_model(t_path, dev)
    first = next(iter(next(iter(runs.values())).values()))
    _, s_ck = load_model(first, "cpu")
    recipe = s_ck.get("recipe") or {}
    if not recipe and (first.parent / "run.json").is_file():
        recipe = read_json(first.parent / "run.json", "run record").get("recipe") or {}
    d = dict(recipe.get("data") or {})
    d.setdefault("name", s_ck.get("dataset"))
    if not d.get("name"):
        raise ValueError(f"{first} records no data set; it is not a kdlab study run")
    splits = load_dataset(d["name"], data_dir or d.get("data_dir"), val_fraction=d.get("val_fraction", 0.1))
    info = splits.info
    if t_ck.get("num_classes") != info.num_classes:
        raise ValueError(f"teacher {t_path} has {t_ck.get('num_classes')} classes, the study's data "
                         f"{info.num_classes}; pass the study's teacher")
    grid = tuple(int(g) for g in (grid or default_grid(info.image_size)))
    cells = grid[0] * grid[1]
    k = int(k if k is not None else max(1, round(0.3 * cells)))
    idx = pick_test_images(len(splits.test.y), n_images, image_seed)
    raw = splits.test.x[idx].float().to(dev)
    y = splits.test.y[idx].long().to(dev)
    x = normalize(raw, info.mean, info.std)
    log(f"explain study {study_dir}: {sum(len(s) for s in runs.values())} students x {len(idx)} test "
        f"images, {method} attributions, grid {grid[0]}x{grid[1]}, top-{k}; teacher {t_path}")

    t_logits, t_imp = [], []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        with torch.no_grad():
            t_logits.append(t_model(xb))
        t_imp.append(region_importance(attribute(t_model, xb, yb, method, steps=steps), grid))
    t_logits, t_imp = torch.cat(t_logits), torch.cat(t_imp)
    teacher_acc = float((t_logits.argmax(1) == y).double().mean())

    per_seed: dict[str, dict[str, dict[int, float]]] = {}  # metric -> method -> seed -> value
    per_run = []
    models_for_overlay = {}
    ov_seed = overlay_seed
    from kdlab.core.progress import progress_bar

    bar = progress_bar(sum(len(v) for v in runs.values()), "explain", "student", enabled=progress)
    for m, seeds in runs.items():
        for s, path in seeds.items():
            model, _ = load_model(path, dev)
            arr = _per_image(model, t_logits, t_imp, x, y, method=method, grid=grid, k=k,
                             steps=steps, T=T, batch_size=batch_size)
            row = {"method": m, "seed": s}
            for name in STUDY_METRICS:
                v = arr[name][np.isfinite(arr[name])]
                row[name] = float(v.mean()) if v.size else float("nan")
                row[name + "_n"] = int(v.size)
                per_seed.setdefault(name, {}).setdefault(m, {})[s] = row[name]
            per_run.append(row)
            bar.update(1)
            if ov_seed is None:
                ov_seed = s
            if s == ov_seed:
                models_for_overlay[m] = model
        log(f"  {m:<14} {len(seeds)} seeds: rank alignment "
            f"{np.mean(list(per_seed['rank_alignment'][m].values())):.3f}, top-{k} share "
            f"{np.mean(list(per_seed['topk_fraction'][m].values())):.3f}")

    bar.close()
    rows = []
    for m in runs:
        r = {"method": m, "n_seeds": len(runs[m])}
        for name in STUDY_METRICS:
            vals = per_seed[name][m]
            mean, sd, ci = t_interval(vals.values())
            r[name], r[name + "_sd"], r[name + "_ci"] = mean, sd, ci
            r[name + "_seeds"] = [vals[s] for s in sorted(vals)]
        rows.append(r)
    if baseline in runs:
        for name in STUDY_METRICS:
            tests = compare_to_baseline(per_seed[name], baseline, delta=None)
            for r in rows:
                t = tests.get(r["method"])
                if t is None:
                    continue
                r[name + "_diff"], r[name + "_diff_ci"] = t["mean"], t["ci"]
                r[name + "_p_ttest"], r[name + "_p_wilcoxon"] = t["p_ttest"], t["p_wilcoxon"]
                r[name + "_p_holm"], r[name + "_d_z"] = t["p_holm"], t["d_z"]
                r[name + "_holm_reject"] = bool(math.isfinite(t["p_holm"]) and t["p_holm"] < 0.05)

    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    seeds_all = sorted({s for v in runs.values() for s in v})
    settings = {"teacher": str(t_path), "teacher_model": t_ck.get("model_name"),
                "teacher_acc_on_images": teacher_acc, "dataset": info.name,
                "n_images": int(len(idx)), "image_seed": image_seed, "method": method,
                "steps": steps, "grid": list(grid), "k": k, "T": T, "target": "label",
                "baseline": baseline, "seeds": seeds_all}
    head = ["method", "seeds", "rank alignment ρ", f"top-{k} share", "logit ρ", "top-1 agree",
            "KL(t‖s)", "acc (images)", f"Δ rank ρ vs {baseline}", "p Holm", f"Δ top-{k} vs {baseline}",
            "p Holm", f"Δ logit ρ vs {baseline}", "p Holm"]
    body = []
    for r in rows:
        cells_ = [r["method"], r["n_seeds"]] + [_fmt(r[n], r[n + "_ci"]) for n in
                                               ("rank_alignment", "topk_fraction", "logit_alignment",
                                                "top1_agreement", "kl_to_teacher", "student_acc")]
        for n in ("rank_alignment", "topk_fraction", "logit_alignment"):
            if n + "_diff" in r:
                star = " *" if r[n + "_holm_reject"] else ""
                cells_ += [_fmt(r[n + "_diff"], r[n + "_diff_ci"]) + star, fmt_p(r[n + "_p_holm"])]
            else:
                cells_ += ["—", "—"]
        body.append(cells_)
    md = markdown_table(head, body)
    note = (f"Alignment with the teacher ({t_ck.get('model_name')}, {100 * teacher_acc:.1f}% on these "
            f"images) on {len(idx)} test images of {info.name} (image seed {image_seed}); "
            f"{method} attributions for the true label, parts = a {grid[0]}x{grid[1]} grid, top-{k} = "
            f"the teacher's {k} highest cells. Per run: mean over images; shown: mean ± 95% t "
            f"half-width over seeds {seeds_all}. Δ: paired difference to '{baseline}', p Holm: paired "
            f"t-test Holm-adjusted over the {len(rows) - 1} methods (per metric); * = Holm p < 0.05. "
            f"Spearman ρ in [−1, 1]; top-{k} share in [0, 1] (chance {k / cells:.2f}); KL in nats.")
    atomic_write_text(out / "explain_study.md", md + "\n\n" + note + "\n")
    write_csv(out / "explain_study.csv", [{k_: v for k_, v in r.items() if not k_.endswith("_seeds")}
                                          for r in rows])
    write_csv(out / "explain_study_runs.csv", per_run)
    atomic_write_text(out / "explain_study.json", json.dumps(
        {"rows": rows, "runs": per_run, "settings": settings}, indent=2))
    title = study_title(recipe, seeds_all, len(idx))
    paths = {"table": out / "explain_study.md"}
    paths["figure"] = alignment_plot(
        rows, out / "explain_study", STUDY_METRICS[:5],
        title=f"where the students look: alignment with teacher {t_ck.get('model_name')}, mean and 95% CI "
              f"over seeds (dots: seeds; red: Holm p < 0.05 vs {baseline})\n{title} · {method}, "
              f"{grid[0]}x{grid[1]} grid, top-{k}")
    if n_overlay > 0:
        n_ov = min(n_overlay, len(idx))
        sel = overlay_indices(y.cpu(), n_ov)
        xo, yo = x[sel], y[sel]
        maps = {f"teacher\n{t_ck.get('model_name')}": attribute(t_model, xo, yo, method, steps=steps).cpu()}
        for m, model in models_for_overlay.items():
            maps[f"{m}\n{s_ck.get('model_name')} s{ov_seed}"] = attribute(model, xo, yo, method, steps=steps).cpu()
        with torch.no_grad():
            t_pred = t_model(xo).argmax(1)
        paths["overlays"] = overlay_grid(
            raw[sel].cpu(), maps, out / "explain_overlays.png", n=n_ov,
            titles=[f"y={int(a)} t={int(b)}" for a, b in zip(yo, t_pred)], attribution=method,
            title=f"{title}; columns: teacher, then each method's student (seed {ov_seed})")
    log("")
    log(md)
    log(note)
    log(f"explain report: {out / 'explain_study.md'}, figures {paths['figure']}, "
        f"{paths.get('overlays', '')} (+ .pdf)")
    if (out / "table.md").is_file():  # the study page shows where the students look
        from kdlab.report.page import write_study_page

        write_study_page(out, study_dir, log=log)
    return {"rows": rows, "runs": per_run, "settings": settings,
            "paths": {k_: str(v) for k_, v in paths.items()}}
