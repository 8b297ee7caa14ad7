"""Study tables: per-method statistics over seeds, written as CSV, JSON and Markdown.

For each method with test accuracies a_1..a_n over seeds: mean, sample standard deviation and
the 95% Student-t confidence half-width ``t_{0.975, n−1} · sd / √n``. Against the baseline, the
*paired* differences d_k = a_k(method) − a_k(baseline) over the seeds both have: their mean and
95% t-interval, the paired t-test p, the Wilcoxon signed-rank p, the Holm–Bonferroni adjusted
t-test p across the table's comparisons, Cohen's d_z = mean(d) / sd(d), and the number of seeds a
paired study needs to detect a 1 pp difference at the observed sd of d (α = 0.05, power 0.8).
All from :mod:`kdlab.report.statistics` (scipy.stats); NaN rules in docs/statistics.md.
"""

from __future__ import annotations

import json
import math
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


def mean_sd_ci(values, conf: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample sd, half-width of the t confidence interval); sd and CI are nan for n < 2.
    See :func:`kdlab.report.statistics.t_interval`."""
    return t_interval(values, conf)


def paired_diff(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean and 95% half-width of a[k] − b[k] over keys (seeds) in both; and how many."""
    r = paired_test(a, b)
    return r["mean"], r["ci"], r["n"]


def _gap(accs: dict, base: dict, teacher_acc, is_base: bool) -> dict:
    """Gap closed per seed against the baseline of the same seed (kdlab.report.gap), mean and 95 %
    t half-width over seeds; nan without a teacher accuracy or for the baseline itself."""
    nan = float("nan")
    if teacher_acc is None or is_base:
        return {"gap_closed_mean": nan, "gap_closed_ci95": nan}
    from kdlab.report.gap import gap_closed_by_seed

    g = [v for v in gap_closed_by_seed(accs, base, teacher_acc).values() if math.isfinite(v)]
    if not g:
        return {"gap_closed_mean": nan, "gap_closed_ci95": nan}
    m, _, half = t_interval(g)
    return {"gap_closed_mean": m, "gap_closed_ci95": half}


