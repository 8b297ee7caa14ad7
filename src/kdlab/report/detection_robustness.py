"""Rendering of detection robustness (:mod:`kdlab.evaluate.detection_robustness` computes it): the
Markdown of one evaluation, the study's robustness table with paired Δ to the baseline and Holm p,
and the corruption x model heat map of mAP."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from kdlab.data.corruptions import STANDARD_CORRUPTIONS, split_standard
from kdlab.report.robustness import robustness_heatmap as _heatmap
from kdlab.report.statistics import fmt_p, holm, paired_test
from kdlab.report.tables import markdown_table

#: the study measures: key -> (header, display scale, unit of a difference, higher is better)
STUDY_MEASURES = {
    "mPC": ("mPC %", 100.0, "pp", True),
    "rPC": ("rPC %", 100.0, "pp", True),
    "mCE": ("mCE %", 100.0, "points", False),
}


def _pct(v, digits: int = 1) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}"


def definitions(reference: str, n_standard: int, extra: Sequence[str]) -> str:
    """The note under a detection robustness table: what mPC, rPC and mCE are."""
    which = ("the 15 standard corruptions" if n_standard == len(STANDARD_CORRUPTIONS) else
             f"the {n_standard} of the 15 standard corruptions that were evaluated")
    note = (f"mPC: mAP@[.5:.95] under corruption, mean over {which} and the severities; rPC = mPC / clean "
            f"mAP (Michaelis et al. 2019, \"Benchmarking Robustness in Object Detection\"); mCE: the "
            f"corruption error of Hendrycks & Dietterich with error = 1 − mAP, in % of `{reference}` (100 = as "
            f"robust as it; lower is better). Corruptions act on the image only; the boxes are unchanged.")
    if extra:
        note += (f" The extra corruption{'s' if len(extra) != 1 else ''} ({', '.join(extra)}) "
                 f"{'are' if len(extra) != 1 else 'is'} averaged separately (\"extra\" columns).")
    return note


def robustness_markdown(res) -> str:
    """A :class:`~kdlab.evaluate.detection_robustness.DetectionRobustness` as Markdown: the summary
    table, its note, and mAP and mAP@.5 per corruption (mean over severities)."""
    met = res.metrics
    _, extra = split_standard(res.corruptions)
    head = ["model", "clean mAP", "clean mAP@.5", "mPC", "rPC", "mCE", "mPC@.5", "rPC@.5"]
    if extra:
        head += ["mPC extra", "rPC extra", "mCE extra"]
    rows = []
    for m in res.models:
        v = met[m]
        row = [m + (" (ref)" if m == res.reference else ""), _pct(v["clean_map"]), _pct(v["clean_map50"]),
               _pct(v["mPC"]), _pct(v["rPC"]), _pct(v["mCE"]), _pct(v["mPC50"]), _pct(v["rPC50"])]
        if extra:
            row += [_pct(v["mPC_extra"]), _pct(v["rPC_extra"]), _pct(v["mCE_extra"])]
        rows.append(row)
    n_std = met[res.reference]["n_standard"]
    lines = [f"Detection robustness on {res.n_images} test images (corrupted on the fly, seed {res.seed}, severities "
             f"{','.join(map(str, res.severities))}, {len(res.corruptions)} corruptions). mAP, mPC, rPC in %; mCE in % "
             f"of the reference `{res.reference}`.", "", markdown_table(head, rows), "",
             definitions(res.reference, n_std, extra)]
    for key, title in (("map", "mAP@[.5:.95]"), ("map50", "mAP@.5")):
        lines += ["", f"{title} (%) per corruption, mean over severities:", "",
                  markdown_table(["corruption", *res.models],
                                 [[c, *(_pct(met[m][f"{key}_by_corruption"][c]) for m in res.models)]
                                  for c in res.corruptions])]
    return "\n".join(lines) + "\n"


def robustness_heatmap(map_by_corruption, path, *, clean=None, title=None, spread=None):
    """Corruption x model heat map of mAP (mean over severities), a ``clean`` row on top and the
    ``mPC`` row at the bottom (:func:`kdlab.report.robustness.robustness_heatmap`)."""
    return _heatmap(map_by_corruption, path, clean=clean, title=title, spread=spread, summary="mPC",
                    colorbar="mAP@[.5:.95] (%)")


def paired_rows(per_seed: Mapping[str, Mapping[str, Mapping[int, float]]], methods: Sequence[str],
                baseline: str) -> dict[str, dict[str, dict]]:
    """measure -> method -> paired test against ``baseline`` (same seeds) with ``p_holm``: the
    t-test p Holm-adjusted over the study's comparisons of that measure. ``per_seed``: measure ->
    method -> seed -> value."""
    out: dict[str, dict[str, dict]] = {}
    for key, per in per_seed.items():
        if baseline not in per:
            continue
        others = [m for m in methods if m != baseline and m in per]
        tests = {m: dict(paired_test(dict(per[m]), dict(per[baseline]))) for m in others}
        for m, p in zip(others, holm([tests[m]["p_ttest"] for m in others])):
            tests[m]["p_holm"] = p
        out[key] = tests
    return out


def study_markdown(stats: Sequence[Mapping], tests: Mapping[str, Mapping[str, dict]], baseline: str, n_seeds: int,
                   extra: Sequence[str], n_standard: int, teacher: Mapping | None = None) -> str:
    """The detection study's robustness table: per method (and the teacher, one run) clean mAP,
    mPC, rPC and mCE, mean ± sd over seeds, with the paired Δ to ``baseline`` (95% t half-width)
    and its Holm-adjusted p per measure; the note defines the measures."""
    head = ["method", "seeds", "clean mAP %"]
    for key in STUDY_MEASURES:
        head += [STUDY_MEASURES[key][0], f"Δ {key}", "Holm p"]
    if extra:
        head += ["mPC extra %"]

    def pm(v, sd, digits=1):
        s = _pct(v, digits)
        return s + (f" ± {100 * sd:.{digits}f}" if s != "n/a" and sd is not None and math.isfinite(sd) else "")

    rows = []
    if teacher:
        rows.append(["teacher (1 run)", 1, _pct(teacher.get("clean_map"))]
                    + sum(([_pct(teacher.get(k)), "", ""] for k in STUDY_MEASURES), [])
                    + ([_pct(teacher.get("mPC_extra"))] if extra else []))
    for r in stats:
        if "mPC" not in r:
            continue
        m = r["method"]
        row = [m, r.get("n_robust_seeds", "—"), pm(r.get("clean_map"), r.get("clean_map_sd"))]
        for key in STUDY_MEASURES:
            row.append(pm(r.get(key), r.get(key + "_sd")))
            t = (tests.get(key) or {}).get(m)
            if m == baseline or t is None or not math.isfinite(t["mean"]):
                row += ["—", "—"]
            else:
                d = f"{100 * t['mean']:+.1f}" + (f" ± {100 * t['ci']:.1f}" if math.isfinite(t["ci"]) else "")
                row += [d + (" *" if math.isfinite(t["p_holm"]) and t["p_holm"] < 0.05 else ""), fmt_p(t["p_holm"])]
        if extra:
            row.append(pm(r.get("mPC_extra"), r.get("mPC_extra_sd")))
        rows.append(row)
    note = (definitions(baseline, n_standard, extra)
            + f" ± is the sd over seeds; each seed's mCE reference is '{baseline}' of the same seed (so its mCE is "
              f"100). Δ: the mean paired difference to '{baseline}' over {n_seeds} seed(s) (pp; mCE in points) "
              f"± its 95% t half-width; Holm p: the paired t-test p, Holm-adjusted over the study's comparisons "
              f"of each measure; * marks Holm p < 0.05. The teacher is one run, scored on the same corrupted images "
              f"(its mCE: the mean over seeds of its mCE against each seed's '{baseline}').")
    return markdown_table(head, rows) + "\n\n" + note + "\n"


__all__ = ["STUDY_MEASURES", "definitions", "paired_rows", "robustness_heatmap", "robustness_markdown",
           "study_markdown"]
