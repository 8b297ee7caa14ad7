"""Study tables: per-method statistics over seeds, written as CSV, JSON and Markdown, for any
task's declared metrics (:class:`kdlab.core.metric.Metric`; classification's ``acc`` by default).

For each method with values a_1..a_n of the task's primary test metric over seeds: mean, sample standard deviation and
the 95% Student-t confidence half-width ``t_{0.975, n−1} · sd / √n``. Against the baseline, the
*paired* differences d_k = a_k(method) − a_k(baseline) over the seeds both have: their mean and
95% t-interval, the paired t-test p, the Wilcoxon signed-rank p, the Holm–Bonferroni adjusted
t-test p across the table's comparisons, Cohen's d_z = mean(d) / sd(d), and the number of seeds a
paired study needs to detect the metric's ``delta`` (1 pp of accuracy) at the observed sd of d
(α = 0.05, power 0.8). The other metrics a task shows in its table get mean ± sd and the paired Δ.
All from :mod:`kdlab.report.statistics` (scipy.stats); NaN rules in docs/statistics.md.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from kdlab.core.io import atomic_write_text, read_json
from kdlab.report.statistics import (fmt_p,  # noqa: F401  (re-exported)
                                     compare_to_baseline, min_detectable_diff, paired_test,
                                     t_interval, wilcoxon_min_p)

#: family-wise level at which the table marks a comparison as surviving Holm's correction
HOLM_ALPHA = 0.05
#: the difference (accuracy, fraction) the power line is about: 1 percentage point
POWER_DELTA = 0.01


from kdlab.core.metric import default_metric, metric_dict, metric_from  # noqa: E402,F401  (re-exported)


def mean_sd_ci(values, conf: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample sd, half-width of the t confidence interval); sd and CI are nan for n < 2.
    See :func:`kdlab.report.statistics.t_interval`."""
    return t_interval(values, conf)


def paired_diff(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean and 95% half-width of a[k] − b[k] over keys (seeds) in both; and how many."""
    r = paired_test(a, b)
    return r["mean"], r["ci"], r["n"]


def _gap(accs: dict, base: dict, teacher_acc, is_base: bool, sign: int = 1) -> dict:
    """Gap closed per seed against the baseline of the same seed (kdlab.report.gap), mean and 95 %
    t half-width over seeds; nan without a teacher accuracy or for the baseline itself. ``sign``
    −1 for a metric where lower is better (the gap is then ``a_alone − a_teacher``)."""
    nan = float("nan")
    if teacher_acc is None or is_base:
        return {"gap_closed_mean": nan, "gap_closed_ci95": nan}
    from kdlab.report.gap import gap_closed_by_seed

    if sign < 0:
        accs, base, teacher_acc = ({k: -v for k, v in accs.items()}, {k: -v for k, v in base.items()},
                                   -teacher_acc)

    g = [v for v in gap_closed_by_seed(accs, base, teacher_acc).values() if math.isfinite(v)]
    if not g:
        return {"gap_closed_mean": nan, "gap_closed_ci95": nan}
    m, _, half = t_interval(g)
    return {"gap_closed_mean": m, "gap_closed_ci95": half}


def teacher_accuracy(recipes: dict) -> Optional[float]:
    """The test accuracy of the study's teacher (``result.json`` beside the recipes' teacher
    checkpoint), when there is exactly one teacher and its run recorded one. A ``result.json`` that
    is there but unreadable raises :class:`kdlab.core.io.RunFileError` naming it."""
    paths = {r.teacher.checkpoint for r in recipes.values()
             if getattr(r, "teacher", None) is not None and r.teacher.checkpoint}
    if len(paths) != 1:
        return None
    f = Path(next(iter(paths))).parent / "result.json"
    if not f.is_file():  # a lone teacher file: no accuracy recorded, no gap-closed column
        return None
    from kdlab.core.io import RunFileError

    res = read_json(f, "teacher result")  # truncated or corrupt: one line naming it, not a silent drop
    try:
        return float(res["test_acc"])
    except (KeyError, TypeError, ValueError):
        raise RunFileError(f"teacher result {f} records no test_acc; delete it and re-run the study "
                           f"command (the teacher's result is recomputed from its run)") from None


def fmt_pct(m: float, pm: Optional[float] = None, digits: int = 2) -> str:
    if m is None or not math.isfinite(m):
        return "—"
    s = f"{100 * m:.{digits}f}"
    if pm is not None and math.isfinite(pm):
        s += f" ± {100 * pm:.{digits}f}"
    return s


def _num(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV (every key), written atomically; nothing for no rows."""
    if not rows:
        return
    from kdlab.core.io import write_csv as atomic_csv

    atomic_csv(path, rows)


