"""The explanation sweep: KD strength α × student size against one teacher.

α is the weight of the distillation term, as everywhere in kdlab (the study's KD recipe too):
``loss = (1 − α)·CE + α·T²·KL``; α = 0 is plain cross-entropy (no KD). For every student size
and α, students are trained over seeds with the study machinery (same data order and
augmentation for all), then compared with the teacher: accuracy, attention rank alignment,
focus on the teacher's top-k parts, logit alignment, top-1 agreement and KL to the teacher
(`kdlab.evaluate.alignment`), with plots against α per student and an overlay picture.

Two intervals: ``explain.md`` has one row per (student, α, seed) whose ± is the 95% interval
over the *images* of that one model; ``sweep_table.md`` (`seed_table`) has one row per
(student, α) whose ± is the 95% t-interval over the *seeds* (each seed's value being its mean
over the images) -- the spread a reader should compare methods by, and the interval
``sweep.png`` draws. With one seed the interval over seeds is undefined and the table shows the
per-image interval instead, marked "(images)".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from kdlab.core.io import atomic_write_text, read_json
from kdlab.train.recipe import load_recipe


SEED_TABLE_METRICS = ("test_acc_full", "student_acc", "rank_alignment", "topk_focus",
                      "logit_alignment", "top1_agreement", "kl_to_teacher")


def seed_table(rows: Sequence[dict], metrics: Sequence[str] = SEED_TABLE_METRICS) -> list[dict]:
    """One row per (student size, α), aggregating the per-seed rows of `explain_report`.

    For each metric with per-seed values v_1..v_n: ``metric`` = mean, ``metric_sd_seeds`` =
    sample sd, ``metric_ci_seeds`` = ``t_{0.975, n-1} · sd / √n`` (NaN for n < 2; see
    `kdlab.report.tables.mean_sd_ci`) and ``metric_ci_images`` = the mean over seeds of each
    seed's per-image half-width (``metric_ci`` of the input rows), for comparison.
    """
    from kdlab.report.tables import mean_sd_ci

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r.get("size", r.get("student"))), float(r["alpha"])), []).append(r)
    out = []
    for (size, alpha), grp in groups.items():
        row = {"student": size, "alpha": alpha, "n_seeds": len(grp),
               "seeds": [g.get("seed") for g in grp], "n_images": grp[0].get("n_images")}
        for m in metrics:
            vals = [float(g[m]) for g in grp if m in g and g[m] is not None]
            if not vals:
                continue
            mean, sd, ci = mean_sd_ci(vals)
            per_image = [float(g[m + "_ci"]) for g in grp
                         if g.get(m + "_ci") is not None and math.isfinite(float(g[m + "_ci"]))]
            row[m], row[m + "_sd_seeds"], row[m + "_ci_seeds"] = mean, sd, ci
            row[m + "_ci_images"] = sum(per_image) / len(per_image) if per_image else float("nan")
        out.append(row)
    return out


def _cell(mean: float, ci_seeds: float, ci_images: float) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    if math.isfinite(ci_seeds):
        return f"{mean:.3f} ± {ci_seeds:.3f}"
    if math.isfinite(ci_images):
        return f"{mean:.3f} ± {ci_images:.3f} (images)"
    return f"{mean:.3f}"


def seed_table_markdown(table: Sequence[dict], metrics: Sequence[str] = SEED_TABLE_METRICS) -> str:
    """`seed_table` as Markdown, with the note saying which interval ± is."""
    from kdlab.report.tables import markdown_table

    metrics = [m for m in metrics if any(m in r for r in table)]
    head = ["student", "alpha", "seeds"] + metrics
    body = [[r["student"], f"{r['alpha']:g}", r["n_seeds"]]
            + [_cell(r.get(m, float("nan")), r.get(m + "_ci_seeds", float("nan")),
                     r.get(m + "_ci_images", float("nan"))) for m in metrics]
            for r in table]
    n = sorted({r["n_seeds"] for r in table})
    note = ("± is the 95% t-interval over seeds (each seed's value is its mean over the "
            f"{table[0].get('n_images')} images; test_acc_full is on the whole test set); "
            "'(images)' marks a single seed, where the interval is over images instead. "
            "The per-image interval within one seed is in explain.md and is narrower than the "
            "spread between seeds.") if table else ""
    if n and n[0] < 2:
        note += " Rows with one seed have no interval over seeds: run more seeds (--seeds)."
    return markdown_table(head, body) + "\n\n" + note


def sweep_recipes(base, alphas, students, T: float = 4.0) -> dict:
    """name -> recipe for each (student model, α)."""
    from kdlab.models import model_kwargs

    out = {}
    for s in students:
        try:
            model_kwargs(s)  # an unknown name fails before anything is trained or written
        except KeyError as e:
            raise ValueError(f"--students: {e.args[0]}") from None
        for a in alphas:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha {a} is outside [0, 1] (it is the weight of the KD term; 0 = no KD)")
            loss = []
            if a < 1:
                loss.append({"term": "ce", "weight": 1.0 - a})
            if a > 0:
                loss.append({"term": "kd", "weight": a, "T": T})
            out[f"{s}@a={a:g}"] = base.derive(student={"model": s, "kwargs": {}}, loss=loss, mask=None,
                                              name=f"{base.name}-sweep")
    return out


def run_sweep(recipe_ref="digits/kd", *, alphas=(0.0, 0.5, 0.9), students=("cnn_tiny", "cnn_small", "cnn_medium"),
              seeds=None, out_dir=None, data_dir=None, overrides=None, n_images=256, method="ig",
              grid=(4, 4), k=5, steps=32, T: float = 4.0, image_seed: int = 0, progress=True, log=print,
              **parallel):
    from kdlab.models.adapters import load_model
    from kdlab.data import load_dataset
    from kdlab.evaluate.explain_report import explain_report, markdown, pick_images
    from kdlab.experiments.study import run_study
    from kdlab.train.build import check_can_train, ensure_teachers, load_teacher, with_data_dir
    from kdlab.core.device import resolve_device

    base = with_data_dir(load_recipe(recipe_ref, overrides), data_dir)
    if base.teacher is None:
        raise ValueError(f"recipe '{recipe_ref}' has no teacher; the sweep distils from one")
    seeds = list(seeds) if seeds else list(base.study.seeds)
    out_dir = Path(out_dir or f"runs/{base.name}-sweep")
    from kdlab.core.io import check_out_dir

    recipes = sweep_recipes(base, alphas, students, T)
    check_out_dir(out_dir, "sweep folder", create=False)  # made by the study
    check_can_train(base)  # the device, before the header prints or the teacher trains
    log(f"sweep: {len(students)} students x alphas {list(alphas)} x seeds {list(seeds)} -> {out_dir}")
    ensure_teachers(base, data_dir=data_dir, progress=progress, log=log)
    first = next(iter(recipes))
    run_study(recipes, out_dir / "runs", seeds=list(seeds), progress=progress, log=log, baseline=first, **parallel)

    d = base.data
    splits = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction)
    info = splits.info
    device = resolve_device(base.train.device)
    teacher = load_teacher(base, info, device)
    idx = torch.as_tensor(pick_images(len(splits.test.y), n_images, image_seed))
    x, y = splits.test.x[idx], splits.test.y[idx]
    students_ = []
    for name, r in recipes.items():
        s_model, a = name.split("@a=")
        for seed in seeds:
            run = out_dir / "runs" / name / f"seed{seed}"
            model, _ = load_model(run / "best.pt", device)
            res = read_json(run / "result.json", "run result", need=("test_acc",))
            students_.append((f"{s_model} a={a} s{seed}", model,
                              {"alpha": float(a), "size": s_model, "seed": seed,
                               "test_acc_full": res["test_acc"]}))
    log(f"explaining {len(students_)} students on {len(idx)} test images ({method}, grid {grid}, k={k})")
    rows = explain_report(teacher, students_, x, y, mean=info.mean, std=info.std,
                          out_dir=out_dir / "explain", method=method, grid=tuple(grid), k=k,
                          steps=steps, device=device,
                          settings={"recipe": base.source, "teacher_model": base.teacher.model,
                                    "dataset": d.name, "alphas": list(alphas),
                                    "students": list(students), "seeds": list(seeds),
                                    "image_seed": image_seed, "T": T})
    table = seed_table(rows)
    table_md = seed_table_markdown(table)
    from kdlab.report.tables import write_csv

    write_csv(out_dir / "explain" / "sweep_table.csv",
              [{k: v for k, v in r.items() if k != "seeds"} for r in table])
    atomic_write_text(out_dir / "explain" / "sweep_table.md", table_md + "\n")
    atomic_write_text(out_dir / "explain" / "sweep_table.json", json.dumps(
        [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
         for r in table], indent=2) + "\n")
    log("")
    log(markdown(rows, len(idx)))
    log("")
    log(table_md)
    log(f"sweep report: {out_dir / 'explain'} (explain.md: per seed, intervals over images; "
        f"sweep_table.md: intervals over seeds; sweep.png, overlays.png)")
    return rows
