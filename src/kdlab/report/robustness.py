"""Rendering of robustness results (:mod:`kdlab.evaluate.robustness` computes them): the
Markdown tables and their note, the corruption x model heat map, and the files a result is
written to (``robustness.csv`` long form, ``.json``, ``.md``, ``robustness_heatmap.png``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kdlab.data.corruptions import STANDARD_CORRUPTIONS, split_standard
from kdlab.report.tables import fmt_pct, markdown_table

#: relative mCE skips a corruption whose reference error rises by less than this (mean over
#: severities, as a fraction: 0.01 = 1 percentage point) above the reference's clean error
REL_MCE_MIN_DEGRADATION = 0.01


def jsonable(obj):
    """``obj`` with non-finite floats as None and numpy / Path values as plain JSON values."""

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _pct(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}"


def metrics_footer(reference: str, n_standard: int, extra: Sequence[str],
                   skipped: Mapping[str, float] | None = None,
                   min_degradation: float | None = REL_MCE_MIN_DEGRADATION) -> str:
    """The note under a robustness table: what mCA / mCE / rel. mCE average, where the extra
    corruptions went, and which corruptions the relative-mCE guard skipped (``skipped``:
    corruption -> the reference's degradation, or a count of seeds)."""
    which = ("the 15 standard corruptions" if n_standard == len(STANDARD_CORRUPTIONS) else
             f"the {n_standard} of the 15 standard corruptions that were evaluated")
    parts = [f"mCA, mCE and rel. mCE average {which} (Hendrycks & Dietterich, ICLR 2019); "
             f"mCE and rel. mCE are in % of `{reference}`."]
    if extra:
        many = len(extra) != 1
        parts.append(f"The {len(extra)} extra corruption{'s' if many else ''} "
                     f"({', '.join(extra)}) {'are' if many else 'is'} held out, as published, "
                     f"and averaged separately (\"extra\" columns).")
    if min_degradation is not None:
        note = (f"rel. mCE leaves out corruptions where the reference's error rises by less than "
                f"{100 * min_degradation:g} pp on average over severities")
        if skipped:
            items = [f"{c} ({v:+.2f} pp)" if isinstance(v, float) else f"{c} ({v})"
                     for c, v in skipped.items()]
            note += ": " + ", ".join(items)
        else:
            note += " (none here)"
        parts.append(note + ".")
    return " ".join(parts)


def robustness_markdown(res) -> str:
    """A :class:`~kdlab.evaluate.robustness.RobustnessResults` as Markdown: the summary table,
    its note, and accuracy and CE per corruption."""
    met = res.metrics
    _, extra = split_standard(res.corruptions)
    has_extra = bool(extra)
    head = "| model | clean acc | mCA | mCE | rel. mCE |"
    rule = "|---|---:|---:|---:|---:|"
    if has_extra:
        head += " mCA extra | mCE extra | rel. mCE extra |"
        rule += "---:|---:|---:|"
    lines = [
        f"Robustness on {res.n_images} test images ({res.source}, seed {res.seed}, severities "
        f"{','.join(map(str, res.severities))}, {len(res.corruptions)} corruptions). Accuracies in %; mCE and "
        f"relative mCE in % of the reference `{res.reference}`.",
        "",
        head,
        rule,
    ]
    for m in res.models:
        v = met[m]
        ref = " (ref)" if m == res.reference else ""
        line = (f"| {m}{ref} | {_pct(v['clean_acc'])} | {_pct(v['mCA'])} | "
                f"{_pct(v['mCE'], 1)} | {_pct(v['rel_mCE'], 1)} |")
        if has_extra:
            line += (f" {_pct(v['mCA_extra'])} | {_pct(v['mCE_extra'], 1)} | "
                     f"{_pct(v['rel_mCE_extra'], 1)} |")
        lines.append(line)
    ref_m = met[res.reference]
    skipped = {c: 100 * ref_m["ref_degradation"][c] for c in ref_m["rel_mCE_skipped"]}
    n_std = ref_m["n_standard"]
    lines += ["", metrics_footer(res.reference, n_std, extra, skipped,
                                 ref_m["rel_mCE_min_degradation"])]
    lines += ["", "Accuracy (%) per corruption, mean over severities:", "",
              "| corruption | " + " | ".join(res.models) + " |",
              "|---|" + "---:|" * len(res.models)]
    for c in res.corruptions:
        lines.append(f"| {c} | " + " | ".join(_pct(met[m]["acc_by_corruption"][c])
                                             for m in res.models) + " |")
    lines += ["", f"Corruption error CE (% of `{res.reference}`):", "",
              "| corruption | " + " | ".join(res.models) + " |",
              "|---|" + "---:|" * len(res.models)]
    for c in res.corruptions:
        lines.append(f"| {c} | " + " | ".join(_pct(met[m]["CE"][c], 1) for m in res.models)
                     + " |")
    return "\n".join(lines) + "\n"


def robustness_heatmap(acc_by_corruption: Mapping[str, Mapping[str, float]], path, *,
                       clean: Mapping[str, float] | None = None, title: str | None = None,
                       spread: Mapping[str, Mapping[str, float]] | None = None,
                       summary: str = "mCA", colorbar: str = "accuracy (%)") -> Path:
    """Heat map, corruptions (rows) x models or methods (columns), of accuracies in [0, 1]
    (e.g. the mean over severities), annotated in %; a ``clean`` row on top and, at the bottom,
    an ``mCA`` row (mean over the standard corruptions) and, when extra corruptions are shown,
    a ``mean extra`` row. The colour scale spans the data's range (printed on the colour bar). ``spread`` (same keys, e.g. the
    sd over seeds) is printed under each value. Usable by the study report with method names as
    keys. ``summary`` names the mean row (``mCA``; detection: ``mPC``), ``colorbar`` the values
    (detection: mAP)."""
    import matplotlib.pyplot as plt

    from kdlab.report.figures import annotated_heatmap

    models = list(acc_by_corruption)
    corrs = list(next(iter(acc_by_corruption.values()))) if models else []
    std, extra = split_standard(corrs)
    rows, labels, sds = [], [], []
    if clean is not None:
        rows.append([clean[m] for m in models])
        labels.append("clean")
        sds.append([np.nan] * len(models))
    for c in corrs:
        rows.append([acc_by_corruption[m][c] for m in models])
        labels.append(c)
        sds.append([spread[m][c] if spread is not None else np.nan for m in models])
    summary_rows = [(f"{summary} (standard)" if extra else f"mean ({summary})", std)] if std else []
    if extra:
        summary_rows.append(("mean extra", extra))
    if not std and not extra:
        summary_rows = [(f"mean ({summary})", [])]
    for label, group in summary_rows:
        rows.append([float(np.mean([acc_by_corruption[m][c] for c in group])) if group
                     else np.nan for m in models])
        labels.append(label)
        sds.append([np.nan] * len(models))
    rules = [(0.5, 1.5, "-")] if clean is not None else []
    rules.append((len(labels) - len(summary_rows) - 0.5, 1.5, "-"))
    if std and extra and corrs[:len(std)] == std:  # standard rows first: mark where extras begin
        rules.append(((1 if clean is not None else 0) + len(std) - 0.5, 0.8, "--"))
    fig, _ = annotated_heatmap(100 * np.asarray(rows, dtype=np.float64), labels, models,
                               spread=100 * np.asarray(sds, dtype=np.float64), rules=rules, title=title,
                               colorbar=colorbar)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from kdlab.core.io import save_and_close

    return save_and_close(fig, path, dpi=120)  # never a torn PNG


def study_robustness_markdown(stats: Sequence[Mapping], baseline: str, n_seeds: int,
                              extra: Sequence[str], n_standard: int) -> str:
    """The study's robustness table (one row per method, mean ± sd over seeds) and its note."""
    has_extra = bool(extra)
    head = ["method", "seeds", "mCA % (mean ± sd)", "mCE %", "rel. mCE %"]
    if has_extra:
        head += ["mCA extra %", "mCE extra %", "rel. mCE extra %"]
    rows = []
    keys = ("mCA", "mCE", "rel_mCE") + (("mCA_extra", "mCE_extra", "rel_mCE_extra")
                                        if has_extra else ())
    for r in stats:
        if "mCA" not in r:
            continue
        cells = [r["method"], r.get("n_robust_seeds", "—")]
        cells += [fmt_pct(r.get(k), r.get(k + "_sd"), 1 if "CE" in k else 2) for k in keys]
        rows.append(cells)
    skipped: dict[str, str] = {}
    for r in stats:
        for c, n in (r.get("rel_mCE_skipped") or {}).items():
            skipped[c] = f"{n} of {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    note = metrics_footer(baseline, n_standard, extra, skipped) + (
        f" ± is the sd over seeds; each seed's reference is '{baseline}' of the same seed.")
    return markdown_table(head, rows) + "\n\n" + note + "\n"




