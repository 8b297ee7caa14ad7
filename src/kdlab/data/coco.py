"""``coco``: a user's own detection data — an images folder plus a COCO-format annotation JSON,
read with ``pycocotools`` and streamed (one batch of decoded images in memory at a time).

Recipe keys: ``data.root`` (the images folder; ``file_name`` of each image is relative to it),
``data.image_size`` (``[H, W]`` every image is resized to; boxes are scaled with it; default
64×64), and ``data.kwargs``: ``ann`` (the annotation JSON), optionally ``val_ann`` / ``test_ann``
(their own JSONs over the same folder; without them ``val_fraction`` of the images of ``ann`` is
held out for validation by the run seed and another ``val_fraction`` for test by a fixed seed),
``max_objects`` (boxes kept per image, the largest first; default 20) and ``channels`` (1: grey,
3: RGB; default 3). Categories are mapped, by sorted id, to labels 0..K−1.

Bad input is not trained on: an annotation whose category id is not in ``categories``, whose box
has zero or negative width or height, or lies wholly outside its image is skipped; a box partly
outside is clipped to the image; an image missing from the folder is skipped with its boxes; the
loader prints ONE line with every count (``kdlab: coco: ...``). A file that is not COCO JSON, or
that leaves no usable box, is refused with one line naming the fix.

Items are ``(image [C, H, W] in [0, 1], target [max_objects, 5])`` with target rows
``[label, x1, y1, x2, y2]`` in resized pixels, ``label = −1`` padding (the layout of
:mod:`kdlab.data.mnist_canvas`). :class:`BoxDatasetLoader` streams them with kdlab's loader protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from kdlab.core.seeding import derive_seed
from kdlab.data.registry import register_dataset
from kdlab.data.splits import DatasetInfo, Splits
from kdlab.data.streaming import DatasetLoader


def _read_coco(ann: Path):
    try:
        from pycocotools.coco import COCO
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the coco data set needs pycocotools: pip install pycocotools "
                          "(or pip install 'kdlab[detection]')") from None
    if not ann.is_file():
        raise FileNotFoundError(f"coco: annotation file {ann} not found; set data.kwargs.ann to a COCO JSON")
    try:
        raw = json.loads(ann.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"coco: {ann} is not JSON ({e}); give a COCO-format annotation file") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(f"coco: {ann} is not a COCO annotation file (it needs lists 'images', 'annotations' "
                         f"and 'categories')")
    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise ValueError(f"coco: {ann}: an image, annotation or category lacks the key {e}; fix the file") from None
    return coco


class CocoBoxes(torch.utils.data.Dataset):
    """The usable images of one COCO file (module doc), read and resized on access."""

    def __init__(self, root: Path, records: list, hw, max_objects: int, channels: int):
        self.root, self.records, self.hw = Path(root), records, tuple(int(v) for v in hw)
        self.max_objects, self.channels = int(max_objects), int(channels)

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, idx) -> "CocoBoxes":
        return CocoBoxes(self.root, [self.records[i] for i in idx], self.hw, self.max_objects, self.channels)

    def __getitem__(self, i):
        from PIL import Image

        rec = self.records[i]
        H, W = self.hw
        with Image.open(self.root / rec["file"]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            w0, h0 = im.size
            im = im.resize((W, H), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
        x = torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())
        y = torch.full((self.max_objects, 5), -1.0)
        y[:, 1:] = 0.0
        sx, sy = W / w0, H / h0
        for k, (label, b) in enumerate(rec["boxes"][: self.max_objects]):
            y[k] = torch.tensor([float(label), b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy])
        return x, y


def clean_records(coco, root: Path, where: str):
    """``(records, counts)``: per usable image ``{"file", "boxes": [(label, [x1, y1, x2, y2])]}``
    (largest box first) and the counts of what was skipped or clipped."""
    cat_ids = sorted(int(c["id"]) for c in coco.dataset["categories"])
    label_of = {c: k for k, c in enumerate(cat_ids)}
    counts = {"unknown_category": 0, "zero_area": 0, "outside": 0, "clipped": 0, "missing_image": 0}
    records = []
    for img in coco.dataset["images"]:
        f = root / str(img.get("file_name", ""))
        anns = coco.imgToAnns.get(img["id"], [])
        if not f.is_file():
            counts["missing_image"] += 1
            continue
        W, H = float(img.get("width") or 0), float(img.get("height") or 0)
        if W <= 0 or H <= 0:
            from PIL import Image

            with Image.open(f) as im:
                W, H = float(im.size[0]), float(im.size[1])
        boxes = []
        for a in anns:
            if int(a.get("category_id", -1)) not in label_of:
                counts["unknown_category"] += 1
                continue
            bb = a.get("bbox")
            if not (isinstance(bb, list) and len(bb) == 4):
                raise ValueError(f"coco: {where}: annotation {a.get('id')} has bbox {bb!r}; COCO boxes are "
                                 f"[x, y, width, height]")
            x, y, w, h = (float(v) for v in bb)
            if not (w > 0 and h > 0) or not all(math.isfinite(v) for v in (x, y, w, h)):
                counts["zero_area"] += 1
                continue
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if x2 <= x1 or y2 <= y1:
                counts["outside"] += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                counts["clipped"] += 1
            boxes.append((label_of[int(a["category_id"])], [x1, y1, x2, y2]))
        boxes.sort(key=lambda lb: -(lb[1][2] - lb[1][0]) * (lb[1][3] - lb[1][1]))
        records.append({"file": str(img["file_name"]), "boxes": boxes, "id": img["id"]})
    return records, counts


def _load_file(ann, root, where):
    coco = _read_coco(Path(ann))
    records, counts = clean_records(coco, root, where)
    return coco, records, counts


def _say(counts: dict, where: str, max_objects: int, records) -> None:
    over = sum(max(0, len(r["boxes"]) - max_objects) for r in records)
    parts = [f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v]
    if over:
        parts.append(f"{over} boxes beyond max_objects={max_objects} (smallest dropped)")
    if parts:
        print(f"kdlab: coco: {where}: skipped or fixed: " + ", ".join(parts), file=sys.stderr)


@register_dataset("coco", description="your detection data: an images folder (data.root) + COCO JSON "
                                      "(data.kwargs.ann), streamed, read with pycocotools",
                  reference="https://cocodataset.org/#format-data")
def coco(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0, seed: int = 0, root=None,
         image_size=None, ann=None, val_ann=None, test_ann=None, max_objects: int = 20, channels: int = 3) -> Splits:
    """A COCO-format folder as :class:`Splits` (module doc)."""
    if label_fraction < 1.0:
        raise ValueError("coco: data.label_fraction < 1 is not supported for detection; remove it")
    if ann is None:
        raise ValueError("coco: set data.kwargs.ann to the COCO annotation JSON (and data.root to the images folder)")
    root = Path(root if root is not None else (data_dir or Path(ann).parent))
    if not root.is_dir():
        raise FileNotFoundError(f"coco: images folder {root} not found; set data.root")
    if channels not in (1, 3):
        raise ValueError(f"coco: data.kwargs.channels must be 1 or 3, got {channels}")
    if int(max_objects) < 1:
        raise ValueError(f"coco: data.kwargs.max_objects must be >= 1, got {max_objects}")
    hw = tuple(image_size) if image_size is not None else (64, 64)
    coco_tr, recs, counts = _load_file(ann, root, str(ann))
    n_cat = len(coco_tr.dataset["categories"])
    if n_cat < 2:
        raise ValueError(f"coco: {ann} has {n_cat} categories; kdlab's detectors need at least 2 "
                         f"(add a second category)")
    _say(counts, str(ann), max_objects, recs)
    split = {}
    for key, path in (("val", val_ann), ("test", test_ann)):
        if path is not None:
            c, r, cn = _load_file(path, root, str(path))
            if sorted(int(k["id"]) for k in c.dataset["categories"]) != sorted(int(k["id"]) for k in coco_tr.dataset["categories"]):
                raise ValueError(f"coco: {path} has other categories than {ann}; use one category list")
            _say(cn, str(path), max_objects, r)
            split[key] = r
    n = len(recs)
    order = list(range(n))
    if "test" not in split:
        rng = np.random.default_rng(derive_seed("coco", "test"))
        order = list(rng.permutation(n))
        k = max(1, int(round(n * val_fraction)))
        split["test"], order = [recs[i] for i in order[:k]], order[k:]
    if "val" not in split:
        rng = np.random.default_rng(derive_seed("coco", "val", seed))
        order = [order[i] for i in rng.permutation(len(order))]
        k = max(1, int(round(n * val_fraction)))
        split["val"], order = [recs[i] for i in order[:k]], order[k:]
    train = [recs[i] for i in sorted(order)]
    for key, r in (("train", train), ("val", split["val"]), ("test", split["test"])):
        if not r or not any(rec["boxes"] for rec in r):
            raise ValueError(f"coco: no usable box left in the {key} split of {ann} (see the skip counts above); "
                             f"fix the annotations or add images")
    cats = sorted(coco_tr.dataset["categories"], key=lambda c: int(c["id"]))
    info = DatasetInfo(name="coco", num_classes=n_cat, in_channels=int(channels), image_size=hw,
                       mean=(0.5,) * int(channels), std=(0.25,) * int(channels),
                       classes=tuple(str(c.get("name", c["id"])) for c in cats))
    mk = lambda r: CocoBoxes(root, r, hw, max_objects, channels)  # noqa: E731
    return Splits(train=mk(train), val=mk(split["val"]), test=mk(split["test"]), info=info)


def _collate(items):
    xs, ys = zip(*items)
    return torch.stack(xs).float(), torch.stack(ys).float()


class BoxDatasetLoader(DatasetLoader):
    """Streams a map-style detection dataset (items ``(image, target [M, 5])``) with kdlab's loader
    protocol: ``epoch(e)`` yields ``(x_norm, y, idx)``, a pure function of ``(seed, e)`` (the
    permutation is drawn as :class:`kdlab.data.BatchLoader` draws it); no augmentation (boxes would
    have to move with it). Batching, sharding and workers are :class:`~kdlab.data.streaming.DatasetLoader`'s."""

    collate = staticmethod(_collate)

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, mean=None, std=None,
                 device="cpu", num_workers: int = 0):
        if len(dataset) == 0:
            raise ValueError("the detection dataset is empty")
        super().__init__(dataset, batch_size, shuffle=shuffle, seed=seed, mean=mean, std=std, device=device,
                         num_workers=num_workers)

    def fingerprint(self) -> str:
        """What the teacher cache keys the data by: size and the first and last items."""
        h = hashlib.sha256(f"{type(self.dataset).__qualname__}:{self.n}".encode())
        for i in (0, self.n - 1):
            x, y = self.dataset[i]
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
        return h.hexdigest()[:20]
