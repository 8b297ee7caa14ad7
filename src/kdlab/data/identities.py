"""Identity data sets for face-verification style tasks (``task: faces``, docs/faces.md).

``mnist-identities``: every one of the 5,000 real mnist5k images is an *identity*; its samples
are deterministic random variants of it (affine warp, elastic deformation, contrast/brightness,
Gaussian blur, occlusion), so telling whether two variants come from the same base image is a
verification problem with real intra-identity variation. Identities are disjoint between splits:

* test: the 1,000 images of mnist5k's fixed test split (1,000 identities, ``SAMPLES`` variants
  each);
* the other 4,000 form the pool; ``val_fraction`` of its identities (fixed: they do not depend on
  the run seed, so a teacher trained with seed 0 never saw any seed's validation identities) are
  the validation identities, the rest the training identities (3,600 classes at 0.1).

The validation and test splits are :class:`PairSet` s: the images plus an LFW-style protocol of
10 folds of genuine and impostor pairs (identities disjoint between folds; half of each fold's
impostors pair two identities of the same digit class, the other half different classes).

``faces-folder``: a user's folder with one sub-folder per identity (``root``/``<id>``/images),
read at ``image_size``; an optional LFW-format ``pairs.txt`` in the root names the test pairs
(its identities form the test split, the others training and validation). Without one, a fixed
20% of the identities are the test split and its pairs are drawn like the MNIST protocol.

:func:`lfw_subset_images` gives scikit-image's 100 real 25x25 face crops (no identities) as an
unlabelled transfer set (``data.transfer: [{kind: factory, fn: kdlab.data.identities:lfw_faces_28}]``).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.core.seeding import derive_seed
from kdlab.data.registry import register_dataset
from kdlab.data.splits import DatasetInfo, Splits, TensorSet

SAMPLES = 4  # variants per identity (train, val and test)
FOLDS = 10
PAIRS_PER_FOLD = 300  # genuine and as many impostor pairs per fold, at most (LFW: 300 + 300)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class PairSet(TensorSet):
    """Images of a verification split, their identity labels, and the pair protocol.

    ``pairs``: int64 ``[P, 4]`` rows ``(i, j, same, fold)``: indices of two images of this set,
    1 for a genuine pair (same identity) and 0 for an impostor pair, and the fold 0..F−1.
    """

    pairs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))

    def __post_init__(self) -> None:
        super().__post_init__()
        p = self.pairs
        if p.dim() != 2 or p.shape[1] != 4 or p.dtype != torch.int64:
            raise ValueError(f"PairSet.pairs must be int64 [P, 4] (i, j, same, fold), got {p.dtype} {tuple(p.shape)}")
        if p.numel() and (int(p[:, :2].min()) < 0 or int(p[:, :2].max()) >= len(self)):
            raise ValueError("PairSet.pairs index images outside the set")

    def subset(self, idx) -> TensorSet:  # a subset has no pair protocol
        return TensorSet(self.x[torch.as_tensor(np.asarray(idx))], self.y[torch.as_tensor(np.asarray(idx))])

    def to(self, device) -> "PairSet":
        return PairSet(self.x.to(device), self.y.to(device), self.pairs)


# --------------------------------------------------------------------------- the variants
def gaussian_kernel1d(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels ``[N, 2r+1]`` for per-sample ``sigma`` (sigma 0 -> identity)."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp_min(1e-3).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    return k / k.sum(1, keepdim=True)


def blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Separable Gaussian blur of each image of ``x`` [N, C, H, W] with its own ``sigma``."""
    n, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, radius).repeat_interleave(c, 0)  # [N*C, K]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def make_variants(base: torch.Tensor, seed: int, *, rotate: float = 12.0, scale: float = 0.1,
                  shear: float = 0.15, translate: float = 0.08, elastic: float = 0.06,
                  contrast: tuple = (0.7, 1.1), brightness: float = 0.15, max_blur: float = 1.0,
                  p_occlude: float = 0.4, occlude: tuple = (0.2, 0.4)) -> torch.Tensor:
    """One random variant of every image of ``base`` [N, C, H, W] in [0, 1], drawn from ``seed``:
    affine warp (rotation ±``rotate``°, scale 1±``scale``, shear, translation ±``translate`` of
    the half-width) plus a smooth elastic displacement (Gaussian-filtered noise, amplitude
    ``elastic`` in normalised coordinates) in one bilinear resampling; then contrast ``c`` and
    brightness ``b`` (``c·x + b``), a Gaussian blur (sigma up to ``max_blur`` px) and, with
    probability ``p_occlude``, a rectangle (``occlude``: its sides as fractions of the image's)
    filled with one grey."""
    g = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    n, c, h, w = base.shape
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    ang = (u(n) * 2 - 1) * math.radians(rotate)
    sc = 1 + (u(n) * 2 - 1) * scale
    sh = (u(n) * 2 - 1) * shear
    tx, ty = (u(n) * 2 - 1) * translate, (u(n) * 2 - 1) * translate
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin + sh * cos, tx], 1),
                         torch.stack([sin, cos + sh * sin, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, c, h, w), align_corners=False)
    noise = torch.randn(n, 2, h, w, generator=g)
    field_ = blur(noise, torch.full((n,), 3.0), radius=6)
    field_ = field_ / field_.flatten(1).abs().amax(1).clamp_min(1e-6).view(n, 1, 1, 1)
    grid = grid + elastic * field_.permute(0, 2, 3, 1)
    x = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    con = contrast[0] + u(n) * (contrast[1] - contrast[0])
    bri = u(n) * brightness
    x = (x * con.view(n, 1, 1, 1) + bri.view(n, 1, 1, 1)).clamp(0, 1)
    x = blur(x, u(n) * max_blur)
    occ = u(n) < p_occlude
    oh = (h * (occlude[0] + (occlude[1] - occlude[0]) * u(n))).long()
    ow = (w * (occlude[0] + (occlude[1] - occlude[0]) * u(n))).long()
    oy = (u(n) * (h - oh + 1).float()).long()
    ox = (u(n) * (w - ow + 1).float()).long()
    val = u(n)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    box = ((rows >= oy.view(-1, 1, 1)) & (rows < (oy + oh).view(-1, 1, 1))
           & (cols >= ox.view(-1, 1, 1)) & (cols < (ox + ow).view(-1, 1, 1)) & occ.view(-1, 1, 1))
    x = torch.where(box.unsqueeze(1), val.view(n, 1, 1, 1).expand_as(x), x)
    return x.clamp(0, 1)


