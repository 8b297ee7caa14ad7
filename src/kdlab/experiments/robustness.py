"""Corruption robustness of a set of checkpoints (``kdlab robustness CKPT ...``): load them, check
they fit one data set, evaluate them under the corruptions (:mod:`kdlab.evaluate.robustness`)
and write the tables and the heat map; and the robustness pass over a finished study
(:func:`study_robustness`, ``kdlab robustness --study``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from kdlab.core.checkpoint import check_fits
from kdlab.core.io import atomic_write_text, check_out_dir, read_json


def default_names(paths: Sequence[str]) -> list[str]:
    """Names from checkpoint paths: the file's folder for ``best.pt``/``last.pt`` (else the file
    stem); longer path suffixes where that is ambiguous, then ``#i``."""
    parts = [Path(p).with_suffix("").parts for p in paths]

    def name(i: int, depth: int) -> str:
        ps = list(parts[i])
        if ps and ps[-1] in ("best", "last") and len(ps) > 1:
            ps = ps[:-1]
        return "/".join(ps[-depth:])

    names = [name(i, 1) for i in range(len(paths))]
    for depth in (2, 3, 4):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        names = [name(i, depth) if names[i] in dup else names[i] for i in range(len(paths))]
    return [f"{n} #{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def checkpoints_robustness(paths: Sequence[str], *, names: Sequence[str] | None = None,
                           reference: str | None = None, dataset: str | None = None, data_dir=None,
                           corruptions="all", severities=(1, 2, 3, 4, 5), seed: int = 0,
                           batch_size: int = 256, device="auto", limit: int | None = None,
                           cifar_c_dir=None, out_dir=None, progress: bool = True):
    """Evaluate the checkpoints ``paths`` on the test set corrupted on the fly (CIFAR-10-C
    settings, seeded by ``seed``) or, with ``cifar_c_dir``, on the published CIFAR-10-C files.

    ``names`` default to :func:`default_names`; CE / mCE are relative to ``reference`` (default:
    a model named ``baseline`` if any, else the first); ``dataset`` defaults to the first
    checkpoint's; ``limit`` keeps the first N test images. Writes robustness.csv/.json/.md and
    robustness_heatmap.png to ``out_dir`` (default ``runs/robustness``). Returns
    ``(result, written)``: the :class:`kdlab.evaluate.robustness` result and the paths written.
    """
    import torch

    from kdlab.models.adapters import load_model
    from kdlab.data import load_dataset
    from kdlab.data.corruptions import parse_corruptions
    from kdlab.data.splits import TensorSet
    from kdlab.core.device import resolve_device
    from kdlab.evaluate.robustness import evaluate_robustness

    paths = list(paths)
    if not paths:
        raise ValueError("give checkpoints to evaluate, or --study DIR")
    names = list(names) if names else default_names(paths)
    check_out_dir(out_dir or "runs/robustness", "--out folder", create=False)  # before the evaluation; made when written
    if len(names) != len(paths):
        raise ValueError(f"give --names once per checkpoint ({len(paths)}), got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--names must be distinct, got {names}")
    corruptions = parse_corruptions(corruptions)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    device = str(resolve_device(device))
    from kdlab.core.checkpoint import load_checkpoint
    from kdlab.evaluate.detection_robustness import is_detection_checkpoint
    from kdlab.experiments.detection_robustness import checkpoints_detection_robustness

    if is_detection_checkpoint(load_checkpoint(paths[0])):  # detectors: mAP under corruption (mPC, rPC, mCE)
        if cifar_c_dir or dataset:
            raise ValueError("detection checkpoints are scored on their recipe's own test images, corrupted on "
                             "the fly; drop --cifar-c / --dataset")
        return checkpoints_detection_robustness(
            paths, names, reference=reference, corruptions=corruptions, severities=severities, seed=seed,
            batch_size=batch_size, device=device, limit=limit, data_dir=data_dir, out_dir=out_dir,
            progress=progress)

    models, cks = {}, []
    for name, path in zip(names, paths):
        model, ck = load_model(path, device)
        models[name] = model
        cks.append(ck)
    splits = load_dataset(dataset or cks[0].get("dataset") or "digits", data_dir)
    info = splits.info
    for path, ck in zip(paths, cks):
        check_fits(ck, info, str(path))
    test = splits.test
    if limit is not None:
        test = TensorSet(test.x[:limit], test.y[:limit])
    if cifar_c_dir and info.name.lower().replace("-", "") != "cifar10":
        raise ValueError(f"--cifar-c holds CIFAR-10-C; the checkpoints are {info.name} models "
                         f"(drop --cifar-c to corrupt {info.name} on the fly)")
    reference = reference or ("baseline" if "baseline" in models else names[0])
    if reference not in models:
        raise ValueError(f"--reference {reference!r} is not one of the names: {', '.join(names)}")

    res = evaluate_robustness(
        models, test, info, corruptions, severities, seed, batch_size, device,
        reference=reference, cifar_c_dir=cifar_c_dir, out_dir=None, progress=progress)
    res.settings.update({"checkpoints": dict(zip(names, map(str, paths))), "limit": limit,
                         "torch": torch.__version__})
    written = res.write(out_dir or "runs/robustness")
    return res, written


