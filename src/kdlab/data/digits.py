"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, 1 channel), as `Splits`.

- Pixels are the original 0..16 counts divided by 16, so ``x`` lies in ``[0, 1]``.
- Test set: a FIXED stratified 25% (449 images), drawn with ``DIGITS_TEST_SEED`` which does not
  depend on the run seed, so every run reports on the same test images.
- The other 1348 images form the training pool; ``val_fraction`` of it (stratified, seeded by
  the run seed) is the validation set, e.g. 135 images at the default 0.1, leaving 1213 for
  training. ``label_fraction < 1`` then keeps a stratified part of the training set.
- ``DIGITS_MEAN`` / ``DIGITS_STD`` are the mean and standard deviation of all pixels of the
  1348-image training pool (independent of the run seed):
  mean = 0.304667, std = 0.375849 (``tests/test_data.py`` recomputes them).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from kdlab.core.seeding import derive_seed
from kdlab.data.registry import register_dataset
from kdlab.data.splits import DatasetInfo, Splits, TensorSet, stratified_split, train_val_from_pool

DIGITS_TEST_FRACTION = 0.25
DIGITS_TEST_SEED = derive_seed("digits", "test")  # fixed: the same test set for every run seed
DIGITS_MEAN = (0.304667,)
DIGITS_STD = (0.375849,)
DIGITS_INFO = DatasetInfo(
    name="digits",
    num_classes=10,
    in_channels=1,
    image_size=8,
    mean=DIGITS_MEAN,
    std=DIGITS_STD,
    classes=tuple(str(i) for i in range(10)),
)


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # [1797, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def digits_test_indices() -> tuple[np.ndarray, np.ndarray]:
    """``(pool_idx, test_idx)`` into sklearn's digits order; fixed, independent of any run seed."""
    _, y = _raw_digits()
    return stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)


def load_digits_splits(
    *, val_fraction: float = 0.1, label_fraction: float = 1.0, seed: int = 0
) -> Splits:
    """Digits as `Splits` (see the module docstring for the split rules)."""
    x_np, y_np = _raw_digits()
    x = torch.from_numpy(x_np.copy())
    y = torch.from_numpy(y_np.copy())
    pool, test = (torch.from_numpy(a) for a in digits_test_indices())
    train, val = train_val_from_pool(
        x[pool],
        y[pool],
        name="digits",
        val_fraction=val_fraction,
        label_fraction=label_fraction,
        seed=seed,
    )
    return Splits(train=train, val=val, test=TensorSet(x[test], y[test]), info=DIGITS_INFO)


@register_dataset("digits", description="scikit-learn 8x8 digits, 10 classes, 1 channel "
                                        "(bundled, no download)")
def digits(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0,
           seed: int = 0) -> Splits:
    """Registered loader (``data_dir`` is unused: the images ship with scikit-learn)."""
    return load_digits_splits(val_fraction=val_fraction, label_fraction=label_fraction, seed=seed)
