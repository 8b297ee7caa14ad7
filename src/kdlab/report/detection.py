"""Pictures of a detection study (plotting only; :meth:`kdlab.tasks.detection.DetectionTask.figures`
gathers the detections):

* :func:`scenes_figure` — test scenes, one row each, with the ground truth and each model's boxes
  (class and score) side by side;
* :func:`pr_figure` — the precision–recall curve at IoU 0.5 of every model (COCOeval's
  interpolated precision at its 101 recall points, averaged over the classes present).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdlab.core.io import atomic_savefig

COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def _save(fig, path: Path) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in (".png", ".pdf"):
        p = path.with_suffix(ext)
        atomic_savefig(fig, p, dpi=130, bbox_inches="tight")
        out.append(p)
    return out


def scenes_figure(images, gts, panels: dict, path, *, classes=None, score_thr: float = 0.3) -> list[Path]:
    """``images``: ``[n, H, W]`` (or ``[n, C, H, W]``) arrays in [0, 1]; ``gts``: per image
    ``(boxes, labels)``; ``panels``: model name -> per image ``(boxes, scores, labels)``. Boxes
    with a score below ``score_thr`` are not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = ["ground truth"] + list(panels)
    n = len(images)
    fig, axes = plt.subplots(n, len(cols), figsize=(2.1 * len(cols), 2.1 * n), squeeze=False)
    name = (lambda c: classes[int(c)]) if classes is not None else (lambda c: str(int(c)))  # noqa: E731
    for i in range(n):
        img = np.asarray(images[i])
        if img.ndim == 3:
            img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        for j, col in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=8)
            if j == 0:
                boxes, labels = gts[i]
                items = [(b, None, l) for b, l in zip(boxes, labels)]
                colour = "#00ff66"
            else:
                boxes, scores, labels = panels[col][i]
                items = [(b, s, l) for b, s, l in zip(boxes, scores, labels) if s >= score_thr]
                colour = "#ff5533"
            for b, s, l in items:
                ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, lw=1.0, ec=colour))
                txt = name(l) if s is None else f"{name(l)} {s:.2f}"
                ax.text(b[0], b[1] - 1, txt, color=colour, fontsize=5.5, va="bottom")
    fig.suptitle(f"test scenes: ground truth (green) and detections with score >= {score_thr} (red)", fontsize=8)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def pr_curve(precision: np.ndarray, iou_index: int = 0) -> np.ndarray:
    """The class-averaged precision at COCOeval's 101 recall points for IoU threshold ``iou_index``
    (0: IoU 0.5), area "all", 100 detections; classes without ground truth (−1) left out; a recall
    a class never reaches counts as precision 0 (COCOeval's own convention)."""
    p = precision[iou_index, :, :, 0, -1]  # [R, K]
    present = (p > -1).any(0)
    p = np.where(p < 0, 0.0, p)[:, present]
    return p.mean(1) if p.size else np.zeros(precision.shape[1])


def pr_figure(curves: dict, path, *, title: str = "precision-recall at IoU 0.5 (test scenes)") -> list[Path]:
    """``curves``: model name -> (precision [101], label suffix such as its AP50)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for k, (name, (prec, note)) in enumerate(curves.items()):
        ax.plot(recall, prec, color=COLOURS[k % len(COLOURS)], lw=1.4, label=f"{name} {note}".strip(),
                ls="--" if name == "teacher" else "-")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated, mean over classes)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
