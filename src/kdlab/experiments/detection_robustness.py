"""``kdlab robustness`` on detectors: mAP under the image corruptions (:mod:`kdlab.evaluate.
detection_robustness`) of detection checkpoints, or of the teacher and every (method, seed) of a
finished detection study (:func:`study_detection_robustness`, ``kdlab robustness --study``).

The test images are the recipe's own test split (read from the checkpoint's recipe: for
``mnist-canvas`` the seed-independent test scenes, for ``coco`` the annotation file's test split);
they are corrupted on the fly, the boxes are left as they are."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from kdlab.core.io import atomic_write_text
from kdlab.evaluate.detection_robustness import checkpoint_split, is_detection_checkpoint


def checkpoints_detection_robustness(paths: Sequence[str], names: Sequence[str], *, reference=None,
                                     corruptions="all", severities=(1, 2, 3, 4, 5), seed: int = 0,
                                     batch_size: int = 100, device="cpu", limit=None, data_dir=None,
                                     out_dir=None, progress: bool = True):
    """mAP under corruption of detection checkpoints (all trained on the same data: the first
    one's recipe gives the test images); ``(result, written paths)``."""
    from kdlab.models.adapters import load_model
    from kdlab.evaluate.detection_robustness import evaluate_detection_robustness

    models, cks = {}, []
    for name, path in zip(names, paths):
        model, ck = load_model(path, device)
        if not is_detection_checkpoint(ck):
            raise ValueError(f"{path} is not a detection checkpoint while {paths[0]} is; evaluate detectors and "
                             f"classifiers in separate kdlab robustness commands")
        models[name] = model
        cks.append(ck)
    data = [c["recipe"]["data"] for c in cks]
    for path, d in zip(paths[1:], data[1:]):
        if d != data[0]:
            raise ValueError(f"{path} was trained on other data than {paths[0]} ({d.get('name')} "
                             f"{d.get('kwargs')}); robustness compares detectors on one test set")
    test, info = checkpoint_split(cks[0], data_dir, limit)
    reference = reference or ("baseline" if "baseline" in models else names[0])
    if reference not in models:
        raise ValueError(f"--reference {reference!r} is not one of the names: {', '.join(names)}")
    res = evaluate_detection_robustness(models, test, info, corruptions, severities, seed, batch_size, device,
                                        reference=reference, progress=progress)
    res.settings.update({"checkpoints": dict(zip(names, map(str, paths))), "limit": limit})
    return res, res.write(out_dir or "runs/robustness")


#: per-seed numbers aggregated into the study table (mean, sd and 95% t half-width over seeds)
STUDY_KEYS = ("clean_map", "mPC", "rPC", "mCE", "mPC50", "rPC50", "mPC_extra", "rPC_extra", "mCE_extra")


def _teacher_checkpoint(study_dir: Path, methods: Sequence[str], seeds: Sequence[int]):
    """The teacher checkpoint the study's distilled runs name (None when none exists)."""
    for m in methods:
        for s in seeds:
            p = study_dir / m / f"seed{s}" / "best.pt"
            if not p.is_file():
                continue
            from kdlab.core.checkpoint import load_checkpoint

            t = (load_checkpoint(p).get("recipe") or {}).get("teacher") or {}
            if t.get("checkpoint") and Path(t["checkpoint"]).is_file():
                return Path(t["checkpoint"])
    return None


def study_detection_robustness(study_dir, table: dict, *, corruptions="all", severities=(1, 2, 3, 4, 5),
                               seed: int = 0, batch_size: int = 100, device: str = "cpu", data_dir=None,
                               limit=None, progress: bool = True, log=print) -> dict:
    """Robustness of the teacher and every (method, seed) student of a finished detection study.

    Per study seed, the methods' best checkpoints (and the teacher, evaluated once and reused) are
    scored on the same corrupted test images (draws seeded by ``seed``), with mCE relative to the
    baseline of the same seed (``report/robustness/seed<k>/``). The study table gains, per method,
    the mean over seeds of clean mAP, mPC, rPC, mCE (and mPC@.5, rPC@.5, the extra corruptions'
    forms) with their sd and 95% t half-width (``mPC_sd``, ``mPC_ci95``, ...) and
    ``n_robust_seeds``; ``report/robustness.md`` holds the robustness table with the paired Δ to
    the baseline and Holm p per measure; ``report/robustness_heatmap.png`` the corruption x method
    mAP. Returns the study table (:func:`kdlab.report.tables.write_tables`)."""
    from kdlab.models.adapters import load_model
    from kdlab.data.corruptions import split_standard
    from kdlab.evaluate.detection_robustness import evaluate_detection_robustness
    from kdlab.experiments.study import load_seed_models
    from kdlab.report.tables import mean_sd_ci

    def aggregate_over_seeds(values):  # (mean, sd, 95% t half-width) of the finite values
        return mean_sd_ci([v for v in values if v is not None and math.isfinite(v)])
    from kdlab.report.detection_robustness import paired_rows, robustness_heatmap, study_markdown
    from kdlab.report.tables import write_tables

    study_dir = Path(study_dir)
    stats, baseline = table["methods"], table["baseline"]
    methods = [r["method"] for r in stats]
    seeds = sorted({s for r in stats for s in r["seeds"]})
    teacher_ck = _teacher_checkpoint(study_dir, methods, seeds)
    per = {m: {**{k: {} for k in STUDY_KEYS}, "by_c": []} for m in methods}
    teacher_res, teacher_row, test, info, corrs = None, None, None, None, []
    for s in seeds:
        models, cks = load_seed_models(study_dir, stats, s, device)
        if not models:
            continue
        if test is None:
            test, info = checkpoint_split(next(iter(cks.values())), data_dir, limit)
        known = {}
        if teacher_ck is not None:
            if teacher_res is None:
                models["teacher"], _ = load_model(teacher_ck, device)
            else:
                models["teacher"] = None
                known["teacher"] = teacher_res
        ref = baseline if baseline in models else next(iter(models))
        log(f"robustness, study seed {s}: {len(models) - (teacher_ck is not None)} methods"
            f"{' + teacher' if teacher_ck is not None else ''}, reference '{ref}'")
        res = evaluate_detection_robustness(models, test, info, corruptions, severities, seed=seed,
                                            batch_size=batch_size, device=device, reference=ref, known=known,
                                            progress=progress,
                                            out_dir=study_dir / "report" / "robustness" / f"seed{s}")
        if teacher_ck is not None and teacher_res is None:
            teacher_res = res
        corrs = res.corruptions
        met = res.metrics
        for m in models:
            if m == "teacher":  # one run; its mCE is relative to each seed's baseline: mean over seeds
                teacher_ce = (teacher_row or {}).get("_ce", []) + [met[m]["mCE"]]
                teacher_row = {**met[m], "_ce": teacher_ce, "mCE": float(np.mean(teacher_ce))}
                continue
            for k in STUDY_KEYS:
                per[m][k][s] = met[m][k]
            per[m]["by_c"].append(met[m]["map_by_corruption"])
    if test is None:
        raise FileNotFoundError(f"no best.pt under {study_dir}/<method>/seed<k>/; run the study first")
    for r in stats:
        p = per[r["method"]]
        if not p["mPC"]:
            continue
        for k in STUDY_KEYS:
            r[k], r[k + "_sd"], r[k + "_ci95"] = aggregate_over_seeds(list(p[k].values()))
        r["n_robust_seeds"] = len(p["mPC"])
    mean = lambda v: aggregate_over_seeds(v)[0]  # noqa: E731
    heat = {m: {c: mean([bc[c] for bc in per[m]["by_c"]]) for c in corrs} for m in methods if per[m]["by_c"]}
    spread = {m: {c: aggregate_over_seeds([bc[c] for bc in per[m]["by_c"]])[1] for c in corrs} for m in heat}
    clean = {m: mean(list(per[m]["clean_map"].values())) for m in heat}
    if teacher_row is not None:
        heat = {"teacher": teacher_row["map_by_corruption"], **heat}
        spread = {"teacher": {c: math.nan for c in corrs}, **spread}
        clean = {"teacher": teacher_row["clean_map"], **clean}
    robustness_heatmap(heat, study_dir / "report" / "robustness_heatmap.png", clean=clean, spread=spread,
                       title=f"mAP@[.5:.95] (%) under corruption: mean over severities, then mean ± sd over "
                             f"{len(seeds)} seed(s)")
    tests = paired_rows({k: {m: per[m][k] for m in methods if per[m][k]} for k in ("mPC", "rPC", "mCE")},
                        methods, baseline)
    for r in stats:
        for k, t in tests.items():
            if r["method"] in t:
                r[f"{k}_diff_vs_{baseline}"] = t[r["method"]]["mean"]
                r[f"{k}_diff_vs_{baseline}_ci95"] = t[r["method"]]["ci"]
                r[f"{k}_p_holm"] = t[r["method"]]["p_holm"]
    std, extra = split_standard(corrs)
    atomic_write_text(study_dir / "report" / "robustness.md",
                      study_markdown(stats, tests, baseline, len(seeds), extra, len(std), teacher_row))
    meta = {k: table[k] for k in ("task", "metric", "secondary", "sample_unit", "teacher", "notes", "aliases",
                                  "extra") if k in table}
    report = write_tables(study_dir / "report", stats, baseline, table.get("wall_time_s"), log, meta=meta)
    from kdlab.report.page import write_study_page

    write_study_page(study_dir / "report", study_dir, log=log)
    log(f"robustness table: {study_dir / 'report' / 'robustness.md'}")
    return report


__all__ = ["checkpoints_detection_robustness",
           "study_detection_robustness", "STUDY_KEYS"]