@functools.lru_cache(maxsize=1)
def mnist_identity_bases() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pool_x [4000,1,28,28], pool_digit [4000], test_x [1000,1,28,28], test_digit [1000])``:
    mnist5k's fixed test images and its 4,000-image pool in a fixed order (read with seed 0)."""
    from kdlab.data.mnist5k import mnist5k

    s = mnist5k(val_fraction=0.1, seed=0)
    return (torch.cat([s.train.x, s.val.x]), torch.cat([s.train.y, s.val.y]), s.test.x, s.test.y)


@functools.lru_cache(maxsize=4)
def variants_of(which: str, samples: int = SAMPLES) -> torch.Tensor:
    """``[N, samples, 1, 28, 28]``: the variants of the ``pool`` or ``test`` base images. Variant
    ``k`` is drawn from ``derive_seed("mnist-identities", which, k)``: fixed for every run."""
    px, _, tx, _ = mnist_identity_bases()
    base = px if which == "pool" else tx
    out = torch.stack([make_variants(base, derive_seed("mnist-identities", which, k)) for k in range(samples)], 1)
    return out


# --------------------------------------------------------------------------- the pair protocol
def make_pairs(ids: np.ndarray, groups: Optional[np.ndarray], seed: int, *, folds: int = FOLDS,
               per_fold: int = PAIRS_PER_FOLD) -> np.ndarray:
    """An LFW-style protocol over images with identity labels ``ids`` [N] (and optional
    ``groups`` [N], e.g. the digit class): int64 ``[P, 4]`` rows ``(i, j, same, fold)``.

    Identities are dealt to ``folds`` folds (disjoint; with fewer than 2·folds identities, pairs
    are dealt to folds round-robin instead). Each fold gets up to ``per_fold`` genuine pairs (two
    different images of one identity) and as many impostor pairs (two identities of the fold);
    with ``groups``, half of the impostors pair identities of the same group (hard impostors)."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids)
    uniq = rng.permutation(np.unique(ids))
    by_id = {int(u): np.flatnonzero(ids == u) for u in uniq}
    if any(len(v) < 2 for v in by_id.values()):
        bad = next(u for u, v in by_id.items() if len(v) < 2)
        raise ValueError(f"identity {bad} has one image; a genuine pair needs two images of each identity")
    if len(uniq) < 2:
        raise ValueError("a verification split needs at least two identities (impostor pairs)")
    disjoint = len(uniq) >= 2 * folds
    parts = np.array_split(uniq, folds) if disjoint else [uniq]
    rows = []
    for f, part in enumerate(parts):
        gen = [(a, b) for u in part for k, a in enumerate(by_id[int(u)]) for b in by_id[int(u)][k + 1:]]
        n = min(per_fold if disjoint else per_fold * folds, len(gen))
        pick = rng.permutation(len(gen))[:n]
        genuine = [(int(gen[p][0]), int(gen[p][1]), 1) for p in pick]
        impostor, seen, tries = [], set(), 0
        want_same = n // 2 if groups is not None else 0
        while len(impostor) < n and tries < 50 * n + 100:
            tries += 1
            hard = len(impostor) < want_same
            a = int(part[rng.integers(len(part))])
            cands = part[part != a]
            if groups is not None:
                ga = groups[by_id[a][0]]
                same_g = np.array([groups[by_id[int(c)][0]] == ga for c in cands], dtype=bool)
                cands = cands[same_g] if hard else cands[~same_g]
            if not len(cands):
                continue
            b = int(cands[rng.integers(len(cands))])
            i, j = int(rng.choice(by_id[a])), int(rng.choice(by_id[b]))
            key = (min(i, j), max(i, j))
            if key in seen:
                continue
            seen.add(key)
            impostor.append((i, j, 0))
        rows += [(i, j, s, f) for i, j, s in genuine + impostor]
    out = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    if not disjoint:  # round-robin folds, genuine and impostor pairs dealt separately
        for s in (0, 1):
            m = np.flatnonzero(out[:, 2] == s)
            out[m, 3] = np.arange(len(m)) % folds
    return out


def pair_set(x: torch.Tensor, ids: np.ndarray, groups, seed: int, **kw) -> PairSet:
    pairs = torch.from_numpy(make_pairs(ids, groups, seed, **kw))
    return PairSet(x, torch.as_tensor(np.asarray(ids), dtype=torch.int64), pairs)


def flat(v: torch.Tensor, id_offset: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``[N, S, C, H, W]`` variants -> images ``[N·S, C, H, W]`` and identity labels."""
    n, s = v.shape[:2]
    return v.reshape(n * s, *v.shape[2:]).contiguous(), np.repeat(np.arange(n) + id_offset, s)