STUDY_METRICS = ("mCA", "mCE", "rel_mCE", "mCA_extra", "mCE_extra", "rel_mCE_extra",
                 "mCA_all", "mCE_all", "rel_mCE_all")


def aggregate_over_seeds(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, sample sd, 95% t half-width)`` of the finite per-seed values (sd and the
    half-width are NaN below 2 values); `kdlab.report.tables.mean_sd_ci`."""
    from kdlab.report.tables import mean_sd_ci

    return mean_sd_ci([v for v in values if v is not None and math.isfinite(v)])


def study_robustness(study_dir, *, corruptions="all", severities=(1, 2, 3, 4, 5), seed: int = 0,
                     batch_size: int = 256, device: str = "cpu", data_dir=None, limit=None,
                     progress: bool = True, log=print) -> dict:
    """Robustness of every (method, seed) student of a finished study.

    For each study seed the methods' best checkpoints are evaluated on the same corrupted test
    images (corruption draws seeded by ``seed``), with CE / mCE relative to the baseline of the
    same study seed (``report/robustness/seed<k>/``). The study table gains, per method, the
    mean over seeds of mCA, mCE and relative mCE over the 15 standard corruptions, with their
    sd and 95% t half-width over seeds (``mCA_sd``, ``mCA_ci95``, ...), the same for the extra
    corruptions (``mCA_extra``, ...) and for all of them (``mCA_all``, ...), ``n_robust_seeds``
    and ``rel_mCE_skipped`` (corruption -> seeds where the relative-mCE guard left it out).
    Writes ``report/robustness.md`` (the robustness table and its note),
    ``report/robustness_heatmap.png`` (corruption x method accuracy, mean over severities and
    seeds, with the sd over seeds) and the study table (`kdlab.report.tables.write_tables`),
    whose result it returns.
    """
    from kdlab.data import load_dataset
    from kdlab.data.corruptions import split_standard
    from kdlab.evaluate.robustness import evaluate_robustness
    from kdlab.experiments.study import load_seed_models
    from kdlab.report.robustness import robustness_heatmap, study_robustness_markdown
    from kdlab.report.tables import write_tables

    study_dir = Path(study_dir)
    table_path = study_dir / "report" / "table.json"
    if not table_path.is_file():
        from kdlab.report.tables import one_run_line

        one_run = one_run_line(study_dir)
        if one_run:  # `kdlab distill` output: its checkpoint is evaluated without --study
            raise ValueError(f"{one_run}; `kdlab robustness {study_dir / 'best.pt'}` (without "
                             f"--study) evaluates its checkpoint under corruptions")
        raise FileNotFoundError(f"{table_path} not found; run `kdlab ablate` for this study first")
    raw = read_json(table_path, "study table")
    if isinstance(raw, dict) and "rows" in raw and "methods" not in raw:  # examples/detection_study.py's own table
        raise ValueError(f"{table_path} was written by examples/detection_study.py, not by kdlab ablate; run "
                         f"`kdlab ablate {raw.get('recipe') or 'detection/fgd_ld'} --out {study_dir}` (it reuses the "
                         f"finished runs whose recipe is unchanged), then kdlab robustness --study again")
    table = read_json(table_path, "study table", need=("methods", "baseline"), fix=f"rebuild it with `kdlab report {study_dir}`")
    stats, baseline = table["methods"], table["baseline"]
    check_out_dir(study_dir / "report" / "robustness", "study report folder")  # before the evaluation
    if table.get("task") == "detection":  # detectors: mAP under corruption, mPC / rPC / mCE
        from kdlab.experiments.detection_robustness import study_detection_robustness

        return study_detection_robustness(study_dir, table, corruptions=corruptions, severities=severities,
                                          seed=seed, batch_size=batch_size, device=device, data_dir=data_dir,
                                          limit=limit, progress=progress, log=log)
    methods = [r["method"] for r in stats]
    seeds = sorted({s for r in stats for s in r["seeds"]})
    per = {m: {**{k: [] for k in STUDY_METRICS}, "by_c": [], "clean": [], "skipped": []}
           for m in methods}
    splits = None
    corrs: list[str] = []
    for s in seeds:
        models, cks = load_seed_models(study_dir, stats, s, device)
        if not models:
            continue
        if splits is None:
            d = next(reversed(cks.values()))["recipe"]["data"]
            splits = load_dataset(d["name"], data_dir or d.get("data_dir"),
                                  val_fraction=d["val_fraction"])
        test = splits.test if limit is None else type(splits.test)(splits.test.x[:limit],
                                                                   splits.test.y[:limit])
        ref = baseline if baseline in models else next(iter(models))
        log(f"robustness, study seed {s}: {len(models)} methods, reference '{ref}'")
        res = evaluate_robustness(models, test, splits.info, corruptions, severities, seed=seed,
                                  batch_size=batch_size, device=device, reference=ref,
                                  out_dir=study_dir / "report" / "robustness" / f"seed{s}",
                                  progress=progress)
        corrs = res.corruptions
        met = res.metrics
        for m in models:
            for k in STUDY_METRICS:
                per[m][k].append(met[m][k])
            per[m]["by_c"].append(met[m]["acc_by_corruption"])
            per[m]["clean"].append(met[m]["clean_acc"])
            per[m]["skipped"].append(met[m]["rel_mCE_skipped"])
    if splits is None:
        raise FileNotFoundError(f"no best.pt under {study_dir}/<method>/seed<k>/; "
                                f"run the study first")
    mean = lambda v: aggregate_over_seeds(v)[0]  # noqa: E731
    for r in stats:
        p = per[r["method"]]
        if not p["mCA"]:
            continue
        for k in STUDY_METRICS:
            r[k], r[k + "_sd"], r[k + "_ci95"] = aggregate_over_seeds(p[k])
        r["n_robust_seeds"] = len(p["mCA"])
        r["rel_mCE_skipped"] = {c: sum(c in sk for sk in p["skipped"])
                                for c in corrs if any(c in sk for sk in p["skipped"])}
    heat = {m: {c: mean([bc[c] for bc in per[m]["by_c"]]) for c in corrs}
            for m in methods if per[m]["by_c"]}
    spread = {m: {c: aggregate_over_seeds([bc[c] for bc in per[m]["by_c"]])[1] for c in corrs}
              for m in heat}
    robustness_heatmap(heat, study_dir / "report" / "robustness_heatmap.png",
                       clean={m: mean(per[m]["clean"]) for m in heat}, spread=spread,
                       title=f"accuracy (%) under corruption: mean over severities, then "
                             f"mean ± sd over {len(seeds)} seeds")
    std, extra = split_standard(corrs)
    atomic_write_text(study_dir / "report" / "robustness.md",
        study_robustness_markdown(stats, baseline, len(seeds), extra, len(std)))
    meta = {k: table[k] for k in ("task", "metric", "secondary", "sample_unit", "teacher", "notes", "aliases",
                                  "extra") if k in table}
    report = write_tables(study_dir / "report", stats, baseline, table.get("wall_time_s"), log, meta=meta)
    from kdlab.report.page import write_study_page

    write_study_page(study_dir / "report", study_dir, log=log)  # the page shows the heat map
    return report
