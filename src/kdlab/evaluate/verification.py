"""Face-verification metrics from pair scores (cosine similarity of normalised embeddings).

* ``acc``: the LFW protocol's 10-fold accuracy: for each fold, the threshold that maximises
  accuracy on the other nine folds is applied to that fold; the mean over folds (``acc_sd``: sd).
* ``eer``: the equal error rate, where the false-accept rate (FAR) equals the false-reject rate
  (1 − TAR) on the ROC of all pairs, linearly interpolated between the two ROC points around the
  crossing.
* ``tar@far1e-3`` / ``tar@far1e-4``: the largest true-accept rate among ROC points whose FAR is at
  most the target (with N impostor pairs the smallest non-zero FAR is 1/N; below it this is the
  TAR at FAR = 0).

ROC points come from :func:`sklearn.metrics.roc_curve` (``drop_intermediate=False``); a pair is
accepted when its score is at least the threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

FARS = (1e-3, 1e-4)


def roc(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(far, tar, thresholds)`` of pair ``scores`` with genuine flags ``same``."""
    from sklearn.metrics import roc_curve

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(same).astype(int)
    if y.min() == y.max():
        raise ValueError("verification needs both genuine and impostor pairs")
    far, tar, thr = roc_curve(y, s, drop_intermediate=False)
    return far, tar, thr


def eer(scores, same) -> float:
    """Equal error rate (see the module docstring)."""
    far, tar, _ = roc(scores, same)
    frr = 1 - tar
    i = int(np.argmax(frr <= far))  # first ROC point with FRR <= FAR (exists: the last point has FAR 1)
    if i == 0:
        return float(far[0])
    d0, d1 = frr[i - 1] - far[i - 1], frr[i] - far[i]  # d0 > 0 >= d1
    t = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def tar_at_far(scores, same, target: float) -> float:
    """The largest TAR with FAR <= ``target``."""
    far, tar, _ = roc(scores, same)
    ok = far <= target + 1e-12
    return float(tar[ok].max()) if ok.any() else 0.0


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold (a score; accept when >=) of the highest accuracy on these pairs (ties: the
    first ROC point, i.e. the highest threshold)."""
    far, tar, thr = roc(scores, same)
    p, n = int(same.sum()), int(len(same) - same.sum())
    acc = (tar * p + (1 - far) * n) / (p + n)
    t = thr[int(np.argmax(acc))]
    return float(min(t, np.max(scores) + 1e-6))  # roc_curve's first threshold is +inf


def kfold_accuracy(scores, same, folds) -> tuple[float, float]:
    """``(mean, sd)`` over folds of the accuracy at the threshold chosen on the other folds."""
    s, y, f = np.asarray(scores, dtype=np.float64), np.asarray(same).astype(int), np.asarray(folds)
    accs = []
    for k in np.unique(f):
        train, test = f != k, f == k
        if y[train].min() == y[train].max():
            raise ValueError("each fold's complement needs genuine and impostor pairs")
        thr = best_threshold(s[train], y[train])
        accs.append(float(((s[test] >= thr).astype(int) == y[test]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


def verification_metrics(scores, same, folds, fars: Sequence[float] = FARS) -> dict:
    """``acc``, ``acc_sd``, ``eer``, ``tar@far<x>`` for each FAR in ``fars``, and ``n`` (pairs)."""
    acc, sd = kfold_accuracy(scores, same, folds)
    out = {"acc": acc, "acc_sd": sd, "eer": eer(scores, same)}
    for far in fars:
        out[f"tar@far{far:.0e}".replace("e-0", "e-")] = tar_at_far(scores, same, far)
    out["n"] = int(len(scores))
    return out


@torch.no_grad()
def embed(model, loader, n: Optional[int] = None) -> torch.Tensor:
    """L2-normalised embeddings of every sample of ``loader.epoch(0)`` (``(x, y, idx)`` batches),
    in index order."""
    was = model.training
    model.eval()
    out, idxs = [], []
    for x, _, idx in loader.epoch(0):
        out.append(F.normalize(model(x).float(), dim=1).cpu())
        idxs.append(idx.cpu() if idx is not None else torch.arange(sum(len(o) for o in out[:-1]),
                                                                    sum(len(o) for o in out)))
    model.train(was)
    e, idx = torch.cat(out), torch.cat(idxs)
    res = torch.empty_like(e)
    res[idx] = e
    return res


def pair_scores(emb: torch.Tensor, pairs: torch.Tensor) -> np.ndarray:
    """Cosine similarity of each pair ``(i, j, same, fold)`` of normalised embeddings."""
    p = torch.as_tensor(pairs)
    return (emb[p[:, 0]] * emb[p[:, 1]]).sum(1).numpy().astype(np.float64)


def evaluate_pairs(model, loader, pairs) -> tuple[dict, np.ndarray]:
    """Metrics and scores of ``model`` on a split's pair protocol."""
    emb = embed(model, loader)
    s = pair_scores(emb, pairs)
    p = torch.as_tensor(pairs).numpy()
    return verification_metrics(s, p[:, 2], p[:, 3]), s


def roc_figure(curves: dict, path, title: str = "ROC (test pairs)") -> Path:
    """One ROC plot (TAR against FAR, log FAR axis) of ``{label: (scores, same)}`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, (s, y) in curves.items():
        far, tar, _ = roc(s, y)
        n_imp = int((np.asarray(y) == 0).sum())
        keep = far > 0
        ax.plot(far[keep], tar[keep], label=f"{label} (EER {eer(s, y):.3f})", lw=1.4)
    ax.set_xscale("log")
    ax.set_xlim(1.0 / max(n_imp, 1), 1.0)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    from kdlab.core.io import save_and_close

    return save_and_close(fig, path, dpi=120)