MNIST_IDS_VAL_SEED = derive_seed("mnist-identities", "val")
MNIST_IDS_PAIR_SEED = derive_seed("mnist-identities", "pairs")


@register_dataset("mnist-identities",
                  description="face-verification stand-in: each of the 5,000 mnist5k images an identity, "
                              "4 random variants each; 4,000 pool / 1,000 test identities, LFW-style pairs",
                  reference="docs/faces.md")
def mnist_identities(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0,
                     seed: int = 0, image_size=None) -> Splits:
    """See the module docstring. ``label_fraction`` < 1 keeps that share of the training
    identities (all their samples); ``image_size`` [H, W] resizes every image (area / bilinear)."""
    from kdlab.data.splits import check_fraction

    check_fraction("val_fraction", val_fraction, low_open=True, high_open=True)
    check_fraction("label_fraction", label_fraction, low_open=True, high_open=False)
    _, pdig, _, tdig = mnist_identity_bases()
    pool, test = variants_of("pool"), variants_of("test")
    n_pool = pool.shape[0]
    perm = np.random.default_rng(MNIST_IDS_VAL_SEED).permutation(n_pool)
    n_val = max(2, int(round(val_fraction * n_pool)))
    val_ids, train_ids = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if label_fraction < 1.0:
        keep = np.random.default_rng(derive_seed("mnist-identities", "labels", seed)).permutation(len(train_ids))
        train_ids = np.sort(train_ids[keep[:max(2, int(round(label_fraction * len(train_ids))))]])
    tx, ty = flat(pool[torch.from_numpy(train_ids)])
    vx, vy = flat(pool[torch.from_numpy(val_ids)])
    ex, ey = flat(test)
    vgroups = np.repeat(pdig.numpy()[val_ids], SAMPLES)
    egroups = np.repeat(tdig.numpy(), SAMPLES)
    if image_size is not None:
        tx, vx, ex = (resize(a, image_size) for a in (tx, vx, ex))
    mean, std = float(tx.mean()), float(tx.std())
    info = DatasetInfo(name="mnist-identities", num_classes=len(train_ids), in_channels=1,
                       image_size=tuple(tx.shape[-2:]) if image_size is not None else 28,
                       mean=(round(mean, 6),), std=(round(std, 6),),
                       classes=tuple(f"id{int(i)}" for i in train_ids))
    return Splits(train=TensorSet(tx, torch.from_numpy(ty)),
                  val=pair_set(vx, vy, vgroups, derive_seed(MNIST_IDS_PAIR_SEED, "val")),
                  test=pair_set(ex, ey, egroups, derive_seed(MNIST_IDS_PAIR_SEED, "test")), info=info)