def method_stats(runs: list[dict], baseline: str, *, metric=None, teacher_acc: Optional[float] = None,
                 secondary=(), sample_unit: str = "images") -> list[dict]:
    """One row per method (in first-seen order) from per-run result dicts (``method``, ``seed``,
    ``test_<metric>``, ...), with the paired tests against ``baseline`` (Holm over all methods but
    the baseline). ``metric``: the primary :class:`~kdlab.core.metric.Metric` (default
    classification's ``acc``); ``teacher_acc``: the teacher's value of it (gap closed);
    ``secondary``: further metrics given mean ± sd and the paired Δ; ``sample_unit``: the
    throughput's unit (``<unit>_per_s`` of the runs)."""
    metric = metric or default_metric()
    key = f"test_{metric.name}"
    by_method: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    accs_by = {m: {s: r[key] for s, r in seeds.items() if key in r} for m, seeds in by_method.items()}
    delta = metric.delta or None
    tests = compare_to_baseline(accs_by, baseline, delta=delta) if baseline in accs_by else {}
    nan = float("nan")
    out = []
    for method, seeds in by_method.items():
        accs = accs_by[method]
        m, sd, ci = mean_sd_ci(accs.values())
        t = tests.get(method)
        rs = list(seeds.values())
        row = {
            "method": method, "model": rs[0].get("model"), "n_seeds": len(accs),
            f"{key}_mean": m, f"{key}_sd": sd, f"{key}_ci95": ci,
            f"diff_vs_{baseline}": t["mean"] if t else nan,
            f"diff_vs_{baseline}_ci95": t["ci"] if t else nan,
            "n_paired": t["n"] if t else 0,
            "diff_sd": t["sd"] if t else nan,
            "p_ttest": t["p_ttest"] if t else nan,
            "p_wilcoxon": t["p_wilcoxon"] if t else nan,
            "p_holm": t["p_holm"] if t else nan,
            "holm_reject": bool(t and math.isfinite(t["p_holm"]) and t["p_holm"] < HOLM_ALPHA),
            "d_z": t["d_z"] if t else nan,
            "seeds_for_delta": t.get("seeds_needed", nan) if t else nan,
            **_gap(accs, accs_by.get(baseline, {}), teacher_acc, method == baseline, metric.sign()),
        }
        for sm in secondary:
            sk = f"test_{sm.name}"
            present = {s: r[sk] for s, r in seeds.items() if sk in r}
            vals = {s: v for s, v in present.items() if not sm.is_undefined(v)}
            if present and not vals:  # undefined on every seed (e.g. AP large with no large object): n/a
                row.update({f"{sk}_mean": nan, f"{sk}_sd": nan, f"{sk}_undefined": True})
                continue
            if not vals:
                continue
            mu, sdv, _ = mean_sd_ci(vals.values())
            row.update({f"{sk}_mean": mu, f"{sk}_sd": sdv})
            base = {s: r[sk] for s, r in by_method.get(baseline, {}).items() if sk in r and not sm.is_undefined(r[sk])}
            if method != baseline and base:
                dm, dci, _ = paired_diff(vals, base)
                row.update({f"{sm.name}_diff_vs_{baseline}": dm, f"{sm.name}_diff_vs_{baseline}_ci95": dci})
            row[f"{sk}_by_seed"] = {str(k): vals[k] for k in sorted(vals)}
        if any("params" in r for r in rs):
            row["params"] = rs[0].get("params")
        u = sample_unit
        row.update({
            "best_epoch_mean": float(np.mean([r.get("best_epoch", nan) for r in rs])),
            # the student's own cost: the teacher's outputs and masks (charged to whichever run
            # filled a shared cache) are reported on their own line
            "train_time_s_mean": float(np.mean([r.get("student_time_s", r.get("train_time_s", nan)) for r in rs])),
            f"train_{u}_per_s": float(np.mean([_rate(r, u) for r in rs])),
            "teacher_time_s_sum": float(np.sum([r.get("teacher_time_s", 0.0) for r in rs])),
            "seeds": sorted(accs),
            f"{key}_by_seed": {str(k): accs[k] for k in sorted(accs)},
        })
        out.append(row)
    return out


