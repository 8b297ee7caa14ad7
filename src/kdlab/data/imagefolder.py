"""``imagefolder``: a user's images in class-per-folder layout, decoded with Pillow, streamed.

    data: {name: imagefolder, root: DIR, image_size: [H, W]}

``DIR`` holds either ``train/``, ``val/`` and ``test/`` (each with one folder per class), or only
class folders, split here into test (``TEST_FRACTION`` = 20 %, fixed: it does not depend on the
seed), then val (``val_fraction``, seeded) and train — stratified by class. ``label_fraction < 1``
keeps a stratified part of the training images. Images are resized to ``[H, W]`` (any aspect
ratio) and converted to grey (1 channel) when every sampled image is grey, else RGB (3); the
per-channel mean and std come from up to 256 training images (seeded). Nothing is loaded whole:
each split is a map-style ``Dataset`` read by :class:`kdlab.data.streaming.DatasetLoader`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from kdlab.core.seeding import derive_seed
from kdlab.data.registry import register_dataset
from kdlab.data.splits import DatasetInfo, Splits, stratified_split, stratified_subset

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TEST_FRACTION = 0.2


#: Pillow modes of 16-bit grey images (PNG, TIFF); ``I`` (32-bit int) is read on the same 16-bit scale.
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_image(im, channels: int, hw: tuple[int, int]) -> np.ndarray:
    """A Pillow image as float32 in [0, 1], ``[H, W]`` (grey) or ``[H, W, 3]``, resized (bilinear)
    to ``hw``. 16-bit grey images are scaled by 65535 in floating point (Pillow's conversion to
    8 bits clips every value above 255, which made them all white); other modes are converted to
    8-bit L / RGB and scaled by 255."""
    from PIL import Image

    if im.mode in WIDE_GREY:
        a = np.asarray(im).astype(np.float32) / 65535.0
        a = np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float32)
        a = np.clip(a, 0.0, 1.0)
        return np.repeat(a[..., None], 3, axis=2) if channels == 3 else a
    im = im.convert("L" if channels == 1 else "RGB").resize((hw[1], hw[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


class ImageFiles(torch.utils.data.Dataset):
    """``(image, label)`` items of a list of files: float ``[C, H, W]`` in [0, 1]."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], hw: tuple[int, int], channels: int,
                 classes: Sequence[str] = ()):
        self.files, self.labels = list(files), [int(v) for v in labels]
        self.hw, self.channels, self.classes = tuple(hw), int(channels), list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with open_image(self.files[i]) as im:
            a = decode_image(im, self.channels, self.hw)
        x = torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())
        return x, self.labels[i]

    def subset(self, idx) -> "ImageFiles":
        return ImageFiles([self.files[i] for i in idx], [self.labels[i] for i in idx], self.hw,
                          self.channels, self.classes)


def open_image(path: Path):
    """``PIL.Image.open(path)``; a file Pillow cannot read (truncated, not an image) or refuses to
    decode (a decompression bomb: more than ``Image.MAX_IMAGE_PIXELS`` pixels) raises one line
    naming the file and what to do."""
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
        return im
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode safely ({e}); shrink or remove it") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"image {path} cannot be read ({e}); replace or remove it") from None