def resize(x: torch.Tensor, hw) -> torch.Tensor:
    h, w = int(hw[0]), int(hw[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x
    mode = "area" if h <= x.shape[-2] and w <= x.shape[-1] else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(h, w), mode=mode, **kw).clamp(0, 1)


# --------------------------------------------------------------------------- a user's folder
def identity_folders(root: Path) -> dict[str, list[Path]]:
    """``{identity: sorted image files}`` of ``root/<identity>/``; every identity needs two images."""
    if not root.is_dir():
        raise FileNotFoundError(f"faces-folder: {root} not found; give data.root as a folder with one "
                                f"sub-folder of images per identity")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) == 1:
            raise ValueError(f"faces-folder: identity {d.name} has one image ({files[0].name}); every identity "
                             f"needs at least two (genuine pairs, margin training): add images or remove {d}")
        if files:
            out[d.name] = files
    if len(out) < 4:
        raise ValueError(f"faces-folder: {root} has {len(out)} identity folders with images; give at least 4 "
                         f"(training, validation and test identities are disjoint)")
    return out


def lfw_image(folders: dict, name: str, n: int, where: str) -> Path:
    """The file of identity ``name``'s image number ``n`` (1-based): ``name_000n.*`` when such a
    file exists (LFW's naming), else the n-th file in sorted order."""
    files = folders.get(name)
    if files is None:
        raise ValueError(f"{where} names identity {name!r}, which has no folder with images under the root; "
                         f"fix the line or add the folder")
    for f in files:
        if f.stem == f"{name}_{n:04d}":
            return f
    if not 1 <= n <= len(files):
        raise ValueError(f"{where} names image {n} of {name!r}, which has {len(files)} images; fix the line "
                         f"or add the image ({name}/{name}_{n:04d}.jpg)")
    return files[n - 1]


