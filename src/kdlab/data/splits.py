"""Containers for datasets (`TensorSet`, `DatasetInfo`, `Splits`) and seeded stratified splits.

All split helpers work on integer label arrays and return sorted index arrays, so a split is
fully described by its indices. Randomness comes from a `numpy.random.Generator` seeded with
an explicit integer (use `kdlab.core.seeding.derive_seed` to make one per purpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TensorSet:
    """A labelled image set held as two tensors.

    ``x``: float tensor ``[N, C, H, W]`` with values in ``[0, 1]``; ``y``: int64 tensor ``[N]``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(f"TensorSet.x must be [N, C, H, W], got shape {tuple(self.x.shape)}")
        if not self.x.is_floating_point():
            raise ValueError(f"TensorSet.x must be a float tensor in [0, 1], got {self.x.dtype}")
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise ValueError(
                f"TensorSet.y must be an int64 tensor [N], got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorSet.x has {self.x.shape[0]} samples but y has {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx) -> "TensorSet":
        """The samples at ``idx`` (a sequence / array / tensor of indices), in that order."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
        return TensorSet(self.x[idx], self.y[idx])

    def to(self, device) -> "TensorSet":
        return TensorSet(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    ``mean`` / ``std`` are per-channel tuples used by `kdlab.data.augment.normalize`;
    ``classes`` is a tuple of class names indexed by label.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: object  # int (square) or (H, W)
    mean: tuple
    std: tuple
    classes: tuple

    @property
    def hw(self) -> tuple[int, int]:
        """``(H, W)`` of one sample."""
        s = self.image_size
        return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        return (self.in_channels, *self.hw)


@dataclass
class Splits:
    """Train / validation / test sets of one dataset plus its `DatasetInfo`."""

    train: TensorSet  # or any map-style Dataset of (image [C, H, W] in [0, 1], label) (streamed)
    val: TensorSet
    test: TensorSet
    info: DatasetInfo

    def __repr__(self) -> str:
        return (
            f"Splits({self.info.name}: train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, classes={self.info.num_classes})"
        )


# ---------------------------------------------------------------------------------------------
# stratified splitting


def check_fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> float:
    """Validate a fraction; raises ValueError with a one-line fix."""
    value = float(value)
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok and np.isfinite(value)):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value}")
    return value


def stratified_counts(class_counts, total: int) -> np.ndarray:
    """Split ``total`` picks across classes in proportion to ``class_counts``.

    Largest-remainder rounding: each class gets ``floor(total * n_c / N)``, and the remaining
    picks go to the classes with the largest fractional parts (ties: lower class index first).
    The result sums exactly to ``total`` and never exceeds a class's count.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    n = int(counts.sum())
    if not 0 <= total <= n:
        raise ValueError(f"cannot pick {total} samples out of {n}")
    if n == 0:
        return np.zeros_like(counts)
    exact = counts * total / n
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:rest]] += 1
    return base


def _per_class_permutations(y: np.ndarray, seed: int) -> list[np.ndarray]:
    """For each class 0..max(y), its sample indices in a seeded random order."""
    rng = np.random.default_rng(seed)
    num_classes = int(y.max()) + 1 if y.size else 0
    return [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]


def stratified_split(y, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * N)`` samples, stratified by label.

    Per-class counts follow `stratified_counts`; which samples of a class are held out is a
    seeded random choice. Returns ``(rest_idx, held_idx)``, both sorted ascending.
    """
    y = np.asarray(y, dtype=np.int64)
    n_hold = int(round(float(fraction) * y.size))
    perms = _per_class_permutations(y, seed)
    counts = stratified_counts([p.size for p in perms], n_hold)
    held = [p[:k] for p, k in zip(perms, counts)]
    rest = [p[k:] for p, k in zip(perms, counts)]
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(rest), cat(held)


def stratified_subset(y, fraction: float, seed: int, *, min_per_class: int = 1) -> np.ndarray:
    """Keep a stratified ``fraction`` of the samples (sorted indices).

    Each class present keeps ``max(min_per_class, round(fraction * n_c))`` samples (capped at
    ``n_c``). The choice within a class is the first samples of a per-class permutation that
    depends only on ``seed``, so for one seed a smaller fraction keeps a subset of what a larger
    fraction keeps.
    """
    y = np.asarray(y, dtype=np.int64)
    if fraction >= 1.0:
        return np.arange(y.size)
    perms = _per_class_permutations(y, seed)
    keep = []
    for p in perms:
        if p.size == 0:
            continue
        k = min(p.size, max(min_per_class, int(np.floor(fraction * p.size + 0.5))))
        keep.append(p[:k])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def train_val_from_pool(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    name: str,
    val_fraction: float,
    label_fraction: float,
    seed: int,
) -> tuple[TensorSet, TensorSet]:
    """Split a training pool into (train, val).

    1. ``val``: a stratified ``val_fraction`` of the pool, seeded by
       ``derive_seed(seed, "data", name, "val")``.
    2. ``train``: the rest; when ``label_fraction < 1`` only a stratified ``label_fraction`` of it
       (at least one per class, seeded by ``derive_seed(seed, "data", name, "labels")``) is kept,
       the unlabelled remainder being dropped.
    """
    from kdlab.core.seeding import derive_seed

    val_fraction = check_fraction("val_fraction", val_fraction, low_open=False, high_open=True)
    label_fraction = check_fraction("label_fraction", label_fraction, low_open=True, high_open=False)
    y_np = y.numpy()
    rest, held = stratified_split(y_np, val_fraction, derive_seed(seed, "data", name, "val"))
    if label_fraction < 1.0:
        keep = stratified_subset(y_np[rest], label_fraction, derive_seed(seed, "data", name, "labels"))
        rest = rest[keep]
    to_t = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return TensorSet(x[to_t(rest)], y[to_t(rest)]), TensorSet(x[to_t(held)], y[to_t(held)])
