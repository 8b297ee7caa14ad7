"""Datasets as in-memory tensors, deterministic batch loading and batched augmentation.

- `load_dataset(name, data_dir=None, *, val_fraction=0.1, label_fraction=1.0, seed=0) -> Splits`
- `register_dataset(name, description=...)`: decorator for a loader
  ``fn(data_dir=None, *, val_fraction, label_fraction, seed) -> Splits``; `DATASETS` (the
  `kdlab.core.registry.Registry`), `list_datasets()`; built in: digits, mnist5k, cifar10, cifar100
- `Splits(train, val, test, info)`, `TensorSet(x, y)`, `DatasetInfo(...)`
- `BatchLoader` (loader.py), `AugmentSpec` / `augment_batch` / `normalize` (augment.py)
"""

from __future__ import annotations

from kdlab.data.augment import AugmentSpec, augment_batch, normalize
from kdlab.data.loader import BatchLoader
from kdlab.data.registry import (
    DATASETS,
    check_dataset_name,
    dataset_name,
    list_datasets,
    register_dataset,
)
from kdlab.data.splits import DatasetInfo, Splits, TensorSet

# the built-in loaders register themselves on import (one file per data set)
from kdlab.data import cifar, coco, digits, identities, imagefolder, mnist5k, mnist_canvas  # noqa: E402,F401  (registration)


def from_factory(spec: str, *, val_fraction: float = 0.1, label_fraction: float = 1.0, seed: int = 0) -> Splits:
    """Splits from a user's ``module:function``: the function returns ``Splits``, or
    ``(train, val, test)`` datasets (map-style, items ``(image [C, H, W] in [0, 1], label)``)."""
    import importlib

    mod, _, fn = spec.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"data factory '{spec}' not found ({e}); give module:function on the Python path") from None
    out = f()
    if isinstance(out, Splits):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 3:
        from kdlab.data.imagefolder import splits_from_datasets

        return splits_from_datasets(*out, name=spec, seed=seed)
    raise ValueError(f"data factory '{spec}' returned {type(out).__name__}; return kdlab.data.Splits or "
                     f"(train, val, test) datasets")


def load_dataset(
    name: str,
    data_dir=None,
    *,
    val_fraction: float = 0.1,
    label_fraction: float = 1.0,
    seed: int = 0,
    **options,
) -> Splits:
    """Load ``name`` as train / val / test `TensorSet`s plus its `DatasetInfo`.

    ``name`` is looked up in the dataset registry (`kdlab.data.registry`; case, ``-`` and ``_``
    are ignored, an unknown name raises ValueError with the closest registered names).
    ``val_fraction``: stratified part of the training pool held out for validation (seeded by
    ``seed``). ``label_fraction``: stratified part of the remaining training set kept (at least
    one per class, seeded); the rest is dropped. The test set does not depend on ``seed``
    (digits: a fixed 25% split; mnist5k: a fixed 1,000 images; CIFAR: the official test set).
    ``data_dir`` is used by CIFAR only (default ``$KDLAB_DATA_DIR`` or ``./data``); see
    `kdlab.data.cifar`.
    """
    fn = DATASETS.get(dataset_name(name))
    if options:
        import inspect

        accepted = inspect.signature(fn).parameters
        extra = [k for k in options if k not in accepted]
        if extra:
            raise ValueError(f"data.{extra[0]} does not apply to data set '{name}' (it is for imagefolder "
                             f"and other loaders that take it); remove it")
    splits = fn(data_dir, val_fraction=val_fraction, label_fraction=label_fraction, seed=seed, **options)
    if not isinstance(splits, Splits):
        raise TypeError(f"dataset {name!r}: its loader {fn.__qualname__} returned "
                        f"{type(splits).__name__}, not kdlab.data.Splits")
    check_not_empty(splits, name, val_fraction, label_fraction)
    return splits


def check_not_empty(splits: Splits, name: str, val_fraction: float = 0.1, label_fraction: float = 1.0) -> None:
    """One line naming the setting when a split a run needs has no samples (``data.val_fraction``
    0.9999 holds out every training image; a folder with too few images per class)."""
    n = {k: (len(getattr(splits, k)) if getattr(splits, k, None) is not None else None)
         for k in ("train", "val", "test")}
    if n["train"] == 0:
        raise ValueError(f"data set '{name}': no training images are left (train 0, val {n['val']}, test "
                         f"{n['test']}) with data.val_fraction {val_fraction} and data.label_fraction "
                         f"{label_fraction}; lower data.val_fraction (e.g. 0.1) or raise data.label_fraction")
    if n["test"] == 0:
        raise ValueError(f"data set '{name}': the test split is empty; add test images")


__all__ = [
    "AugmentSpec",
    "BatchLoader",
    "DATASETS",
    "DatasetInfo",
    "Splits",
    "TensorSet",
    "augment_batch",
    "check_dataset_name",
    "dataset_name",
    "list_datasets",
    "load_dataset",
    "normalize",
    "register_dataset",
]