def read_pairs_txt(path: Path, folders: dict) -> tuple[list, int]:
    """An LFW-format ``pairs.txt``: ``[(file_a, file_b, same, fold)]`` and the number of folds.
    First line ``<folds> <pairs per fold>`` (or absent); then per fold that many matched lines
    ``name n1 n2`` and as many mismatched lines ``name1 n1 name2 n2``."""
    lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines()]
    numbered = [(k + 1, t) for k, t in enumerate(lines) if t]
    if not numbered:
        raise ValueError(f"{path} is empty; write LFW-format pairs (docs/faces.md)")
    folds, per = 1, None
    if len(numbered[0][1]) <= 2 and all(re.fullmatch(r"\d+", t) for t in numbered[0][1]):
        head = [int(t) for t in numbered[0][1]]
        numbered = numbered[1:]
        folds = head[0] if len(head) == 2 else 1
        per = head[1] if len(head) == 2 else None
    rows = []
    for k, (ln, t) in enumerate(numbered):
        where = f"{path} line {ln}"
        fold = min(k // (2 * per), folds - 1) if per else 0
        try:
            if len(t) == 3:
                rows.append((lfw_image(folders, t[0], int(t[1]), where), lfw_image(folders, t[0], int(t[2]), where), 1, fold))
            elif len(t) == 4:
                rows.append((lfw_image(folders, t[0], int(t[1]), where), lfw_image(folders, t[2], int(t[3]), where), 0, fold))
            else:
                raise ValueError(f"{where}: a pair line is 'name n1 n2' or 'name1 n1 name2 n2', got {' '.join(t)!r}")
        except ValueError as e:
            if "invalid literal" in str(e):
                raise ValueError(f"{where}: image numbers must be whole numbers, got {' '.join(t)!r}") from None
            raise
    if not any(r[2] == 1 for r in rows) or not any(r[2] == 0 for r in rows):
        raise ValueError(f"{path} needs both genuine (name n1 n2) and impostor (name1 n1 name2 n2) pairs")
    if folds == 1:  # no fold header: deal pairs to 10 folds round-robin (genuine and impostor apart)
        folds = min(FOLDS, min(sum(r[2] == s for r in rows) for s in (0, 1)))
        counters = {0: 0, 1: 0}
        out = []
        for a, b, s, _ in rows:
            out.append((a, b, s, counters[s] % folds))
            counters[s] += 1
        rows = out
    return rows, folds


FOLDER_TEST_SEED = derive_seed("faces-folder", "test")


@register_dataset("faces-folder",
                  description="your faces: data.root/<identity>/<images>, data.image_size [H, W], optional "
                              "LFW-format root/pairs.txt for the test pairs",
                  reference="docs/faces.md")
def faces_folder(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0, seed: int = 0,
                 root: Optional[str] = None, image_size=None) -> Splits:
    from kdlab.data.imagefolder import ImageFiles

    if root is None and data_dir is None:
        raise ValueError("faces-folder needs data.root: a folder with one sub-folder of images per identity")
    if image_size is None:
        raise ValueError("faces-folder needs data.image_size: [H, W] (e.g. [28, 28])")
    base = Path(root if root is not None else data_dir)
    folders = identity_folders(base)
    names = sorted(folders)
    from PIL import Image

    with Image.open(folders[names[0]][0]) as im:
        channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3

    def load(files):
        ds = ImageFiles(files, [0] * len(files), tuple(image_size), channels)
        return torch.stack([ds[i][0] for i in range(len(ds))])

    pairs_file = base / "pairs.txt"
    if pairs_file.is_file():
        rows, _ = read_pairs_txt(pairs_file, folders)
        test_names = sorted({p.parent.name for r in rows for p in r[:2]})
    else:
        rows = None
        perm = np.random.default_rng(FOLDER_TEST_SEED).permutation(len(names))
        test_names = sorted(names[i] for i in perm[:max(2, int(round(0.2 * len(names))))])
    pool = [n for n in names if n not in set(test_names)]
    perm = np.random.default_rng(derive_seed("faces-folder", "val")).permutation(len(pool))
    n_val = max(2, int(round(val_fraction * len(pool))))
    val_names, train_names = sorted(pool[i] for i in perm[:n_val]), sorted(pool[i] for i in perm[n_val:])
    if len(train_names) < 2:
        raise ValueError(f"faces-folder: {base} leaves {len(train_names)} training identities after the test and "
                         f"validation ones; add identity folders")

    def gather(ns):
        files = [f for n in ns for f in folders[n]]
        ids = np.asarray([k for k, n in enumerate(ns) for _ in folders[n]])
        return files, ids

    tf, tid = gather(train_names)
    vf, vid = gather(val_names)
    ef, eid = gather(test_names)
    tx, vx, ex = load(tf), load(vf), load(ef)
    if rows is not None:
        index = {f: k for k, f in enumerate(ef)}
        pairs = torch.as_tensor([(index[a], index[b], s, f) for a, b, s, f in rows], dtype=torch.int64)
        test = PairSet(ex, torch.from_numpy(eid), pairs)
    else:
        test = pair_set(ex, eid, None, derive_seed("faces-folder", "pairs", "test"))
    mean = tuple(round(float(v), 6) for v in tx.mean(dim=(0, 2, 3)))
    std = tuple(round(max(float(v), 1e-3), 6) for v in tx.std(dim=(0, 2, 3)))
    info = DatasetInfo(name="faces-folder", num_classes=len(train_names), in_channels=channels,
                       image_size=tuple(int(v) for v in image_size), mean=mean, std=std,
                       classes=tuple(train_names))
    return Splits(train=TensorSet(tx, torch.from_numpy(tid)),
                  val=pair_set(vx, vid, None, derive_seed("faces-folder", "pairs", "val")), test=test, info=info)


# --------------------------------------------------------------------------- real faces, no identities
def lfw_subset_images() -> torch.Tensor:
    """scikit-image's ``data.lfw_subset()`` faces: the first 100 of its 200 25x25 crops (the others
    are non-faces), as ``[100, 1, 25, 25]`` in [0, 1] (``pip install scikit-image``)."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise ImportError("the LFW subset ships with scikit-image: pip install scikit-image "
                          "(or pip install 'kdlab[all]')") from None
    a = np.asarray(lfw_subset()[:100], dtype=np.float32)
    if a.max() > 1.0:
        a = a / 255.0
    return torch.from_numpy(a).unsqueeze(1).clamp(0, 1)


def lfw_faces_28() -> torch.Tensor:
    """:func:`lfw_subset_images` resized to 28x28 (bilinear): a transfer set for mnist-identities."""
    return resize(lfw_subset_images(), (28, 28))