def _rate(r: dict, unit: str) -> float:
    """A run's training throughput in ``unit`` per second (the student's own when recorded)."""
    for k in (f"student_{unit}_per_s", f"{unit}_per_s", f"train_{unit}_per_s", "student_images_per_s", "images_per_s"):
        if k in r and isinstance(r[k], (int, float)):
            return float(r[k])
    return float("nan")


def power_line(stats: list[dict], baseline: str, metric=None) -> str:
    """One sentence: seeds needed per comparison to detect the metric's ``delta`` (two-sided paired
    t-test, α = 0.05, power 0.8) at the observed sd of the paired differences."""
    metric = metric or default_metric()
    if not metric.delta:
        return ""
    sc, du, dt = metric.scale, metric.diff_unit, metric.delta_text()
    parts = []
    for r in stats:
        if r["method"] == baseline or "seeds_for_delta" not in r:
            continue
        n, sd = r["seeds_for_delta"], r.get("diff_sd", float("nan"))
        if n is None or not math.isfinite(sd):
            parts.append(f"{r['method']} —")
        else:
            need = "—" if not math.isfinite(n) else f"{int(n)}"
            mde = min_detectable_diff(r.get("n_paired", 0), sd)
            parts.append(f"{r['method']} {need} (sd {sc * sd:.{metric.digits}f} {du}"
                         + (f"; detectable now: {sc * mde:.{metric.digits - 1}f} {du})" if math.isfinite(mde) else ")"))
    if not parts:
        return ""
    have = max((r.get("n_paired", 0) for r in stats), default=0)
    if have < 2:
        return (f"Power: the paired tests and the seeds needed to detect a {dt} "
                f"difference need at least 2 seeds per method; this study has {have}.")
    return (f"Power: seeds needed to detect a {dt} paired difference (two-sided paired "
            f"t-test, α = 0.05, power 0.8, noncentral t) at the observed sd of the differences: "
            + "; ".join(parts) + f". This study has {have}; 'detectable now' is the difference it "
            f"finds with power 0.8.")


