"""Generated CIFAR-10-format data: a folder the ``cifar10`` data set reads like the real one.

:func:`write_synthetic_cifar` writes ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta}`` in the official "python version" layout (:mod:`kdlab.data.cifar`): dicts
pickled with protocol 2 and bytes keys, ``b"data"`` uint8 ``[N, 3072]`` (1024 red, then green,
then blue values of a 32x32 image, row-major), ``b"labels"`` a list of ints, plus
``b"batch_label"`` / ``b"filenames"``; ``batches.meta`` holds ``b"label_names"``.

The images have *structure a network can learn*, placed where a causal mask can find it. Image
i of class c (pixel values in 0..255, before rounding and clipping):

    img = 128 + 40·B_i + P_c  on a 16x16 patch at a random position (r, s),
    img = 128 + 40·B_i        elsewhere,   then  + N(0, noise²) per pixel,

* ``P_c`` [3, 16, 16]: the class's fixed pattern, ``70·sin(2π(f_c·(u·cos θ_c + v·sin θ_c)) + φ_c)``
  per channel with a class colour ``col_c`` in [−1, 1]³ (a grating: orientation θ_c, spatial
  frequency f_c, phase per channel), the same for every image of the class;
* ``B_i`` [3, 32, 32]: the image's own smooth background (a 4x4 standard-normal field per
  channel, bilinearly upsampled), unrelated to the class;
* ``(r, s)`` uniform in ``0..16``: where the patch sits (so the evidence moves between images and
  the crop/flip augmentation changes what a view shows).

Labels cover every class as evenly as possible, shuffled. Everything is a function of ``seed``.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PATCH = 16


def class_patterns(num_classes: int = 10, seed: int = 0) -> np.ndarray:
    """``P_c`` (float64 ``[num_classes, 3, 16, 16]``, values in [−70, 70]): one coloured grating
    per class (module doc). Orientation ``θ_c = π·c/num_classes``, frequency
    ``f_c = (1 + c mod 3)/8`` cycles per pixel, channel phases and colour from ``seed``."""
    rng = np.random.default_rng([seed, 1])
    u, v = np.meshgrid(np.arange(PATCH), np.arange(PATCH), indexing="ij")
    out = np.empty((num_classes, 3, PATCH, PATCH))
    for c in range(num_classes):
        theta = math.pi * c / num_classes
        f = (1 + c % 3) / 8.0
        col = rng.uniform(-1.0, 1.0, size=3)
        phase = rng.uniform(0.0, 2 * math.pi, size=3)
        wave = f * (u * math.cos(theta) + v * math.sin(theta))
        for ch in range(3):
            out[c, ch] = 70.0 * col[ch] * np.sin(2 * math.pi * wave + phase[ch])
    return out


def synthetic_images(labels: np.ndarray, num_classes: int = 10, noise: float = 24.0,
                     seed: int = 0) -> np.ndarray:
    """uint8 ``[N, 3072]`` images (channel-major, like CIFAR) of the classes ``labels`` (module doc)."""
    n = int(labels.size)
    rng = np.random.default_rng([seed, 2])
    pats = class_patterns(num_classes, seed)
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    bg = F.interpolate(torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64), size=(32, 32),
                       mode="bilinear", align_corners=False).numpy()
    img = 128.0 + 40.0 * bg
    pos = rng.integers(0, 32 - PATCH + 1, size=(n, 2))
    for i in range(n):
        r, s = pos[i]
        img[i, :, r:r + PATCH, s:s + PATCH] += pats[labels[i]]
    img += rng.normal(0.0, noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(n, 3072)


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _dump(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    tmp.replace(path)


def write_synthetic_cifar(root, n_train: int = 2560, n_test: int = 512, seed: int = 0,
                          noise: float = 24.0) -> Path:
    """Write ``n_train`` training images (split over the five ``data_batch_k`` files) and
    ``n_test`` test images of the generated 10-class data set (module doc) into
    ``<root>/cifar-10-batches-py``; returns that folder. ``kdlab`` reads it as ``cifar10`` with
    ``data.data_dir: <root>`` (or ``--data-dir <root>``)."""
    n_train, n_test = int(n_train), int(n_test)
    if n_train < 10 or n_test < 10:
        raise ValueError(f"write_synthetic_cifar needs at least 10 training and 10 test images (one per "
                         f"class), got {n_train} and {n_test}")
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    y_train, y_test = _labels(n_train, 10, rng), _labels(n_test, 10, rng)
    x_all = synthetic_images(np.concatenate([y_train, y_test]), 10, noise, seed)
    x_train, x_test = x_all[:n_train], x_all[n_train:]
    bounds = np.linspace(0, n_train, 6).round().astype(int)
    for b in range(5):
        a, e = bounds[b], bounds[b + 1]
        _dump({b"batch_label": f"training batch {b + 1} of 5".encode(),
               b"labels": [int(v) for v in y_train[a:e]], b"data": x_train[a:e],
               b"filenames": [f"synthetic_train_{i:06d}.png".encode() for i in range(a, e)]},
              folder / f"data_batch_{b + 1}")
    _dump({b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in y_test], b"data": x_test,
           b"filenames": [f"synthetic_test_{i:06d}.png".encode() for i in range(n_test)]},
          folder / "test_batch")
    _dump({b"num_cases_per_batch": int(bounds[1]), b"label_names": [s.encode() for s in CLASS_NAMES],
           b"num_vis": 3072}, folder / "batches.meta")
    return folder
