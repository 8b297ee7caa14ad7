"""Tiny fake CIFAR-10 / CIFAR-100 folders in exactly the official "python version" format.

The official files are dicts pickled by Python 2 (protocol 2) whose keys and strings are
Python 2 ``str``, i.e. bytes: ``b"data"`` (uint8 ndarray ``[N, 3072]``: 1024 red, 1024 green,
1024 blue values, each 32x32 row-major), ``b"labels"`` / ``b"fine_labels"`` (list of int),
``b"batch_label"`` and ``b"filenames"`` (bytes). The pickler below writes bytes with the Python 2
``BINSTRING`` opcodes, so the files read like the real ones: ``pickle.load(f,
encoding="bytes")`` gives bytes keys.

Labels cover every class (round robin, then shuffled). Each image is a per-class mean colour
plus Gaussian noise (sd 20 grey levels), so a tiny model can learn from it.

Usage::

    from cifar_fixtures import write_fake_cifar10
    folder = write_fake_cifar10(tmp_path)            # tmp_path / "cifar-10-batches-py"
    splits = kdlab.data.load_dataset("cifar10", tmp_path)
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class _Py2StylePickler(pickle._Pickler):
    """Protocol-2 pickler that writes bytes as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def class_colours(num_classes: int) -> np.ndarray:
    """The fixed mean colour (0..255, float ``[num_classes, 3]``) of each fake class."""
    return np.random.default_rng(12345).uniform(40.0, 215.0, size=(num_classes, 3))


def fake_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, 3072]`` images: class colour + N(0, 20) noise, channel-major like CIFAR."""
    base = class_colours(num_classes)[labels][:, :, None, None]  # [N, 3, 1, 1]
    img = base + rng.normal(0.0, 20.0, size=(labels.size, 3, 32, 32))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(labels.size, 3072)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels covering every class as evenly as possible (all classes when n >= classes)."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _filenames(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}_{i:06d}.png".encode() for i in range(n)]


def write_fake_cifar10(root, n_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    Returns the ``cifar-10-batches-py`` folder.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = balanced_labels(5 * n_per_batch, 10, rng)
    for b in range(5):
        lab = train_labels[b * n_per_batch:(b + 1) * n_per_batch]
        _dump_py2(
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": [int(v) for v in lab],
                b"data": fake_images(lab, 10, rng),
                b"filenames": _filenames(f"train{b + 1}", lab.size),
            },
            folder / f"data_batch_{b + 1}",
        )
    test_labels = balanced_labels(n_test, 10, rng)
    _dump_py2(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(v) for v in test_labels],
            b"data": fake_images(test_labels, 10, rng),
            b"filenames": _filenames("test", n_test),
        },
        folder / "test_batch",
    )
    _dump_py2(
        {
            b"num_cases_per_batch": n_per_batch,
            b"label_names": [s.encode() for s in CIFAR10_NAMES],
            b"num_vis": 3072,
        },
        folder / "batches.meta",
    )
    return folder


def write_fake_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write ``root/cifar-100-python/{train, test, meta}`` (fine labels 0..99, coarse = fine // 5).

    Returns the ``cifar-100-python`` folder.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, n, title in (("train", n_train, b"training batch 1 of 1"),
                            ("test", n_test, b"testing batch 1 of 1")):
        fine = balanced_labels(n, 100, rng)
        _dump_py2(
            {
                b"filenames": _filenames(fname, n),
                b"batch_label": title,
                b"fine_labels": [int(v) for v in fine],
                b"coarse_labels": [int(v) // 5 for v in fine],
                b"data": fake_images(fine, 100, rng),
            },
            folder / fname,
        )
    _dump_py2(
        {
            b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)],
        },
        folder / "meta",
    )
    return folder