def render_table(stats: list[dict], baseline: str, wall_time_s: Optional[float] = None, *, metric=None,
                 secondary=(), sample_unit: str = "images", notes=()) -> tuple[str, str]:
    """The Markdown table of a study (robustness columns appear once they are computed).

    Δ cells of comparisons whose Holm-adjusted t-test p is below :data:`HOLM_ALPHA` end in ``*``;
    the note under the table explains the columns, adds the task's ``notes`` and ends with the
    power line."""
    metric = metric or default_metric()
    key = f"test_{metric.name}"
    fm = metric.fmt
    robust = any("mCA" in r for r in stats)
    det_robust = any("mPC" in r for r in stats)  # detection: mAP under corruption
    tests = any("p_ttest" in r for r in stats)
    secondary = [m for m in secondary if any(f"test_{m.name}_mean" in r for r in stats)]
    unit = f" {metric.unit}" if metric.unit else ""
    headers = ["method", "seeds", f"{metric.title}{unit} (mean ± sd)", "95% CI",
               f"Δ vs {baseline} ({metric.diff_unit + ', ' if metric.diff_unit else ''}95% CI)"]
    if tests:
        headers += ["p (t)", "p (Wilcoxon)", "p Holm", "d_z"]
    gap = any(math.isfinite(r.get("gap_closed_mean", float("nan"))) for r in stats)
    if gap:
        headers += ["gap closed (95% CI)"]
    for m in secondary:
        headers += [f"{m.title}" + (f" {m.unit}" if m.unit else ""), f"Δ {m.title}"]
    prof = sample_unit == "images" or any("params" in r for r in stats)
    short = {"images": "img", "tokens": "tok"}.get(sample_unit, sample_unit)
    headers += ["best ep."]
    if prof:
        headers += ["params", "MB", "MFLOPs", "ms/img (b=1)"] if sample_unit == "images" else ["params"]
    headers += [f"train {short}/s", "train s/run"]
    if robust:
        headers += ["mCA %", "mCE %", "rel. mCE %"]
    if det_robust:
        headers += ["mPC %", "rPC %", "mCE %"]
    rows = []
    for r in stats:
        is_base = r["method"] == baseline
        diff = "—" if is_base else fm(r[f"diff_vs_{baseline}"], r[f"diff_vs_{baseline}_ci95"])
        if not is_base and r.get("holm_reject"):
            diff += " *"
        row = [r["method"], r["n_seeds"], fm(r[f"{key}_mean"], r[f"{key}_sd"]), fm(r[f"{key}_ci95"]), diff]
        if tests:
            row += (["—"] * 4 if is_base else
                    [fmt_p(r.get("p_ttest")), fmt_p(r.get("p_wilcoxon")), fmt_p(r.get("p_holm")),
                     _num(r.get("d_z"), "+.2f")])
        if gap:
            g, h = r.get("gap_closed_mean", float("nan")), r.get("gap_closed_ci95", float("nan"))
            row += ["—" if not math.isfinite(g) else f"{g:.2f}" + (f" ± {h:.2f}" if math.isfinite(h) else "")]
        for m in secondary:
            if r.get(f"test_{m.name}_undefined"):
                row += ["n/a ¹", "n/a ¹"]
                continue
            row += [m.fmt(r.get(f"test_{m.name}_mean"), r.get(f"test_{m.name}_sd")),
                    "—" if is_base else m.fmt(r.get(f"{m.name}_diff_vs_{baseline}"),
                                              r.get(f"{m.name}_diff_vs_{baseline}_ci95"))]
        row += [_num(r["best_epoch_mean"], ".1f")]
        if prof:
            row += [_num(r.get("params"), ",")]
            if sample_unit == "images":
                row += [_num(r.get("size_mb"), ".3f"), _num(r.get("mflops"), ".2f"), _num(r.get("latency_ms_b1"), ".3f")]
        row += [_num(r.get(f"train_{sample_unit}_per_s"), ".0f"), _num(r["train_time_s_mean"], ".1f")]
        if robust:
            row += [fmt_pct(r.get("mCA"), r.get("mCA_sd")), fmt_pct(r.get("mCE"), r.get("mCE_sd"), 1),
                    fmt_pct(r.get("rel_mCE"), r.get("rel_mCE_sd"), 1)]
        if det_robust:
            row += [fmt_pct(r.get("mPC"), r.get("mPC_sd"), 1), fmt_pct(r.get("rPC"), r.get("rPC_sd"), 1),
                    fmt_pct(r.get("mCE"), r.get("mCE_sd"), 1)]
        rows.append(row)
    md = markdown_table(headers, rows)
    note = (f"\nTest {metric.title} over seeds; ± is the sample sd; 95% CI is the t interval half-width; "
            f"Δ is the paired difference to '{baseline}' (same seed, same data order) with its 95% "
            f"t interval.")
    if metric.direction == "min":
        note += f" Lower {metric.title} is better."
    if tests:
        n_pairs = max((r.get("n_paired", 0) for r in stats), default=0)
        note += (f" p (t): paired t-test; p (Wilcoxon): signed-rank test; p Holm: the t-test p "
                 f"Holm–Bonferroni adjusted over the table's {sum(1 for r in stats if r['method'] != baseline)} "
                 f"comparisons; * marks Δ with p Holm < {HOLM_ALPHA:g}; d_z: mean / sd of the paired "
                 f"differences (all two-sided, scipy.stats; — = undefined, see docs/statistics.md).")
        if 1 < n_pairs and wilcoxon_min_p(n_pairs) >= 0.05:
            note += (f" With {n_pairs} seeds the Wilcoxon test cannot reach p < 0.05 "
                     f"(its smallest p is {wilcoxon_min_p(n_pairs):.3f}; it needs 6 seeds).")
    if secondary:
        note += (" " + ", ".join(m.title for m in secondary) + ": mean ± sd over seeds and the paired Δ to "
                 f"'{baseline}' with its 95% t half-width"
                 + "".join(f"; lower {m.title} is better" for m in secondary if m.direction == "min") + ".")
    if robust:
        note += (" mCA / mCE / rel. mCE: the 15 standard corruptions x severities (Hendrycks & "
                 f"Dietterich), mean ± sd over seeds; mCE / rel. mCE relative to '{baseline}' "
                 "(100 = as robust as it). The 4 extra corruptions are reported separately "
                 "(report/robustness.md; mCA_extra, mCE_extra, rel_mCE_extra in table.csv/json); "
                 "rel. mCE leaves out corruptions where the reference degrades by < 1 pp "
                 "(named in report/robustness.md).")
    if det_robust:
        note += (" mPC: mAP@[.5:.95] under the 15 standard corruptions x severities (mean); rPC = mPC / clean "
                 f"mAP (Michaelis et al. 2019); mCE: corruption error with error = 1 − mAP, relative to "
                 f"'{baseline}' (100 = as robust as it); mean ± sd over seeds; paired Δ and Holm p in "
                 "report/robustness.md.")
    if gap:
        note += (f" Gap closed: (student − {baseline}) / (teacher − {baseline}) per seed, the share of the "
                 "teacher's advantage the student keeps (1 = as good as the teacher; mean ± 95% t interval).")
    teacher_s = sum(r.get("teacher_time_s_sum", 0.0) for r in stats)
    if teacher_s > 0:
        note += (f" Train {short}/s and s/run are the students' own cost; the teacher's outputs and causal "
                 f"masks took {teacher_s:.1f}s over the whole study (computed once per batch when cached).")
    for n in notes:
        note += " " + n
    na = [m for m in secondary if any(r.get(f"test_{m.name}_undefined") for r in stats)]
    if na:
        note += (f" ¹ n/a ({', '.join(m.title for m in na)}): "
                 + "; ".join(dict.fromkeys(m.undefined_note or "undefined on this test set" for m in na)) + ".")
    if wall_time_s is not None:
        note += f" Study wall time {wall_time_s:.1f}s."
    pl = power_line(stats, baseline, metric)
    if pl:
        note += "\n\n" + pl
    return md, note