def scan(folder: Path, classes: Optional[list[str]] = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files and labels under ``folder/<class>/``, classes sorted by name."""
    if folder.is_file():
        raise ValueError(f"image folder {folder} is a file, not a folder; data.root must be the folder "
                         f"holding one folder per class (or train/ val/ test/)")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found (relative paths start at the current "
                                f"folder {Path.cwd()})")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes or found
    if not classes:
        raise ValueError(f"{folder} has no class folders; lay images out as {folder}/<class>/<image>.png")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folders {unknown} that the training folder lacks")
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((folder / c).rglob("*")):
            if f.suffix.lower() in EXTENSIONS:
                files.append(f)
                labels.append(k)
    if not files:
        raise ValueError(f"{folder} has no images ({', '.join(EXTENSIONS)})")
    return files, labels, classes


def _channels(files: Sequence[Path], seed: int) -> int:
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(files), size=min(32, len(files)), replace=False):
        with open_image(files[int(i)]) as im:
            if im.mode not in ("L", "1", "I", "I;16", "F", "LA"):
                return 3
    return 1


def channel_stats(ds, n: int = 256, seed: int = 0) -> tuple[tuple, tuple]:
    """Per-channel mean and std over up to ``n`` items of ``ds`` (seeded sample)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=min(n, len(ds)), replace=False)
    xs = torch.stack([torch.as_tensor(ds[int(i)][0]).float() for i in idx])
    mean = xs.mean(dim=(0, 2, 3))
    std = xs.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def splits_from_datasets(train, val, test, *, name: str = "user", seed: int = 0,
                         num_classes: Optional[int] = None) -> Splits:
    """:class:`Splits` of three map-style datasets (items ``(image [C, H, W], label)``): the shape from
    the first item, classes from ``train.classes`` or ``num_classes`` or the largest label seen in a
    sample of up to 1,000 items, mean/std from a sample of the training set."""
    x0, _ = train[0][0], train[0][1]
    c, h, w = tuple(torch.as_tensor(x0).shape)
    classes = list(getattr(train, "classes", []) or [])
    if not classes:
        if num_classes is None:
            rng = np.random.default_rng(0)
            sample = rng.choice(len(train), size=min(1000, len(train)), replace=False)
            num_classes = 1 + max(int(train[int(i)][1]) for i in sample)
        classes = [str(k) for k in range(num_classes)]
    mean, std = channel_stats(train, seed=derive_seed(seed, "stats"))
    info = DatasetInfo(name=name, num_classes=len(classes), in_channels=int(c), image_size=(int(h), int(w)),
                       mean=mean, std=std, classes=tuple(classes))
    return Splits(train=train, val=val, test=test, info=info)


@register_dataset("imagefolder", description="your images: root/<class>/*.png or root/{train,val,test}/<class>/"
                                             " (data.root, data.image_size [H, W]); streamed")
def imagefolder(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0, seed: int = 0,
                root: Optional[str] = None, image_size: Optional[Sequence[int]] = None) -> Splits:
    """Registered loader (see the module doc)."""
    root = root or data_dir
    if not root:
        raise ValueError("imagefolder needs data.root: the folder of class folders (or train/val/test)")
    if not image_size or len(image_size) != 2 or min(image_size) < 1:
        raise ValueError("imagefolder needs data.image_size: [H, W] (e.g. [32, 48])")
    root = Path(root)
    hw = (int(image_size[0]), int(image_size[1]))
    if (root / "train").is_dir():
        tr_files, tr_labels, classes = scan(root / "train")
        if (root / "test").is_dir():
            te_files, te_labels, _ = scan(root / "test", classes)
        else:
            raise ValueError(f"{root} has train/ but no test/; add test/ or use class folders directly under {root}")
        if (root / "val").is_dir():
            va_files, va_labels, _ = scan(root / "val", classes)
        else:
            rest, held = stratified_split(tr_labels, val_fraction, derive_seed(seed, "data", "imagefolder", "val"))
            va_files, va_labels = [tr_files[i] for i in held], [tr_labels[i] for i in held]
            tr_files, tr_labels = [tr_files[i] for i in rest], [tr_labels[i] for i in rest]
    else:
        files, labels, classes = scan(root)
        pool, test = stratified_split(labels, TEST_FRACTION, derive_seed(0, "data", "imagefolder", "test"))
        te_files, te_labels = [files[i] for i in test], [labels[i] for i in test]
        p_labels = [labels[i] for i in pool]
        rest, held = stratified_split(p_labels, val_fraction, derive_seed(seed, "data", "imagefolder", "val"))
        va_files, va_labels = [files[pool[i]] for i in held], [p_labels[i] for i in held]
        tr_files, tr_labels = [files[pool[i]] for i in rest], [p_labels[i] for i in rest]
    if label_fraction < 1.0:
        keep = stratified_subset(tr_labels, label_fraction, derive_seed(seed, "data", "imagefolder", "labels"))
        tr_files, tr_labels = [tr_files[i] for i in keep], [tr_labels[i] for i in keep]
    ch = _channels(tr_files, seed)
    mk = lambda f, l: ImageFiles(f, l, hw, ch, classes)  # noqa: E731
    out = splits_from_datasets(mk(tr_files, tr_labels), mk(va_files, va_labels), mk(te_files, te_labels),
                               name="imagefolder", seed=seed)
    return out
