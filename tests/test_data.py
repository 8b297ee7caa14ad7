"""Tests for kdlab.data: splits, CIFAR pickles, augmentation and the batch loader."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from cifar_fixtures import write_fake_cifar10, write_fake_cifar100
from kdlab.data import AugmentSpec, BatchLoader, TensorSet, augment_batch, load_dataset, normalize
from kdlab.data.augment import crop_with_offsets, flip_with_mask
from kdlab.data.digits import DIGITS_MEAN, DIGITS_STD

# sklearn digits class counts (documented in sklearn): 1797 images.
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def _rows(x: torch.Tensor) -> Counter:
    return Counter(r.tobytes() for r in x.reshape(x.shape[0], -1).numpy())


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ----------------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_types(digits):
    # test: round(0.25 * 1797) = 449; pool 1348; val: round(0.1 * 1348) = 135; train 1213
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1213, 135, 449)
    info = digits.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("digits", 10, 1, 8)
    assert info.classes == tuple("0123456789")
    for ts in (digits.train, digits.val, digits.test):
        assert ts.x.dtype == torch.float32 and ts.y.dtype == torch.int64
        assert ts.x.shape[1:] == (1, 8, 8)
        assert ts.x.min() >= 0 and ts.x.max() <= 1
        assert torch.equal(ts.x * 16, (ts.x * 16).round())  # original 0..16 counts / 16
    assert digits.train.x.max() == 1.0


def test_digits_splits_partition_the_data(digits):
    from sklearn.datasets import load_digits

    full = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
    parts = _rows(digits.train.x) + _rows(digits.val.x) + _rows(digits.test.x)
    assert parts == _rows(full)


def test_digits_stratified(digits):
    counts = np.array(DIGIT_COUNTS)
    test_c = np.bincount(digits.test.y.numpy(), minlength=10)
    assert test_c.sum() == 449
    assert np.all(np.abs(test_c - counts * 449 / 1797) < 1)
    pool_c = counts - test_c
    val_c = np.bincount(digits.val.y.numpy(), minlength=10)
    assert np.all(np.abs(val_c - pool_c * 135 / 1348) < 1)
    assert np.array_equal(np.bincount(digits.train.y.numpy(), minlength=10), pool_c - val_c)


def test_digits_test_set_fixed_across_seeds(digits):
    other = load_dataset("digits", seed=7)
    assert torch.equal(other.test.x, digits.test.x) and torch.equal(other.test.y, digits.test.y)
    assert _rows(other.val.x) != _rows(digits.val.x)  # validation depends on the seed
    # train + val is the same pool for every seed
    assert _rows(other.train.x) + _rows(other.val.x) == _rows(digits.train.x) + _rows(digits.val.x)
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.val.x, digits.val.x) and torch.equal(again.train.y, digits.train.y)


def test_digits_mean_std_constants(digits):
    pool = torch.cat([digits.train.x, digits.val.x]).double()
    assert abs(pool.mean().item() - DIGITS_MEAN[0]) < 1e-5
    assert abs(pool.std(unbiased=False).item() - DIGITS_STD[0]) < 1e-5
    assert digits.info.mean == DIGITS_MEAN and digits.info.std == DIGITS_STD


def test_label_fraction(digits):
    full_c = np.bincount(digits.train.y.numpy(), minlength=10)
    part = load_dataset("digits", label_fraction=0.1)
    part_c = np.bincount(part.train.y.numpy(), minlength=10)
    assert np.array_equal(part_c, np.maximum(1, np.floor(full_c * 0.1 + 0.5)).astype(int))
    assert torch.equal(part.val.x, digits.val.x) and torch.equal(part.test.y, digits.test.y)
    assert not (_rows(part.train.x) - _rows(digits.train.x))  # a subset of the full train set
    smaller = load_dataset("digits", label_fraction=0.05)
    assert not (_rows(smaller.train.x) - _rows(part.train.x))  # nested for one seed
    tiny = load_dataset("digits", label_fraction=0.001)
    assert np.array_equal(np.bincount(tiny.train.y.numpy(), minlength=10), np.ones(10))


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="label_fraction"):
        load_dataset("digits", label_fraction=0.0)
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("mnist")


# ------------------------------------------------------------------------------------ CIFAR


def _read_official(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_cifar10_fixture_round_trip(tmp_path):
    folder = write_fake_cifar10(tmp_path, n_per_batch=20, n_test=20)
    batches = [_read_official(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_d = _read_official(folder / "test_batch")
    meta = _read_official(folder / "batches.meta")
    for d in batches + [test_d]:
        assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (20, 3072)
    with pytest.raises(UnicodeDecodeError):  # like the real Python 2 files
        with open(folder / "test_batch", "rb") as f:
            pickle.load(f)
    train_data = np.concatenate([d[b"data"] for d in batches])
    train_labels = sum((d[b"labels"] for d in batches), [])
    assert sorted(Counter(train_labels).values()) == [10] * 10  # every class present

    s = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    assert len(s.val) == 0
    # pixel (c, i, j) of image n is data[n, 1024 c + 32 i + j] / 255
    assert s.train.x.shape == (100, 3, 32, 32) and s.train.x.dtype == torch.float32
    assert s.train.x[3, 1, 2, 5].item() == pytest.approx(train_data[3, 1024 + 64 + 5] / 255)
    assert torch.equal(s.train.x, torch.tensor(train_data).reshape(100, 3, 32, 32).float() / 255)
    assert s.train.y.tolist() == train_labels
    assert torch.equal(s.test.x, torch.tensor(test_d[b"data"]).reshape(20, 3, 32, 32).float() / 255)
    assert s.test.y.tolist() == test_d[b"labels"]
    assert s.info.classes == tuple(n.decode() for n in meta[b"label_names"])
    assert (s.info.num_classes, s.info.in_channels, s.info.image_size) == (10, 3, 32)
    assert s.info.mean == pytest.approx((0.4914, 0.4822, 0.4465))

    # stratified seeded validation split; the folder itself is accepted as data_dir
    v = load_dataset("cifar10", folder, val_fraction=0.2, seed=1)
    assert (len(v.train), len(v.val), len(v.test)) == (80, 20, 20)
    assert np.array_equal(np.bincount(v.val.y.numpy(), minlength=10), [2] * 10)
    assert _rows(v.train.x) + _rows(v.val.x) == _rows(s.train.x)
    assert torch.equal(v.test.x, s.test.x)


def test_cifar100_fixture_round_trip(tmp_path):
    folder = write_fake_cifar100(tmp_path, n_train=200, n_test=100)
    tr = _read_official(folder / "train")
    assert {b"data", b"fine_labels", b"coarse_labels", b"batch_label", b"filenames"} <= set(tr)
    s = load_dataset("cifar100", tmp_path, val_fraction=0.0)
    assert torch.equal(s.train.x, torch.tensor(tr[b"data"]).reshape(200, 3, 32, 32).float() / 255)
    assert s.train.y.tolist() == tr[b"fine_labels"]
    assert set(s.test.y.tolist()) == set(range(100))
    assert s.info.num_classes == 100 and len(s.info.classes) == 100


def test_cifar_fixture_images_carry_class_signal(tmp_path):
    write_fake_cifar10(tmp_path)
    s = load_dataset("cifar10", tmp_path, val_fraction=0.0)
    # nearest class-mean colour classifies the test set (noise sd 20/255 per pixel averages out)
    means = torch.stack([s.train.x[s.train.y == c].mean((0, 2, 3)) for c in range(10)])
    pred = torch.cdist(s.test.x.mean((2, 3)), means).argmin(1)
    assert (pred == s.test.y).float().mean() > 0.9


def test_cifar_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", tmp_path)
    folder = write_fake_cifar10(tmp_path)
    (folder / "data_batch_2").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_2.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


# ------------------------------------------------------------------------------ augmentation


def test_crop_with_known_offsets_by_hand():
    img = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # rows 1-4, 5-8, 9-12, 13-16
    x = torch.cat([img, img])
    # pad 1; image 0 window at (dy=0, dx=2): out[i, j] = img[i - 1, j + 1]
    # image 1 window at (dy=2, dx=1): out[i, j] = img[i + 1, j]
    out = crop_with_offsets(x, 1, torch.tensor([0, 2]), torch.tensor([2, 1]))
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]]))
    assert torch.equal(out[1, 0], torch.tensor([[5.0, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [0, 0, 0, 0]]))
    ident = crop_with_offsets(x, 1, torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert torch.equal(ident, x)


def test_random_crop_is_one_of_the_padded_windows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 5, 6)
    out = augment_batch(x, AugmentSpec(crop_pad=2), g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for n in range(64):
        hits = [(a, b) for a in range(5) for b in range(5)
                if torch.equal(out[n], padded[n, :, a:a + 5, b:b + 6])]
        assert hits, f"image {n} is not a window of its padded image"
        seen.add(hits[0])
    assert len(seen) > 10  # offsets are drawn per image
    again = augment_batch(x, AugmentSpec(crop_pad=2), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_flip():
    x = torch.tensor([[[[1.0, 2, 3], [4, 5, 6]]]]).repeat(2, 1, 1, 1)
    out = flip_with_mask(x, torch.tensor([True, False]))
    assert torch.equal(out[0, 0], torch.tensor([[3.0, 2, 1], [6, 5, 4]]))
    assert torch.equal(out[1], x[1])
    y = torch.rand(400, 2, 3, 4)
    o = augment_batch(y, AugmentSpec(flip=True), torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o[n], y[n].flip(-1)) for n in range(400)])
    same = torch.tensor([torch.equal(o[n], y[n]) for n in range(400)])
    assert torch.all(flipped ^ same)
    assert 0.4 < flipped.float().mean() < 0.6  # p = 0.5 per image


def test_augment_identity_and_normalize():
    x = torch.rand(3, 2, 4, 4)
    assert augment_batch(x, AugmentSpec(), torch.Generator()) is x
    assert augment_batch(x, None, torch.Generator()) is x
    z = normalize(torch.tensor([[[[0.5]], [[1.0]]]]), (0.25, 0.5), (0.5, 0.25))
    assert torch.allclose(z.flatten(), torch.tensor([0.5, 2.0]))  # (.5-.25)/.5, (1-.5)/.25


# ------------------------------------------------------------------------------------ loader


def _toy(n=23):
    g = torch.Generator().manual_seed(3)
    return TensorSet(torch.rand(n, 2, 4, 4, generator=g), torch.arange(n) % 4)


def _collect(loader, e):
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader.epoch(e)]


def test_loader_determinism_and_coverage():
    ts = _toy()
    mk = lambda **kw: BatchLoader(ts, 5, seed=11, augment=AugmentSpec(1, True),  # noqa: E731
                                  mean=(0.5, 0.5), std=(0.25, 0.25), **kw)
    loader = mk()
    assert len(loader) == math.ceil(23 / 5) == 5
    a, b = _collect(loader, 3), _collect(loader, 3)
    _collect(loader, 4)
    c = _collect(mk(), 3)
    for (xa, ya, ia), (xb, yb, ib), (xc, _, _) in zip(a, b, c):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
        assert torch.equal(xa, xc)
    assert [len(i) for _, _, i in a] == [5, 5, 5, 5, 3]
    idx = torch.cat([i for _, _, i in a])
    assert sorted(idx.tolist()) == list(range(23))  # each index once
    for x, y, i in a:
        assert torch.equal(y, ts.y[i])
    d = _collect(loader, 4)
    assert not torch.equal(idx, torch.cat([i for _, _, i in d]))
    other_seed = BatchLoader(ts, 5, seed=12, mean=(0.5, 0.5), std=(0.25, 0.25))
    assert not torch.equal(idx, torch.cat([i for _, _, i in other_seed.epoch(3)]))


def test_loader_normalises_without_augment_and_drop_last():
    ts = _toy()
    loader = BatchLoader(ts, 5, shuffle=False, mean=(0.5, 0.2), std=(0.25, 0.5), drop_last=True)
    assert len(loader) == 4
    batches = _collect(loader, 0)
    idx = torch.cat([i for _, _, i in batches])
    assert idx.tolist() == list(range(20))
    x = torch.cat([b[0] for b in batches])
    raw = x * torch.tensor([0.25, 0.5]).view(1, 2, 1, 1) + torch.tensor([0.5, 0.2]).view(1, 2, 1, 1)
    assert torch.allclose(raw, ts.x[:20], atol=1e-6)


def test_shard_union_equals_global_epoch():
    ts = _toy(23)
    kw = dict(seed=5, augment=AugmentSpec(1, True), mean=(0.5, 0.5), std=(0.25, 0.25))
    world, b = 2, 3
    glob = BatchLoader(ts, b * world, **kw)
    base = BatchLoader(ts, b, **kw)
    ranks = [base.shard(r, world) for r in range(world)]
    assert len(glob) == math.ceil(23 / 6) == 4 and all(len(r) == 4 for r in ranks)
    for e in (0, 1):
        gb = _collect(glob, e)
        rb = [_collect(r, e) for r in ranks]
        for k, (gx, gy, gi) in enumerate(gb):
            # rank r holds positions r, r + world, ... of global batch k
            for r in range(world):
                x, y, i = rb[r][k]
                assert torch.equal(i, gi[r::world]) and torch.equal(y, gy[r::world])
                assert torch.equal(x, gx[r::world])  # same augmentation draws too
        everything = torch.cat([i for r in range(world) for _, _, i in rb[r]])
        assert sorted(everything.tolist()) == list(range(23))
    assert [len(i) for _, _, i in rb[0]] == [3, 3, 3, 3] and [len(i) for _, _, i in rb[1]] == [3, 3, 3, 2]
    full = [BatchLoader(ts, b, drop_last=True, **kw).shard(r, world) for r in range(world)]
    assert all(len(f) == 3 and all(len(i) == b for _, _, i in f.epoch(0)) for f in full)
    with pytest.raises(ValueError, match="rank"):
        base.shard(2, 2)