def study_report(runs: list[dict], recipes: dict, out_dir, *, baseline: str = "baseline",
                 wall_time_s: Optional[float] = None, profile: bool = True, log=print,
                 figures: bool = True, metric=None, secondary=(), sample_unit: str = "images",
                 teacher_value: Optional[float] = None, profiler=None, notes=(), task: str = "classification",
                 aliases: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """Aggregate a study's runs, write results.csv/table.csv/table.json/table.md, print the table.

    ``metric`` / ``secondary`` / ``sample_unit``: the task's declared metrics (default
    classification's accuracy); ``teacher_value``: the teacher's test value of ``metric`` (the gap
    closed column; by default read beside the recipes' teacher checkpoint); ``profiler``: recipe ->
    ``{params, size_mb, mflops, latency_ms_b1}`` (called once per method when ``profile``);
    ``notes``: the task's sentences under the table; ``aliases``: method -> the method whose
    runs it shares (one recipe under two names, trained once). Everything needed to rebuild the
    same files is kept in ``table.json`` (:func:`rebuild_report`).
    With ``figures`` (default) also the forest plot and the validation curves
    (:func:`kdlab.report.figures.study_figures`; ``out_dir`` is taken to be ``<study>/report*``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = metric or default_metric()
    if teacher_value is None and metric.name == "acc":
        teacher_value = teacher_accuracy(recipes)
    runs = sort_runs(runs, list(recipes) or None)
    write_csv(out_dir / "results.csv", runs)
    stats = method_stats(runs, baseline, metric=metric, teacher_acc=teacher_value, secondary=secondary,
                         sample_unit=sample_unit)
    if profile and profiler is not None:
        for row in stats:
            row.update(profiler(recipes[row["method"]]))
    meta = {"task": task, "metric": metric_dict(metric), "secondary": [metric_dict(m) for m in secondary],
            "sample_unit": sample_unit, "teacher": teacher_value, "notes": list(notes),
            "aliases": dict(aliases or {}), "extra": dict(extra or {})}
    report = write_tables(out_dir, stats, baseline, wall_time_s, log, meta=meta)
    if figures:
        from kdlab.report.figures import study_figures

        try:  # the tables are written; a figure problem must not lose the study's exit status
            report["figures"] = {k: str(v) for k, v in study_figures(out_dir.parent, out_dir=out_dir,
                                                                      log=log).items()}
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            log(f"warning: study figures not written ({type(e).__name__}: {e})")
    from kdlab.report.page import write_study_page

    report["page"] = {k: str(v) for k, v in write_study_page(out_dir, out_dir.parent, log=log).items()}
    return report


def sort_runs(runs: list[dict], methods: Optional[list] = None) -> list[dict]:
    """Runs in the canonical order of a study's files: by method (``methods``' order, else first
    seen), then by seed. A study and its rebuilt report list them the same way."""
    order = {m: i for i, m in enumerate(dict.fromkeys(list(methods or []) + [r["method"] for r in runs]))}
    return sorted(runs, key=lambda r: (order[r["method"]], int(r["seed"])))


def write_tables(out_dir, stats: list[dict], baseline: str, wall_time_s=None, log=print, *,
                 meta: Optional[dict] = None) -> dict:
    """Write table.md / table.csv / table.json for per-method ``stats`` and print the table.
    ``meta``: the task, metrics, teacher value and notes (:func:`study_report`)."""
    out_dir = Path(out_dir)
    meta = dict(meta or {})
    metric = metric_from(meta.get("metric"))
    secondary = [metric_from(d) for d in meta.get("secondary", [])]
    md, note = render_table(stats, baseline, wall_time_s, metric=metric, secondary=secondary,
                            sample_unit=meta.get("sample_unit", "images"), notes=meta.get("notes", ()))
    if meta.get("unfinished"):
        note += "\n\n**Unfinished study:** " + unfinished_line(meta["unfinished"]) + "."
    aliases = meta.get("aliases") or {}
    if aliases:
        note += "\n\nSame recipe under two names (trained once, listed once): " + "; ".join(
            f"{a} = {b}" for a, b in aliases.items()) + "."
    atomic_write_text(out_dir / "table.md", md + "\n" + note + "\n")
    write_csv(out_dir / "table.csv", [{k: v for k, v in r.items() if k != "seeds" and not k.endswith("_by_seed")}
                                       for r in stats])
    atomic_write_text(out_dir / "table.json", json.dumps({"methods": stats, "baseline": baseline,
                                                          "wall_time_s": wall_time_s, **meta}, indent=2))
    log("")
    log(md)
    log(note.strip())
    log(f"report: {out_dir}")
    return {"methods": stats, "table_md": md, "out_dir": str(out_dir), "wall_time_s": wall_time_s}


#: per-method keys that :func:`rebuild_report` keeps from an existing table.json (measured once:
#: profiling, robustness)
KEPT_KEYS = ("params", "size_mb", "mflops", "latency_ms_b1", "mCA", "mCA_sd", "mCE", "mCE_sd", "rel_mCE",
             "rel_mCE_sd", "mCA_extra", "mCE_extra", "rel_mCE_extra", "mPC", "mPC_sd", "rPC", "rPC_sd",
             "clean_map", "clean_map_sd", "mPC50", "rPC50", "mPC_extra", "rPC_extra", "mCE_extra")


def report_dirs(study_dir) -> list[Path]:
    """The report folders of a study: ``report`` (ladder, or any single-list study) and
    ``report-<mode>`` for other ablation modes, those that hold a ``table.json``."""
    study_dir = Path(study_dir)
    return sorted(p for p in study_dir.glob("report*") if p.is_dir() and (p / "table.json").is_file())


def rebuild_report(study_dir, *, baseline: Optional[str] = None, figures: bool = True, log=print,
                   report_dir=None) -> dict:
    """Re-derive a finished study's table (and figures) from its runs' ``result.json`` files,
    without training: ``<study>/<method>/seed<k>/result.json`` -> ``<study>/report/`` (or
    ``report_dir``). On a study ``kdlab ablate`` wrote, the files come out byte for byte the same.

    Methods are those of the existing ``table.json`` in its order (else every method found,
    sorted, baseline first); its task metrics, teacher value (gap closed), notes and the profile
    and robustness columns (:data:`KEPT_KEYS`) are carried over. ``baseline`` defaults to the
    existing table's, else ``"baseline"``."""
    study_dir = Path(study_dir)
    out = Path(report_dir) if report_dir else study_dir / "report"
    old = {}
    if (out / "table.json").is_file():
        old = read_json(out / "table.json", "study table", fix="delete it and run `kdlab report` again")
    baseline = baseline or old.get("baseline") or "baseline"
    order = [r["method"] for r in old.get("methods", [])]
    found = sorted({p.parent.parent.name for p in study_dir.glob("*/seed*/result.json")})
    aliases = old.get("aliases") or {}
    methods = [m for m in order if m in found] if order else []
    if not order:
        methods = [m for m in found if m not in aliases]
    if not methods:
        inner = sorted({p.parent.parent.parent for p in study_dir.glob("*/*/seed*/result.json")})
        if inner:  # e.g. `kdlab bench --study`'s --out, whose study is in <out>/study
            raise FileNotFoundError(f"no <method>/seed<k>/result.json under {study_dir}, but a study in "
                                    f"{inner[0]}: `kdlab report {inner[0]}`")
        raise FileNotFoundError(f"no <method>/seed<k>/result.json under {study_dir}; run the study first")
    if baseline not in methods:
        raise KeyError(f"baseline '{baseline}' has no runs in {study_dir}; pass one of {methods}")
    if not order:
        methods = [baseline] + [m for m in methods if m != baseline]
    meta = {k: old[k] for k in ("task", "metric", "secondary", "sample_unit", "teacher", "notes", "aliases", "extra")
            if k in old}
    metric = metric_from(meta.get("metric"))
    runs = []
    for m in methods:
        files = sorted((study_dir / m).glob("seed*/result.json"), key=lambda p: int(p.parent.name[4:]))
        seeds = {int(s) for r in old.get("methods", []) if r["method"] == m for s in r.get("seeds", [])}
        for f in files:
            if seeds and int(f.parent.name[4:]) not in seeds:
                continue  # a seed trained for another study of the same folder
            r = read_json(f, "run result", need=(f"test_{metric.name}",),
                          fix=f"re-run that run (`kdlab ablate` on {study_dir} resumes it) or delete its folder",
                          numbers=(f"test_{metric.name}", f"val_{metric.name}", "test_loss", "val_loss",
                                   "best_epoch", "train_time_s"))
            # the folder names the study's method, as in `kdlab ablate` (a run trained by hand into the
            # study, e.g. `kdlab distill ... --out <study>/baseline/seed0`, records its recipe's name)
            r["method"] = m
            r.setdefault("seed", int(f.parent.name[4:]))
            runs.append(r)
    runs = sort_runs(runs, methods)
    gaps = runs_not_finished(study_dir, out)
    if gaps:  # an interrupted study: said on stderr and under the table; its unfinished runs are never used
        meta["unfinished"] = gaps
        print(f"kdlab: warning: {unfinished_line(gaps)} (re-run the study's `kdlab ablate ... --out {study_dir}` "
              f"to finish them)", file=sys.stderr)
    # the statistics before anything is written: a bad run changes no file
    stats = method_stats(runs, baseline, metric=metric, teacher_acc=meta.get("teacher"),
                         secondary=[metric_from(d) for d in meta.get("secondary", [])],
                         sample_unit=meta.get("sample_unit", "images"))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", runs)
    kept = {r["method"]: r for r in old.get("methods", [])}
    for row in stats:
        for k in KEPT_KEYS:
            if k in kept.get(row["method"], {}):
                row[k] = kept[row["method"]][k]
    report = write_tables(out, stats, baseline, old.get("wall_time_s"), log, meta=meta)
    if figures:
        from kdlab.report.figures import study_figures

        report["figures"] = {k: str(v) for k, v in study_figures(study_dir, out_dir=out, log=log).items()}
    from kdlab.report.page import write_study_page

    report["page"] = {k: str(v) for k, v in write_study_page(out, study_dir, log=log).items()}
    return report