def write_robustness_files(res, out_dir, values: Sequence[str], markdown: str, *, by_corruption: str, clean: str,
                           label: str, heatmap=robustness_heatmap) -> dict[str, Path]:
    """Write a robustness result ``res`` (``rows()``, ``summary()``, ``metrics``, ``models``,
    ``severities``) under ``out_dir``, each file atomically: ``robustness.csv`` (its rows, the
    ``values`` columns with 6 decimals), ``.json`` (the summary), ``.md`` (``markdown``) and
    ``robustness_heatmap.png`` (``heatmap`` of each model's ``metrics[by_corruption]`` with the
    ``metrics[clean]`` row, titled "``label`` (%) under corruption")."""
    from kdlab.core.io import atomic_write_text, write_csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"robustness.{k}" for k in ("csv", "json", "md")}
    write_csv(paths["csv"], [{**r, **{k: f"{r[k]:.6f}" for k in values}} for r in res.rows()],
              ["model", "corruption", "severity", *values])
    atomic_write_text(paths["json"], json.dumps(jsonable(res.summary()), indent=2) + "\n")
    atomic_write_text(paths["md"], markdown)
    met = res.metrics
    paths["png"] = heatmap(
        {m: met[m][by_corruption] for m in res.models}, out / "robustness_heatmap.png",
        clean={m: met[m][clean] for m in res.models},
        title=f"{label} (%) under corruption, mean over severities {','.join(map(str, res.severities))}")
    return paths


def write_results(res, out_dir) -> dict[str, Path]:
    """Write a :class:`~kdlab.evaluate.robustness.RobustnessResults` as ``robustness.csv``,
    ``.json``, ``.md`` and ``robustness_heatmap.png`` under ``out_dir``
    (:func:`write_robustness_files`)."""
    return write_robustness_files(res, out_dir, ("acc",), robustness_markdown(res),
                                  by_corruption="acc_by_corruption", clean="clean_acc", label="accuracy")