def teacher_accuracy(recipes: dict) -> Optional[float]:
    """The test accuracy of the study's teacher (``result.json`` beside the recipes' teacher
    checkpoint), when there is exactly one teacher and its run recorded one."""
    import json

    paths = {r.teacher.checkpoint for r in recipes.values()
             if getattr(r, "teacher", None) is not None and r.teacher.checkpoint}
    if len(paths) != 1:
        return None
    f = Path(next(iter(paths))).parent / "result.json"
    try:
        return float(json.loads(f.read_text())["test_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def method_stats(runs: list[dict], baseline: str, *, metric: str = "test_acc",
                 teacher_acc: Optional[float] = None) -> list[dict]:
    """One row per method (in first-seen order) from per-run result dicts (``method``, ``seed``,
    ``test_acc``, ...), with the paired tests against ``baseline`` (Holm over all methods but
    the baseline)."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    accs_by = {m: {s: r[metric] for s, r in seeds.items()} for m, seeds in by_method.items()}
    tests = compare_to_baseline(accs_by, baseline, delta=POWER_DELTA) if baseline in accs_by else {}
    nan = float("nan")
    out = []
    for method, seeds in by_method.items():
        accs = accs_by[method]
        m, sd, ci = mean_sd_ci(accs.values())
        t = tests.get(method)
        rs = list(seeds.values())
        out.append({
            "method": method, "model": rs[0].get("model"), "n_seeds": len(accs),
            "test_acc_mean": m, "test_acc_sd": sd, "test_acc_ci95": ci,
            f"diff_vs_{baseline}": t["mean"] if t else nan,
            f"diff_vs_{baseline}_ci95": t["ci"] if t else nan,
            "n_paired": t["n"] if t else 0,
            "diff_sd": t["sd"] if t else nan,
            "p_ttest": t["p_ttest"] if t else nan,
            "p_wilcoxon": t["p_wilcoxon"] if t else nan,
            "p_holm": t["p_holm"] if t else nan,
            "holm_reject": bool(t and math.isfinite(t["p_holm"]) and t["p_holm"] < HOLM_ALPHA),
            "d_z": t["d_z"] if t else nan,
            "seeds_for_1pp": t["seeds_needed"] if t else nan,
            **_gap(accs, accs_by.get(baseline, {}), teacher_acc, method == baseline),
            "best_epoch_mean": float(np.mean([r["best_epoch"] for r in rs])),
            # the student's own cost: the teacher's outputs and masks (charged to whichever run
            # filled a shared cache) are reported on their own line
            "train_time_s_mean": float(np.mean([r.get("student_time_s", r["train_time_s"]) for r in rs])),
            "train_images_per_s": float(np.mean([r.get("student_images_per_s", r["images_per_s"]) for r in rs])),
            "teacher_time_s_sum": float(np.sum([r.get("teacher_time_s", 0.0) for r in rs])),
            "seeds": sorted(accs),
            "test_acc_by_seed": {str(k): accs[k] for k in sorted(accs)},
        })
    return out


def power_line(stats: list[dict], baseline: str, delta: float = POWER_DELTA) -> str:
    """One sentence: seeds needed per comparison to detect ``delta`` (two-sided paired t-test,
    α = 0.05, power 0.8) at the observed sd of the paired differences."""
    parts = []
    for r in stats:
        if r["method"] == baseline or "seeds_for_1pp" not in r:
            continue
        n, sd = r["seeds_for_1pp"], r.get("diff_sd", float("nan"))
        if n is None or not math.isfinite(sd):
            parts.append(f"{r['method']} —")
        else:
            need = "—" if not math.isfinite(n) else f"{int(n)}"
            mde = min_detectable_diff(r.get("n_paired", 0), sd)
            parts.append(f"{r['method']} {need} (sd {100 * sd:.2f} pp"
                         + (f"; detectable now: {100 * mde:.1f} pp)" if math.isfinite(mde) else ")"))
    if not parts:
        return ""
    have = max((r.get("n_paired", 0) for r in stats), default=0)
    if have < 2:
        return (f"Power: the paired tests and the seeds needed to detect a {100 * delta:g} pp "
                f"difference need at least 2 seeds per method; this study has {have}.")
    return (f"Power: seeds needed to detect a {100 * delta:g} pp paired difference (two-sided paired "
            f"t-test, α = 0.05, power 0.8, noncentral t) at the observed sd of the differences: "
            + "; ".join(parts) + f". This study has {have}; 'detectable now' is the difference it "
            f"finds with power 0.8.")


def _profile(recipe, cache: dict) -> dict:
    from kdlab.data import load_dataset
    from kdlab.evaluate.efficiency import profile_model
    from kdlab.models import create_model

    key = (recipe.student.model, json.dumps(recipe.student.kwargs, sort_keys=True), recipe.data.name)
    if key not in cache:
        d = recipe.data
        info = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction).info
        model = create_model(recipe.student.model, num_classes=info.num_classes,
                             in_channels=info.in_channels, **recipe.student.kwargs).eval()
        cache[key] = profile_model(model, (1, info.in_channels, info.image_size, info.image_size),
                                   batch_sizes=(1,), repeats=30)
    return cache[key]


def render_table(stats: list[dict], baseline: str, wall_time_s: Optional[float] = None) -> tuple[str, str]:
    """The Markdown table of a study (robustness columns appear once they are computed).

    Δ cells of comparisons whose Holm-adjusted t-test p is below :data:`HOLM_ALPHA` end in ``*``;
    the note under the table explains the columns and ends with the power line."""
    robust = any("mCA" in r for r in stats)
    tests = any("p_ttest" in r for r in stats)
    headers = ["method", "seeds", "top-1 % (mean ± sd)", "95% CI", f"Δ vs {baseline} (pp, 95% CI)"]
    if tests:
        headers += ["p (t)", "p (Wilcoxon)", "p Holm", "d_z"]
    gap = any(math.isfinite(r.get("gap_closed_mean", float("nan"))) for r in stats)
    if gap:
        headers += ["gap closed (95% CI)"]
    headers += ["best ep.", "params", "MB", "MFLOPs", "ms/img (b=1)", "train img/s", "train s/run"]
    if robust:
        headers += ["mCA %", "mCE %", "rel. mCE %"]
    rows = []
    for r in stats:
        is_base = r["method"] == baseline
        diff = "—" if is_base else fmt_pct(r[f"diff_vs_{baseline}"], r[f"diff_vs_{baseline}_ci95"])
        if not is_base and r.get("holm_reject"):
            diff += " *"
        row = [r["method"], r["n_seeds"], fmt_pct(r["test_acc_mean"], r["test_acc_sd"]),
               fmt_pct(r["test_acc_ci95"]), diff]
        if tests:
            row += (["—"] * 4 if is_base else
                    [fmt_p(r.get("p_ttest")), fmt_p(r.get("p_wilcoxon")), fmt_p(r.get("p_holm")),
                     _num(r.get("d_z"), "+.2f")])
        if gap:
            g, h = r.get("gap_closed_mean", float("nan")), r.get("gap_closed_ci95", float("nan"))
            row += ["—" if not math.isfinite(g) else f"{g:.2f}" + (f" ± {h:.2f}" if math.isfinite(h) else "")]
        row += [
            _num(r["best_epoch_mean"], ".1f"), _num(r.get("params"), ","), _num(r.get("size_mb"), ".3f"),
            _num(r.get("mflops"), ".2f"), _num(r.get("latency_ms_b1"), ".3f"),
            _num(r["train_images_per_s"], ".0f"), _num(r["train_time_s_mean"], ".1f"),
        ]
        if robust:
            row += [fmt_pct(r.get("mCA"), r.get("mCA_sd")), fmt_pct(r.get("mCE"), r.get("mCE_sd"), 1),
                    fmt_pct(r.get("rel_mCE"), r.get("rel_mCE_sd"), 1)]
        rows.append(row)
    md = markdown_table(headers, rows)
    note = (f"\nTest top-1 over seeds; ± is the sample sd; 95% CI is the t interval half-width; "
            f"Δ is the paired difference to '{baseline}' (same seed, same data order) with its 95% "
            f"t interval.")
    if tests:
        n_pairs = max((r.get("n_paired", 0) for r in stats), default=0)
        note += (f" p (t): paired t-test; p (Wilcoxon): signed-rank test; p Holm: the t-test p "
                 f"Holm–Bonferroni adjusted over the table's {sum(1 for r in stats if r['method'] != baseline)} "
                 f"comparisons; * marks Δ with p Holm < {HOLM_ALPHA:g}; d_z: mean / sd of the paired "
                 f"differences (all two-sided, scipy.stats; — = undefined, see docs/statistics.md).")
        if 1 < n_pairs and wilcoxon_min_p(n_pairs) >= 0.05:
            note += (f" With {n_pairs} seeds the Wilcoxon test cannot reach p < 0.05 "
                     f"(its smallest p is {wilcoxon_min_p(n_pairs):.3f}; it needs 6 seeds).")
    if robust:
        note += (" mCA / mCE / rel. mCE: the 15 standard corruptions x severities (Hendrycks & "
                 f"Dietterich), mean ± sd over seeds; mCE / rel. mCE relative to '{baseline}' "
                 "(100 = as robust as it). The 4 extra corruptions are reported separately "
                 "(report/robustness.md; mCA_extra, mCE_extra, rel_mCE_extra in table.csv/json); "
                 "rel. mCE leaves out corruptions where the reference degrades by < 1 pp "
                 "(named in report/robustness.md).")
    if gap:
        note += (f" Gap closed: (student − {baseline}) / (teacher − {baseline}) per seed, the share of the "
                 "teacher's advantage the student keeps (1 = as good as the teacher; mean ± 95% t interval).")
    teacher_s = sum(r.get("teacher_time_s_sum", 0.0) for r in stats)
    if teacher_s > 0:
        note += (f" Train img/s and s/run are the students' own cost; the teacher's outputs and causal "
                 f"masks took {teacher_s:.1f}s over the whole study (computed once per batch when cached).")
    if wall_time_s is not None:
        note += f" Study wall time {wall_time_s:.1f}s."
    pl = power_line(stats, baseline)
    if pl:
        note += "\n\n" + pl
    return md, note


def study_report(runs: list[dict], recipes: dict, out_dir, *, baseline: str = "baseline",
                 wall_time_s: Optional[float] = None, profile: bool = True, log=print,
                 figures: bool = True) -> dict:
    """Aggregate a study's runs, write results.csv/table.csv/table.json/table.md, print the table.

    With ``figures`` (default) also the forest plot and the validation curves
    (:func:`kdlab.report.figures.study_figures`; ``out_dir`` is taken to be ``<study>/report``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "results.csv", runs)
    stats = method_stats(runs, baseline, teacher_acc=teacher_accuracy(recipes))
    cache: dict = {}
    for row in stats:
        if profile:
            p = _profile(recipes[row["method"]], cache)
            row.update({"params": p["params"]["total"], "size_mb": p["size_mb"],
                        "mflops": p["flops"] / 1e6, "latency_ms_b1": p["latency"][0]["median_ms"]})
    report = write_tables(out_dir, stats, baseline, wall_time_s, log)
    if figures:
        from kdlab.report.figures import study_figures

        try:  # the tables are written; a figure problem must not lose the study's exit status
            report["figures"] = {k: str(v) for k, v in study_figures(out_dir.parent, out_dir=out_dir,
                                                                      log=log).items()}
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            log(f"warning: study figures not written ({type(e).__name__}: {e})")
    return report


def write_tables(out_dir, stats: list[dict], baseline: str, wall_time_s=None, log=print) -> dict:
    """Write table.md / table.csv / table.json for per-method ``stats`` and print the table."""
    out_dir = Path(out_dir)
    md, note = render_table(stats, baseline, wall_time_s)
    atomic_write_text(out_dir / "table.md", md + "\n" + note + "\n")
    write_csv(out_dir / "table.csv", [{k: v for k, v in r.items() if k not in ("seeds", "test_acc_by_seed")}
                                       for r in stats])
    atomic_write_text(out_dir / "table.json", json.dumps({"methods": stats, "baseline": baseline,
                                                    "wall_time_s": wall_time_s}, indent=2))
    log("")
    log(md)
    log(note.strip())
    log(f"report: {out_dir}")
    return {"methods": stats, "table_md": md, "out_dir": str(out_dir), "wall_time_s": wall_time_s}


#: per-method keys that :func:`rebuild_report` keeps from an existing table.json (measured once:
#: profiling, robustness)
KEPT_KEYS = ("params", "size_mb", "mflops", "latency_ms_b1", "mCA", "mCA_sd", "mCE", "rel_mCE")


def rebuild_report(study_dir, *, baseline: Optional[str] = None, figures: bool = True, log=print) -> dict:
    """Re-derive a finished study's table (and figures) from its runs' ``result.json`` files,
    without training: ``<study>/<method>/seed<k>/result.json`` -> ``<study>/report/``.

    Methods come in the order of the existing ``report/table.json`` (else sorted, baseline first);
    profile and robustness columns (:data:`KEPT_KEYS`) are carried over from it. ``baseline``
    defaults to the existing table's, else ``"baseline"``."""
    study_dir = Path(study_dir)
    out = study_dir / "report"
    old = read_json(out / "table.json", "study table", fix="delete it and run `kdlab report` again") if (out / "table.json").is_file() else {}
    baseline = baseline or old.get("baseline") or "baseline"
    order = [r["method"] for r in old.get("methods", [])]
    found = sorted(p.parent.parent.name for p in study_dir.glob("*/seed*/result.json"))
    methods = [m for m in order if m in found] + [m for m in dict.fromkeys(found) if m not in order]
    if not methods:
        raise FileNotFoundError(f"no <method>/seed<k>/result.json under {study_dir}; run the study first")
    if baseline not in methods:
        raise KeyError(f"baseline '{baseline}' has no runs in {study_dir}; pass one of {methods}")
    if not order:
        methods = [baseline] + [m for m in methods if m != baseline]
    runs = []
    for m in methods:
        files = sorted((study_dir / m).glob("seed*/result.json"), key=lambda p: int(p.parent.name[4:]))
        for f in files:
            r = read_json(f, "run result", need=("test_acc",),
                          fix=f"re-run that run (`kdlab ablate` on {study_dir} resumes it) or delete its folder")
            r.setdefault("method", m)
            r.setdefault("seed", int(f.parent.name[4:]))
            runs.append(r)
    stats = method_stats(runs, baseline)  # before anything is written: a bad run changes no file
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", runs)
    kept = {r["method"]: r for r in old.get("methods", [])}
    for row in stats:
        for k in KEPT_KEYS:
            if k in kept.get(row["method"], {}):
                row[k] = kept[row["method"]][k]
    report = write_tables(out, stats, baseline, old.get("wall_time_s"), log)
    if figures:
        from kdlab.report.figures import study_figures

        report["figures"] = {k: str(v) for k, v in study_figures(study_dir, log=log).items()}
    return report