def runs_not_finished(study_dir, report_dir) -> list[str]:
    """The runs of the study's recorded plan (``<report>/study.json``, written by ``kdlab ablate``:
    its methods and seeds) that have no ``result.json``: ``"<method>/seed<k> (unfinished)"`` when
    the run folder exists, ``"... (missing)"`` when not. Empty without a recorded plan."""
    plan_file = Path(report_dir) / "study.json"
    if not plan_file.is_file():
        return []
    plan = read_json(plan_file, "study record", fix="delete it and run `kdlab report` again")
    gaps = []
    for m in plan.get("methods") or []:
        for s in plan.get("seeds") or []:
            run = Path(study_dir) / str(m) / f"seed{s}"
            if not (run / "result.json").is_file():
                gaps.append(f"{m}/seed{s} ({'unfinished' if run.exists() else 'missing'})")
    return gaps


def unfinished_line(gaps: list) -> str:
    """One line naming the study's runs without a result (:func:`runs_not_finished`)."""
    shown = ", ".join(gaps[:8]) + (f" and {len(gaps) - 8} more" if len(gaps) > 8 else "")
    return f"{len(gaps)} run(s) of the study have no result: {shown}; the table uses only the finished runs"


def _one_run_advice(run: Path) -> str:
    """What reports on the one run in folder ``run``: its result file and the command that
    measures (image classifier) or samples (language model) its ``best.pt``."""
    say = f"its numbers are in {run / 'result.json'}"
    try:
        recipe = json.loads((run / "run.json").read_text()).get("recipe") or {}
    except (OSError, ValueError, AttributeError):
        recipe = {}
    recipe = recipe if isinstance(recipe, dict) else {}
    if str(recipe.get("kind", "")).startswith("lm") or recipe.get("task") in ("lm", "corpus", "arithmetic"):
        return f"{say}; `kdlab lm generate {run / 'best.pt'} --prompt TEXT` samples from it"
    if recipe.get("task", "classification") == "classification":
        return f"{say}; `kdlab evaluate {run / 'best.pt'}` measures it again"
    return say


