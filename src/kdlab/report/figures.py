"""Figures for a paper, from a finished study (matplotlib, Agg backend; every figure is written as
PNG *and* PDF next to each other, ``path.png`` + ``path.pdf``).

* :func:`forest_plot` – each method's paired difference to the baseline (pp) with its 95%
  t-interval, the per-seed differences as dots, and the Holm-adjusted p.
* :func:`val_curves` – validation accuracy against epoch per method: mean over seeds with a
  ±1 sd band, read from every run's ``metrics.csv``.
* :func:`robustness_heatmap` – corruption x method accuracy on the data's colour range (printed), each
  cell ``mean`` over seeds with ``± sd`` under it; :func:`study_robustness_heatmap` reads
  ``<study>/report/robustness/seed*/robustness.json`` (written by ``kdlab robustness --study``).
* :func:`alignment_plot` – explanation-alignment metrics per method with their intervals over
  seeds (used by :mod:`kdlab.experiments.study_explain`).
* :func:`study_figures` – the forest plot and the curves of a study directory in one call.

Sweep plots and attribution overlays live in :mod:`kdlab.report.overlays` and use
:func:`save_figure` and :data:`METRIC_LABELS` from here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from kdlab.core.io import read_csv, read_json

__all__ = ["save_figure", "METRIC_LABELS", "forest_plot", "val_curves", "annotated_heatmap", "heat_range", "robustness_heatmap",
           "study_robustness_heatmap", "alignment_plot", "study_figures", "study_title",
           "read_metrics_csv"]

#: y-axis label (with unit) for each metric a figure may show
METRIC_LABELS = {
    "student_acc": "student top-1 accuracy (fraction)",
    "test_acc": "test top-1 accuracy (fraction)",
    "val_acc": "validation top-1 accuracy (%)",
    "rank_alignment": "attention rank alignment (Spearman ρ)",
    "topk_focus": "focus on teacher's top-k parts (inside / outside mass)",
    "topk_fraction": "share of attribution in teacher's top-k parts",
    "logit_alignment": "logit alignment (Spearman ρ)",
    "top1_agreement": "top-1 agreement with teacher (fraction)",
    "kl_to_teacher": "KL(teacher ‖ student) (nats)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def heat_range(values) -> tuple[float, float]:
    """The colour range of :func:`annotated_heatmap`: the finite values' minimum and maximum
    rounded out to whole units (at least 2 units wide; ``(0, 100)`` when nothing is finite), so
    that a spread of 11 to 22 % uses the whole colour map instead of a tenth of a 0–100 scale."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 100.0
    lo, hi = math.floor(round(float(v.min()), 6)), math.ceil(round(float(v.max()), 6))
    if hi - lo < 2:
        lo, hi = lo - 1, hi + 1
    return float(lo), float(hi)


def annotated_heatmap(values, row_labels: Sequence[str], col_labels: Sequence[str], *, spread=None,
                      colorbar: str = "accuracy (%)", rules: Sequence[tuple] = (), title: Optional[str] = None,
                      vrange: Optional[tuple] = None):
    """The one annotated heat map of kdlab's reports: ``values`` [rows, columns] in % (viridis, a
    perceptual map) on the data's range (:func:`heat_range`, or ``vrange``; the range is printed
    in the colour bar's label), each cell printed with one decimal (``n/a`` when not finite) and,
    when ``spread`` (same shape) is finite there, ``±sd`` under it, in black on light cells and
    white on dark ones; ``rules``: white horizontal lines ``(y, linewidth, linestyle)`` between
    row groups. Returns ``(fig, ax)``; the caller saves."""
    import textwrap

    mu = np.asarray(values, dtype=np.float64)
    sd = np.full_like(mu, np.nan) if spread is None else np.asarray(spread, dtype=np.float64)
    vmin, vmax = vrange or heat_range(mu)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.4 + 1.2 * max(1, len(col_labels)), 1.3 + 0.5 * len(row_labels)))
    im = ax.imshow(mu, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=9)
    for i in range(mu.shape[0]):
        for j in range(mu.shape[1]):
            if not np.isfinite(mu[i, j]):
                txt, dark = "n/a", True
            else:
                txt = f"{mu[i, j]:.1f}" + (f"\n±{sd[i, j]:.1f}" if np.isfinite(sd[i, j]) else "")
                dark = (mu[i, j] - vmin) / (vmax - vmin) < 0.6  # viridis is dark below ~60 %
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, linespacing=0.95,
                    color="white" if dark else "black")
    for y, lw, ls in rules:
        ax.axhline(y, color="white", lw=lw, ls=ls)
    fig.colorbar(im, ax=ax, label=f"{colorbar}; colour range {vmin:g}–{vmax:g}", fraction=0.05)
    if title:
        width = max(28, int(14 * fig.get_size_inches()[0]))
        ax.set_title("\n".join(textwrap.fill(t, width=width) for t in title.split("\n")), fontsize=9)
    return fig, ax


