"""Transfer sets: unlabelled images that join a student's training (Buciluă et al. 2006; Hinton
et al. 2015 call it the *transfer set*).

A recipe lists extra transfer sets under ``data.transfer``; each entry is ``{kind: <builder>,
...params}``. Builders return images ``[N, C, H, W]`` in [0, 1] of the data set's shape, which
join the training set with the label ``UNLABELLED`` (−1):

* ``folder`` (``path``): every image file under a folder (any layout), read in the data set's
  channels and size;
* ``factory`` (``fn: module:function``): a user's function returning a tensor, a ``TensorSet``
  (labels ignored) or a map-style ``Dataset`` of images or ``(image, label)`` items;
* ``munge`` (``k``, ``p``, ``s``): MUNGE synthetic data (:mod:`kdlab.data.munge`) from the
  training images;
* ``deepinv`` (``n``, ``iters``, ``lr``, ``a_bn``, ``a_tv``, ``batch_size``): DeepInversion images
  synthesised from the teacher (:func:`kdlab.distill.inversion.synthesize`).

Each builder is seeded by ``derive_seed(train.seed, "transfer", i, kind)`` (entry ``i``) and draws
from its own generator, never the global one.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class TransferContext:
    """What a builder may use: the training set, the data set info, a seed, and the teacher
    (``teacher()`` loads it on demand; None when the run has none) and device."""

    train: Any
    info: Any
    seed: int
    teacher: Optional[Callable[[], torch.nn.Module]] = None
    device: Any = "cpu"


_BUILDERS: dict[str, Callable] = {}


def register_transfer(kind: str):
    """Register ``fn(ctx: TransferContext, **params) -> images [N, C, H, W] in [0, 1]``."""

    def deco(fn):
        _BUILDERS[kind] = fn
        return fn

    return deco


def check_transfer_kind(kind: str) -> str:
    """``kind`` if it names a transfer-set builder, else ValueError with the closest names."""
    if kind in _BUILDERS:
        return kind
    if kind in LAZY_BUILDERS:
        import importlib

        importlib.import_module(LAZY_BUILDERS[kind])  # registers it
        if kind in _BUILDERS:
            return kind
    names = sorted(set(_BUILDERS) | set(LAZY_BUILDERS))
    close = difflib.get_close_matches(kind, names, n=2)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown transfer set kind {kind!r}{hint}; use one of {', '.join(names)}")


def _images_of(obj, info) -> torch.Tensor:
    from kdlab.data.splits import TensorSet

    if isinstance(obj, TensorSet):
        return obj.x
    if isinstance(obj, torch.Tensor):
        x = obj
    elif isinstance(obj, torch.utils.data.Dataset):
        items = [obj[i] for i in range(len(obj))]
        x = torch.stack([torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items])
    else:
        raise ValueError(f"a transfer factory returned {type(obj).__name__}; return images [N, C, H, W] "
                         f"in [0, 1], a kdlab TensorSet or a torch Dataset")
    x = x.float()
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(info.input_shape):
        raise ValueError(f"transfer images have shape {tuple(x.shape[1:])} but the data set's are "
                         f"{tuple(info.input_shape)}; give images of the data set's shape")
    return x


@register_transfer("folder")
def folder_images(ctx: TransferContext, path: str) -> torch.Tensor:
    """Every image file under ``path`` (recursively, sorted), converted to the data set's channels
    and size (bilinear), as floats in [0, 1]."""
    from kdlab.data.imagefolder import ImageFiles

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"transfer folder {root} not found; give data.transfer[].path as a folder of images")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"transfer folder {root} has no images ({', '.join(IMAGE_SUFFIXES)})")
    ds = ImageFiles(files, [-1] * len(files), ctx.info.hw, ctx.info.in_channels)
    return torch.stack([ds[i][0] for i in range(len(ds))])


@register_transfer("factory")
def factory_images(ctx: TransferContext, fn: str) -> torch.Tensor:
    """The images a user's ``module:function`` returns (called without arguments)."""
    import importlib

    mod, _, name = fn.partition(":")
    try:
        f = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"transfer factory '{fn}' not found ({e}); give module:function on the Python path") from None
    return _images_of(f(), ctx.info)


@register_transfer("munge")
def munge_set(ctx: TransferContext, k: int = 1, p: float = 0.5, s: float = 1.0) -> torch.Tensor:
    """MUNGE (Buciluă et al. 2006) of the training images: ``k`` times their number."""
    from kdlab.data.munge import munge_images

    if not isinstance(ctx.train, torch.utils.data.Dataset) and hasattr(ctx.train, "x"):
        x = ctx.train.x
    else:
        x = _images_of(ctx.train, ctx.info)
    return munge_images(x, k=k, p=p, s=s, seed=ctx.seed)


#: builders that live in higher packages, imported by name on first use: a DeepInversion set
#: needs the teacher's inversion (``kdlab.distill``), which ``data`` does not import
LAZY_BUILDERS = {"deepinv": "kdlab.distill.inversion"}


def build_transfer_images(kind: str, params: dict, ctx: TransferContext) -> torch.Tensor:
    """Run builder ``kind`` with ``params`` (checked against its signature)."""
    fn = _BUILDERS[check_transfer_kind(kind)]
    allowed = [n for n in inspect.signature(fn).parameters if n != "ctx"]
    for k in params:
        if k not in allowed:
            raise ValueError(f"data.transfer ({kind}): no parameter '{k}' (parameters: {', '.join(allowed)})")
    return fn(ctx, **params)


def with_transfer_sets(train, cfgs, ctx: TransferContext):
    """``train`` followed by the images of every transfer set in ``cfgs`` (labels −1); builders
    read ``ctx.train`` (the training set before any transfer set was added)."""
    from kdlab.core.seeding import derive_seed
    from kdlab.data.splits import TensorSet, concat_sets, unlabelled_set

    for i, cfg in enumerate(cfgs):
        sub = TransferContext(ctx.train, ctx.info, derive_seed(ctx.seed, "transfer", i, cfg.kind), ctx.teacher,
                              ctx.device)
        x = build_transfer_images(cfg.kind, cfg.params, sub)
        extra = unlabelled_set(x.cpu())
        if isinstance(train, TensorSet):
            train = concat_sets(train, extra)
        else:
            train = torch.utils.data.ConcatDataset([train, torch.utils.data.TensorDataset(extra.x, extra.y)])
    return train


class RelabelledDataset(torch.utils.data.Dataset):
    """A map-style dataset's images with new labels ``y`` (−1: unlabelled)."""

    def __init__(self, dataset, y: torch.Tensor):
        if len(dataset) != len(y):
            raise ValueError(f"RelabelledDataset: {len(dataset)} items but {len(y)} labels")
        self.dataset, self.y = dataset, torch.as_tensor(y, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (item[0] if isinstance(item, (tuple, list)) else item), int(self.y[i])
