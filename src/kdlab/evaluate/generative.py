"""Scores of generated images against held-out real ones, on the penultimate features of kdlab's
own trained classifier for that data set (the ``digits/teacher`` / ``mnist5k/teacher`` runs):

* ``fd``: the Fréchet distance between Gaussians fitted to the two feature sets,
  ``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^{1/2})`` (the FID recipe, with this classifier instead of
  Inception; ``scipy.linalg.sqrtm`` for the matrix root). Comparable only between sample sets of
  the same size scored by the same network (the feature network's name and checkpoint hash are
  part of every result);
* ``coverage``: the entropy (bits) of the classifier's predicted-label histogram of the generated
  images (log2(10) ≈ 3.32 for ten equally frequent digits; mode collapse lowers it);
* ``precision`` / ``recall``: k-NN precision and recall (Kynkäänniemi et al., "Improved Precision and
  Recall Metric for Assessing Generative Models", NeurIPS 2019): a sample is inside the other set's
  manifold when it lies within the k-th-nearest-neighbour radius of some point of that set;
  precision = share of generated samples inside the real manifold, recall = share of real samples
  inside the generated manifold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """``‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^{1/2})`` (scipy's ``sqrtm``; the tiny imaginary
    part rounding leaves is dropped, a singular product gets ε·I added as in the FID reference)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"frechet_distance: the two Gaussians differ in dimension ({mu1.shape} vs {mu2.shape})")
    import warnings

    with warnings.catch_warnings():  # few samples in many dimensions: a singular product is expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        off = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + off) @ (cov2 + off))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, rows are samples, N − 1 denominator) of ``[N, D]`` features."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def fd_of_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def label_entropy(labels, num_classes: int) -> float:
    """Entropy in bits of the histogram of ``labels`` over ``num_classes`` classes (scipy.stats)."""
    from scipy.stats import entropy

    hist = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    return float(entropy(hist, base=2))


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    # the k-th nearest neighbour other than the point itself (distance 0 at index 0)
    return d.kthvalue(k + 1, dim=1).values


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 k-NN precision and recall of ``fake`` against ``real`` (``[N, D]``)."""
    if k < 1:
        raise ValueError("knn k must be at least 1")
    r = torch.as_tensor(np.asarray(real, np.float64))
    f = torch.as_tensor(np.asarray(fake, np.float64))
    if r.shape[0] <= k or f.shape[0] <= k:
        raise ValueError(f"k-NN precision/recall needs more than k={k} samples in each set")
    rr, rf = _kth_radius(r, k), _kth_radius(f, k)
    d = torch.cdist(f, r)  # [n_fake, n_real]
    precision = (d <= rr[None, :]).any(1).double().mean()
    recall = (d.T <= rf[None, :]).any(1).double().mean()
    return float(precision), float(recall)


class FeatureNet:
    """A trained kdlab classifier as the feature network of the scores: ``features(x01)`` gives the
    penultimate activations (the input of its classifier layer) and the predicted labels of images
    in [0, 1], normalised as the classifier was trained (the data set's mean / std).

    ``dataset``: the data set the scored images come from; a classifier trained on another data set
    is refused with one line."""

    def __init__(self, checkpoint, dataset: str, mean, std, *, name: str = "", device="cpu"):
        from kdlab.core.checkpoint import file_hash
        from kdlab.models.adapters import load_model

        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"feature network checkpoint {path} not found; train it with "
                                    f"`kdlab train-teacher {dataset}/teacher` or set eval.features.checkpoint")
        model, ck = load_model(path, device=device)
        trained_on = ck.get("dataset")
        if trained_on != dataset:
            raise ValueError(f"feature network {path} was trained on {trained_on!r}, not {dataset!r}; give a "
                             f"{dataset} classifier (e.g. `kdlab train-teacher {dataset}/teacher`) as "
                             f"eval.features.checkpoint")
        self.model = model.eval()
        self.path = str(path)
        self.hash = file_hash(path)
        self.name = name or str(ck.get("model_name"))
        self.num_classes = int(ck.get("num_classes"))
        self.device = torch.device(device)
        c = len(mean)
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1).to(self.device)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, c, 1, 1).to(self.device)
        head_name = getattr(model, "classifier_name", None)
        head = model.get_submodule(head_name) if head_name else None
        if head is None:
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            if not linears:
                raise ValueError(f"feature network {path} has no classifier layer to take the features before")
            head = linears[-1]
        self.head = head

    def describe(self) -> dict:
        return {"feature_net": self.name, "feature_net_checkpoint": self.path, "feature_net_sha256": self.hash}

    @torch.no_grad()
    def features(self, x01: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = [], []
        store = {}
        hook = self.head.register_forward_pre_hook(lambda m, inp: store.__setitem__("f", inp[0]))
        try:
            for i in range(0, x01.shape[0], batch):
                xb = x01[i:i + batch].to(self.device).float()
                logits = self.model((xb - self.mean) / self.std)
                feats.append(store["f"].flatten(1).double().cpu())
                labels.append(logits.argmax(1).cpu())
        finally:
            hook.remove()
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def score_samples(fnet: FeatureNet, fake01: torch.Tensor, real01: torch.Tensor, *, k: int = 3,
                  real_feats: Optional[np.ndarray] = None) -> dict:
    """``fd``, ``coverage``, ``precision``, ``recall`` of generated images against real ones (both in
    [0, 1]), with the feature network's name and hash and the sample counts."""
    ff, fl = fnet.features(fake01)
    rf = fnet.features(real01)[0] if real_feats is None else real_feats
    p, r = knn_precision_recall(rf, ff, k)
    return {"fd": fd_of_features(ff, rf), "coverage": label_entropy(fl, fnet.num_classes), "precision": p,
            "recall": r, "n_fake": int(ff.shape[0]), "n_real": int(rf.shape[0]), "knn_k": int(k),
            **fnet.describe()}