def save_figure(fig, path, dpi: int = 150) -> Path:
    """Write ``fig`` as ``<path>.png`` and ``<path>.pdf`` (any suffix of ``path`` is replaced),
    close it and return the PNG path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = path.with_suffix(".png"), path.with_suffix(".pdf")
    from kdlab.core.io import atomic_savefig

    try:
        atomic_savefig(fig, png, dpi=dpi, bbox_inches="tight")
        atomic_savefig(fig, pdf, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return png


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def study_title(recipe: Optional[Mapping] = None, seeds: Optional[Sequence] = None,
                n_images: Optional[int] = None, extra: str = "") -> str:
    """``"<dataset> · teacher <model> · student <model> · N seeds"`` from a recipe dict (as in
    ``run.json`` / ``study.json``), for figure titles."""
    parts = []
    if recipe:
        d = recipe.get("data") or recipe.get("corpus") or {}
        if d.get("name"):
            lf = d.get("label_fraction")
            parts.append(f"{d['name']}" + (f" ({100 * lf:g}% labels)" if lf not in (None, 1, 1.0) else ""))
        t = recipe.get("teacher") or {}
        if t.get("model"):
            parts.append(f"teacher {t['model']}")
        s = recipe.get("student") or {}
        if s.get("model"):
            parts.append(f"student {s['model']}")
    if n_images is not None:
        parts.append(f"{n_images} images")
    if seeds is not None:
        parts.append(f"{len(list(seeds))} seeds")
    if extra:
        parts.append(extra)
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# forest plot


def forest_plot(stats: Sequence[Mapping], baseline: str, path, *, title: Optional[str] = None,
                alpha: float = 0.05, metric=None) -> Path:
    """Paired difference to ``baseline`` (in the metric's display unit: percentage points for
    accuracy) per method, with its 95% t-interval (bar), the per-seed differences (dots) and
    ``p Holm`` written on the right; ``*`` where ``p Holm < alpha``. ``stats``: the ``methods``
    rows of a study's ``table.json``; ``metric``: its task's primary
    :class:`~kdlab.core.metric.Metric` (default classification's accuracy)."""
    from kdlab.core.metric import default_metric

    metric = metric or default_metric()
    sc, bykey = metric.scale, f"test_{metric.name}_by_seed"
    rows = [r for r in stats if r["method"] != baseline]
    if not rows:
        raise ValueError(f"no method besides the baseline '{baseline}' to plot")
    base = next((r for r in stats if r["method"] == baseline), None)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.55 * len(rows)))
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        m = sc * r.get(f"diff_vs_{baseline}", float("nan"))
        ci = sc * r.get(f"diff_vs_{baseline}_ci95", float("nan"))
        sig = bool(r.get("holm_reject"))
        color = "tab:red" if sig else "tab:blue"
        if base is not None and bykey in r and bykey in base:
            a, b = r[bykey], base[bykey]
            d = [sc * (a[k] - b[k]) for k in a if k in b]
            jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else [0.0]
            ax.scatter(d, y + np.asarray(jitter), s=12, color="0.55", zorder=2,
                       label="per-seed difference" if y == ys[0] else None)
        if math.isfinite(m):
            ax.errorbar([m], [y], xerr=[[ci if math.isfinite(ci) else 0.0]] * 2, fmt="o",
                        color=color, capsize=4, ms=6, lw=2, zorder=3,
                        label=("mean, 95% CI" if y == ys[0] else None))
        p = r.get("p_holm")
        from kdlab.report.statistics import fmt_p

        txt = f"p Holm {fmt_p(p)}" + (" *" if sig else "")
        ax.annotate(txt, xy=(1.02, y), xycoords=("axes fraction", "data"), va="center",
                    fontsize=8, color=color)
    ax.axvline(0.0, color="black", lw=1, ls="--")
    ax.set_yticks(ys, [r["method"] for r in rows])
    ax.set_ylim(ys.min() - 0.6, ys.max() + 0.6)
    du = {"pp": "percentage points"}.get(metric.diff_unit, metric.diff_unit)
    better = "" if metric.direction == "max" else "; lower is better"
    ax.set_xlabel(f"Δ test {metric.title} vs {baseline}" + (f" ({du}{better})" if du or better else ""))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.12 / len(rows)),
              ncol=2, frameon=False)
    n = max((r.get("n_paired", 0) for r in rows), default=0)
    ax.set_title(title or f"paired difference to {baseline} over {n} seeds (* : Holm p < {alpha:g})",
                 fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# validation curves


def read_metrics_csv(path) -> dict[str, np.ndarray]:
    """Columns of a run's ``metrics.csv`` as float arrays (empty cells -> NaN)."""
    rows = read_csv(path)
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        vals = []
        for r in rows:
            try:
                vals.append(float(r[k]))
            except (TypeError, ValueError):
                vals.append(float("nan"))
        out[k] = np.asarray(vals)
    return out


def _run_dirs(study_dir: Path, methods: Optional[Sequence[str]],
              seeds: Optional[Sequence[int]] = None) -> dict[str, list[Path]]:
    study_dir = Path(study_dir)
    if methods is None:
        tj = study_dir / "report" / "table.json"
        if tj.is_file():
            methods = [r["method"] for r in read_json(tj, "study table", need=("methods",))["methods"]]
        else:
            methods = sorted(p.name for p in study_dir.iterdir()
                             if p.is_dir() and any(p.glob("seed*/metrics.csv")))
    out = {}
    for m in methods:
        runs = sorted((study_dir / m).glob("seed*/metrics.csv"),
                      key=lambda p: int(p.parent.name[4:]) if p.parent.name[4:].isdigit() else 0)
        if seeds is not None:
            keep = {f"seed{int(k)}" for k in seeds}
            runs = [r for r in runs if r.parent.name in keep]
        if runs:
            out[m] = runs
    return out


def val_curves(study_dir, path, *, methods: Optional[Sequence[str]] = None,
               seeds: Optional[Sequence[int]] = None, metric: str = "val_acc",
               title: Optional[str] = None, scale: float = 100.0, ylabel: Optional[str] = None) -> Path:
    """Validation accuracy (%) against epoch, one line per method: the mean over the seeds that
    reached that epoch, with a ±1 sd band (over seeds; drawn where at least 2 seeds ran that
    epoch). Reads ``<study>/<method>/seed*/metrics.csv`` (only ``seeds``, when given)."""
    runs = _run_dirs(Path(study_dir), methods, seeds)
    if not runs:
        raise FileNotFoundError(f"no <method>/seed*/metrics.csv under {study_dir}; run the study first")
    plt = _plt()
    n = len(runs)
    # distinct colours for up to 20 methods (tab10, then tab20), a line style per group of 10 beyond
    # that; the legend sits outside the data, in as many columns as it needs
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    styles = ("-", "--", ":", "-.")
    ncol = 1 if n <= 12 else 2
    fig, ax = plt.subplots(figsize=(6.4 + 1.9 * ncol, max(4.0, 0.6 + 0.24 * math.ceil(n / ncol))))
    n_seeds = 0
    for k, (method, files) in enumerate(runs.items()):
        curves = []
        for f in files:
            c = read_metrics_csv(f)
            if metric not in c:
                raise KeyError(f"{f} has no column '{metric}'; columns: {sorted(c)}")
            curves.append((c["epoch"].astype(int), scale * c[metric]))
        n_seeds = max(n_seeds, len(curves))
        epochs = sorted({int(e) for ep, _ in curves for e in ep})
        mean, lo, hi = [], [], []
        for e in epochs:
            v = np.asarray([val[ep == e][0] for ep, val in curves if (ep == e).any()])
            v = v[np.isfinite(v)]
            mu = float(v.mean()) if v.size else float("nan")
            sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
            mean.append(mu)
            lo.append(mu - sd)
            hi.append(mu + sd)
        color = cmap(k % cmap.N)
        ax.plot(epochs, mean, lw=1.6, color=color, ls=styles[(k // cmap.N) % len(styles)],
                marker="o" if len(epochs) <= 12 else None, ms=3, label=f"{method} (n={len(curves)})")
        ax.fill_between(epochs, lo, hi, color=color, alpha=0.12 if n > 6 else 0.18, lw=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel or METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="method (seeds)", title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), ncol=ncol, frameon=False, borderaxespad=0.0)
    ax.set_title(title or f"validation accuracy, mean ± 1 sd over {n_seeds} seeds", fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# robustness heat map


def robustness_heatmap(per_seed: Mapping[object, Mapping[str, Mapping[str, float]]], path, *,
                       clean: Optional[Mapping[object, Mapping[str, float]]] = None,
                       title: Optional[str] = None, what: str = "accuracy") -> Path:
    """Corruption (rows) x method (columns) accuracy heat map (``what``: the value's name, e.g.
    ``mAP@[.5:.95]`` for a detection study), colours on the data's range
    (:func:`heat_range`, printed on the colour bar).

    ``per_seed``: ``{seed: {method: {corruption: accuracy in [0, 1]}}}`` (e.g. the mean over
    severities); ``clean``: ``{seed: {method: clean accuracy}}`` for a top row. Each cell shows the
    mean over seeds and, under it, ``± sd`` over seeds (sample sd; omitted with one seed). The last
    row is the mean over all the corruptions shown (which may differ from a table's mCA over the
    standard 15), its sd taken over the seeds' means."""
    seeds = list(per_seed)
    if not seeds:
        raise ValueError("robustness_heatmap needs at least one seed's results")
    methods = list(per_seed[seeds[0]])
    corrs = list(next(iter(per_seed[seeds[0]].values())))

    def cell(get):
        v = np.asarray([get(s) for s in seeds], dtype=float)
        v = v[np.isfinite(v)]
        return (100 * v.mean() if v.size else np.nan,
                100 * v.std(ddof=1) if v.size > 1 else np.nan)

    labels, rows = [], []
    if clean is not None:
        labels.append("clean")
        rows.append([cell(lambda s, m=m: clean[s].get(m, np.nan)) for m in methods])
    for c in corrs:
        labels.append(c)
        rows.append([cell(lambda s, m=m, c=c: per_seed[s].get(m, {}).get(c, np.nan)) for m in methods])
    labels.append(f"mean of the {len(corrs)}")
    rows.append([cell(lambda s, m=m: np.mean([per_seed[s][m][c] for c in corrs])
                      if m in per_seed[s] else np.nan) for m in methods])
    mu = np.asarray([[c[0] for c in r] for r in rows])
    sd = np.asarray([[c[1] for c in r] for r in rows])
    rules = ([(0.5, 1.5, "-")] if clean is not None else []) + [(len(labels) - 1.5, 1.5, "-")]
    fig, _ = annotated_heatmap(mu, labels, methods, spread=sd, rules=rules,
                               colorbar=f"{what} (%)",
                               title=title or f"{what} under corruption (%), mean ± sd over {len(seeds)} seeds")
    return save_figure(fig, path)


def study_robustness_heatmap(study_dir, path=None, *, title: Optional[str] = None) -> Path:
    """:func:`robustness_heatmap` from ``<study>/report/robustness/seed*/robustness.json`` (the
    per-seed results ``kdlab robustness --study`` writes). Default ``path``:
    ``<study>/report/robustness_heatmap_seeds.png`` (+ .pdf)."""
    study_dir = Path(study_dir)
    files = sorted((study_dir / "report" / "robustness").glob("seed*/robustness.json"))
    if not files:
        raise FileNotFoundError(f"no report/robustness/seed*/robustness.json under {study_dir}; "
                                f"run `kdlab robustness --study {study_dir}` first")
    per_seed, clean = {}, {}
    sev, what = None, "accuracy"
    for f in files:
        res = read_json(f, "robustness result", need=("models",), fix=f"re-run `kdlab robustness --study {study_dir}`")
        s = f.parent.name
        # classification stores accuracy per corruption, detection (task: detection) COCO mAP
        key, ckey = (("map_by_corruption", "clean_map") if res.get("task") == "detection"
                     else ("acc_by_corruption", "clean_acc"))
        what = "mAP@[.5:.95]" if key == "map_by_corruption" else "accuracy"
        per_seed[s] = {m: v[key] for m, v in res["models"].items()}
        clean[s] = {m: v[ckey] for m, v in res["models"].items()}
        sev = res.get("severities", sev)
    if title is None:
        rec = _study_recipe(study_dir)
        title = (f"{what} under corruption (%), mean over severities "
                 + (",".join(map(str, sev)) if sev else "") + f"; mean ± sd over {len(files)} seeds"
                 + (f"\n{study_title(rec)}" if rec else ""))
    return robustness_heatmap(per_seed, path or study_dir / "report" / "robustness_heatmap_seeds.png",
                              clean=clean, title=title, what=what)


# ---------------------------------------------------------------------------------------------
# explanation alignment per method


def alignment_plot(rows: Sequence[Mapping], path, metrics: Sequence[str], *,
                   title: Optional[str] = None) -> Path:
    """One panel per metric: each method's mean over seeds with its 95% t-interval (bar) and the
    per-seed values (dots). ``rows``: ``{"method", metric: mean, metric + "_ci": half-width,
    metric + "_seeds": [per-seed values]}``; a metric whose Holm-adjusted p against the baseline
    is below 0.05 (``metric + "_holm_reject"``) is drawn in red."""
    rows = list(rows)
    metrics = [m for m in metrics if any(m in r for r in rows)]
    if not rows or not metrics:
        raise ValueError("alignment_plot needs rows with at least one of the metrics")
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 0.9 + 0.45 * len(rows)),
                             squeeze=False)
    ys = np.arange(len(rows))[::-1]
    for ax, metric in zip(axes[0], metrics):
        for y, r in zip(ys, rows):
            vals = r.get(metric + "_seeds") or []
            if vals:
                jit = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else [0.0]
                ax.scatter(vals, y + np.asarray(jit), s=10, color="0.6", zorder=2)
            m, ci = r.get(metric, np.nan), r.get(metric + "_ci", np.nan)
            color = "tab:red" if r.get(metric + "_holm_reject") else "tab:blue"
            if _finite(m):
                ax.errorbar([m], [y], xerr=[[ci if _finite(ci) else 0.0]] * 2, fmt="o", capsize=3,
                            color=color, zorder=3)
        ax.set_yticks(ys, [r["method"] for r in rows] if ax is axes[0][0] else [""] * len(rows))
        ax.set_xlabel(METRIC_LABELS.get(metric, metric), fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title or "alignment with the teacher: mean and 95% CI over seeds (dots: seeds; "
                          "red: differs from baseline, Holm p < 0.05)", fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# a study's figures


def _study_recipe(study_dir: Path) -> Optional[dict]:
    sj = study_dir / "report" / "study.json"
    if sj.is_file():
        return read_json(sj, "study record").get("recipe")
    for rj in sorted(study_dir.glob("*/seed*/run.json")):
        return read_json(rj, "run record").get("recipe")
    return None


def study_figures(study_dir, *, out_dir=None, log=print) -> dict[str, Path]:
    """Forest plot (``forest``), validation curves (``val_curves``) and, when the robustness pass
    ran, the seed-spread heat map (``robustness_heatmap_seeds``) of a finished study, written to
    ``<study>/report/`` (PNG + PDF). Returns name -> PNG path."""
    study_dir = Path(study_dir)
    tj = study_dir / "report" / "table.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{tj} not found; run `kdlab ablate ... --out {study_dir}` first")
    out = Path(out_dir or study_dir / "report")
    if (out / "table.json").is_file():
        tj = out / "table.json"
    table = read_json(tj, "study table", need=("methods",))
    from kdlab.core.metric import metric_from

    metric = metric_from(table.get("metric"))
    mtitle = ("validation accuracy" if metric.name == "acc" else f"validation {metric.title}")
    rec = _study_recipe(study_dir)
    seeds = sorted({s for r in table["methods"] for s in r.get("seeds", [])})
    head = study_title(rec, seeds)
    paths = {}
    if len(table["methods"]) > 1:
        paths["forest"] = forest_plot(
            table["methods"], table["baseline"], out / "forest",
            title=f"paired difference to {table['baseline']} (95% t-interval; * Holm p < 0.05)\n{head}",
            metric=metric)
    try:
        paths["val_curves"] = val_curves(study_dir, out / "val_curves",
                                         methods=[r["method"] for r in table["methods"]],
                                         seeds=seeds or None,
                                         title=f"{mtitle}, mean ± 1 sd over seeds\n{head}",
                                         metric=f"val_{metric.name}", scale=metric.scale,
                                         ylabel=METRIC_LABELS.get(f"val_{metric.name}",
                                                                  f"validation {metric.title}"
                                                                  + (f" ({metric.unit})" if metric.unit else "")))
    except FileNotFoundError:
        pass
    if (study_dir / "report" / "robustness").is_dir():
        try:
            paths["robustness_heatmap_seeds"] = study_robustness_heatmap(
                study_dir, out / "robustness_heatmap_seeds")
        except FileNotFoundError:
            pass
    for k, p in paths.items():
        log(f"figure {k}: {p} (+ .pdf)")
    return paths
