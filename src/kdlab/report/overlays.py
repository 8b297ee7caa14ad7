"""Figures for explanations: attribution overlays and alignment-vs-alpha plots (PNG plus a PDF
beside it, matplotlib Agg backend, no display needed).

* :func:`overlay_grid` – rows are images; the first column is the input, then one column per
  model (name it by its training method, e.g. ``"kd+attn"``, not only its architecture) with its
  attribution heat map drawn over the (grey) image. Each map is min-max normalised to ``[0, 1]``
  on its own (per image and per model), so the colours show where a model looks, not how
  strongly; the colour bar says so, and the title names the attribution method.
* :func:`plot_sweep` – accuracy and alignment metrics against the KD weight ``alpha``
  (the weight of the hard-label term; ``alpha = 1`` is no KD), one line per student, with axis
  labels and units and a title naming teacher, data, images and seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().float().numpy()
    return np.asarray(a, dtype=np.float32)


def normalize_map(m) -> np.ndarray:
    """Min-max scale one map (``[H, W]``) to ``[0, 1]``; a constant map becomes all zeros."""
    m = _np(m)
    m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def to_display(images, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> np.ndarray:
    """Images ``[N, C, H, W]`` -> displayable ``[N, H, W]`` (C=1) or ``[N, H, W, 3]`` in [0, 1].

    With ``mean``/``std`` (per channel, e.g. ``DatasetInfo.mean/std``) the images are taken to be
    normalised and are un-normalised first: ``x * std + mean``. Values are then clipped to
    ``[0, 1]``.
    """
    x = _np(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W], got shape {x.shape}")
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std to un-normalise (or neither)")
    if mean is not None:
        m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        if m.shape[1] not in (1, x.shape[1]) or s.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"mean/std have {m.shape[1]}/{s.shape[1]} channels, images {x.shape[1]}")
        x = x * s + m
    x = np.clip(x, 0.0, 1.0)
    return x[:, 0] if x.shape[1] == 1 else np.moveaxis(x, 1, -1)


def _grey(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


#: attribution method -> how a figure names it
ATTRIBUTION_NAMES = {"ig": "Integrated Gradients |attribution|, summed over channels",
                     "saliency": "saliency |∂F/∂x|, summed over channels",
                     "gradcam": "Grad-CAM (ReLU), upsampled"}


def overlay_grid(images, maps_by_model: Mapping[str, object], path, n: int = 8,
                 titles: Sequence[str] | None = None, *, mean=None, std=None,
                 cmap: str = "inferno", alpha: float = 0.55, dpi: int = 100,
                 attribution: str | None = None, title: str | None = None) -> Path:
    """Write a PNG (and a PDF beside it) grid: one row per image (the first ``n``), columns
    ``input`` and then each model's attribution overlay (column title = the dict key: name the
    training method there, e.g. ``"kd+attn\ncnn_tiny"``), with a colour bar.

    ``images``: ``[N, C, H, W]`` with C in {1, 3} (un-normalised with ``mean``/``std`` when
    given); ``maps_by_model``: ``{name: [N, H, W] maps}`` at the images' resolution.
    ``titles``: optional per-image row labels (e.g. ``"y=3 t=3 s=5"``), under ``image i``; the
    overlay colours are a perceptual map (``inferno`` by default: brightness rises with the value). ``attribution``: the
    attribution method (``"ig"``, ``"saliency"``, ``"gradcam"`` or free text) for the figure
    title; ``title``: a further title line. Returns the PNG path.
    """
    disp = to_display(images, mean, std)
    n = min(int(n), disp.shape[0])
    if n < 1:
        raise ValueError("overlay_grid needs at least one image")
    maps = {}
    for name, m in maps_by_model.items():
        a = _np(m)
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 3 or a.shape[0] < n or a.shape[1:] != disp.shape[1:3]:
            raise ValueError(f"maps for {name!r} must be [N, H, W] matching the images "
                             f"({n}, {disp.shape[1]}, {disp.shape[2]}), got {a.shape}")
        maps[name] = a
    if titles is not None and len(titles) < n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images")
    plt = _plt()
    cols = 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    try:
        for i in range(n):
            img = disp[i]
            ax = axes[i, 0]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_ylabel(f"image {i + 1}" + (f"\n{titles[i]}" if titles is not None else ""), fontsize=7)
            for j, (name, a) in enumerate(maps.items(), start=1):
                ax = axes[i, j]
                ax.imshow(_grey(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.imshow(normalize_map(a[i]), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                          interpolation="nearest")
        for j, name in enumerate(["input", *maps]):
            axes[0, j].set_title(str(name), fontsize=8)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.tight_layout(rect=(0, 0, 0.9, 0.96 if (attribution or title) else 1.0))
        cax = fig.add_axes((0.92, 0.15, 0.02, 0.7))
        fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax).set_label(
            "attribution, min–max scaled per map (0 = least, 1 = most)", fontsize=7)
        cax.tick_params(labelsize=7)
        head = [ATTRIBUTION_NAMES.get(attribution, attribution)] if attribution else []
        if title:
            head.append(title)
        if head:
            fig.suptitle("\n".join(head), fontsize=8)
    except BaseException:
        plt.close(fig)
        raise
    from kdlab.report.figures import save_figure

    return save_figure(fig, path, dpi=dpi)


SWEEP_METRICS = ("student_acc", "rank_alignment", "topk_focus", "logit_alignment",
                 "top1_agreement", "kl_to_teacher")


def sweep_title(rows: Sequence[Mapping], *, teacher: str | None = None, dataset: str | None = None,
                n_images: int | None = None, seeds: int | None = None) -> str:
    """``"teacher X · data Y · N images · S seeds"``; ``n_images`` defaults to the rows'
    ``"n_images"``, ``seeds`` to the number of distinct ``"seed"`` values in the rows."""
    if n_images is None:
        ns = {int(r["n_images"]) for r in rows if r.get("n_images") is not None}
        n_images = max(ns) if ns else None
    if seeds is None:
        ss = {r["seed"] for r in rows if r.get("seed") is not None}
        seeds = len(ss) if ss else None
    parts = [f"teacher {teacher}" if teacher else "teacher (unnamed)",
             f"data {dataset}" if dataset else "data (unnamed)"]
    if n_images is not None:
        parts.append(f"{n_images} test images")
    if seeds is not None:
        parts.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
    return " · ".join(parts)


def plot_sweep(rows: Sequence[Mapping], path, metrics: Sequence[str] = SWEEP_METRICS, *,
               dpi: int = 100, teacher: str | None = None, dataset: str | None = None,
               n_images: int | None = None, seeds: int | None = None,
               title: str | None = None) -> Path:
    """Accuracy / alignment against ``alpha``, one line per student, one panel per metric
    (PNG and a PDF beside it).

    ``rows``: dicts with ``"student"``, ``"alpha"`` and, per metric, ``metric`` (mean) and
    optionally ``metric + "_ci"`` (half-width, drawn as an error bar). Several rows with the same
    ``(student, alpha)`` (e.g. seeds) are averaged, their error bar then being the t-interval
    over those rows. The alpha axis is inverted so KD gets stronger to the right. Each panel's
    y axis names the metric and its unit (:data:`kdlab.report.figures.METRIC_LABELS`); the title
    names ``teacher``, ``dataset``, the images and the seeds (see :func:`sweep_title`) or is
    ``title`` when given.
    """
    from kdlab.report.figures import METRIC_LABELS, save_figure
    from kdlab.report.statistics import t_interval

    def mean_ci(values):  # mean and 95% t half-width over the finite values
        m, _, half = t_interval(values)
        return m, half

    rows = list(rows)
    if not rows:
        raise ValueError("plot_sweep needs at least one row")
    metrics = [m for m in metrics if any(m in r for r in rows)]
    if not metrics:
        raise ValueError("rows hold none of the metrics to plot")
    students = list(dict.fromkeys(str(r["student"]) for r in rows))
    plt = _plt()
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.1 * nrow + 0.5), squeeze=False)
    try:
        for ax, metric in zip(axes.ravel(), metrics):
            for student in students:
                by_alpha: dict[float, list] = {}
                for r in rows:
                    if str(r["student"]) == student and metric in r:
                        by_alpha.setdefault(float(r["alpha"]), []).append(r)
                xs, ys, es = [], [], []
                for a in sorted(by_alpha):
                    grp = by_alpha[a]
                    vals = [float(g[metric]) for g in grp]
                    if len(grp) == 1:
                        y, e = vals[0], float(grp[0].get(metric + "_ci", float("nan")))
                    else:
                        y, e = mean_ci(vals)
                    xs.append(a)
                    ys.append(y)
                    es.append(0.0 if not math.isfinite(e) else e)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=student)
            ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=8)
            ax.set_xlabel("α, weight of the hard-label term (1 = no KD)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(metrics):]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=7, title="student", title_fontsize=7)
        head = title or sweep_title(rows, teacher=teacher, dataset=dataset, n_images=n_images,
                                    seeds=seeds)
        fig.suptitle(head + "\nmean with 95% t-interval (over seeds, or over images for one run)",
                     fontsize=9)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path, dpi=dpi)