def one_run_line(folder, why: str = "") -> Optional[str]:
    """``"<folder> is one run, not a study<why>; <what reports on it>"`` when ``folder`` is one
    run's folder (``result.json`` or ``run.json`` in it: ``kdlab distill`` output), else None."""
    folder = Path(folder)
    if (folder / "result.json").is_file() or (folder / "run.json").is_file():
        return f"{folder} is one run, not a study{why}; {_one_run_advice(folder)}"
    return None


def check_study_folder(study_dir, baseline: Optional[str] = None) -> Path:
    """``study_dir`` if it can be a study (``<method>/seed<k>/result.json``), else one line naming
    what it is instead: a missing path, a file, one run (``kdlab distill`` / ``kdlab lm distill``
    output) or one method's seeds, and the command that reports on that."""
    study_dir = Path(study_dir)
    study = "give a study folder (the --out of `kdlab ablate`)"
    if not study_dir.exists():
        raise FileNotFoundError(f"{study_dir} does not exist; {study}")
    if not study_dir.is_dir():
        raise ValueError(f"{study_dir} is a file; {study}")
    one_run = one_run_line(study_dir, ", so it has no table to rebuild")
    if one_run:
        raise ValueError(one_run)
    seeds = sorted(p.parent.name for p in study_dir.glob("seed*/result.json"))
    if seeds and not any(study_dir.glob("*/seed*/result.json")):
        raise ValueError(f"{study_dir} holds one method's runs ({', '.join(seeds)}), not a study; give the "
                         f"study folder above it: `kdlab report {study_dir.parent}`")
    runs = sorted(p.parent for p in study_dir.glob("*/seed*/result.json"))
    methods = {r.parent.name for r in runs}
    recorded = any(study_dir.glob("report*/table.json")) or any(study_dir.glob("report*/study.json"))
    if len(methods) == 1 and not recorded and (baseline or "baseline") not in methods:
        # e.g. `kdlab lm distill --out DIR`: DIR/<method>/seed<k>, with no study record
        if len(runs) == 1:
            raise ValueError(f"{study_dir} holds one run ({runs[0].relative_to(study_dir)}), not a study, so it has "
                             f"no table to rebuild; {_one_run_advice(runs[0])}")
        raise ValueError(f"{study_dir} holds the runs of one method ({', '.join(str(r.relative_to(study_dir)) for r in runs)}), "
                         f"not a study, so there is nothing to compare; their numbers are in each run's result.json "
                         f"(a study with a baseline: `kdlab ablate`)")
    return study_dir


def rebuild_reports(study_dir, *, baseline: Optional[str] = None, figures: bool = True, log=print) -> list[dict]:
    """``kdlab report``: :func:`rebuild_report` for every report folder of the study
    (:func:`report_dirs`; ``report`` alone when none holds a table yet), after
    :func:`check_study_folder`."""
    check_study_folder(study_dir, baseline)
    dirs = report_dirs(study_dir) or [Path(study_dir) / "report"]
    return [rebuild_report(study_dir, baseline=baseline, figures=figures, log=log, report_dir=d) for d in dirs]
