"""Datasets as in-memory tensors, deterministic batch loading and batched augmentation.

- `load_dataset(name, data_dir=None, *, val_fraction=0.1, label_fraction=1.0, seed=0) -> Splits`
- `Splits(train, val, test, info)`, `TensorSet(x, y)`, `DatasetInfo(...)`
- `BatchLoader` (loader.py), `AugmentSpec` / `augment_batch` / `normalize` (augment.py)
"""

from __future__ import annotations

from kdlab.data.augment import AugmentSpec, augment_batch, normalize
from kdlab.data.loader import BatchLoader
from kdlab.data.splits import DatasetInfo, Splits, TensorSet

DATASETS: dict[str, str] = {
    "digits": "scikit-learn 8x8 digits, 10 classes, 1 channel (bundled, no download)",
    "cifar10": "CIFAR-10, 32x32 RGB, 10 classes (python pickles in data_dir)",
    "cifar100": "CIFAR-100, 32x32 RGB, 100 fine classes (python pickles in data_dir)",
}


def list_datasets() -> list[tuple[str, str]]:
    return list(DATASETS.items())


def load_dataset(
    name: str,
    data_dir=None,
    *,
    val_fraction: float = 0.1,
    label_fraction: float = 1.0,
    seed: int = 0,
) -> Splits:
    """Load ``name`` as train / val / test `TensorSet`s plus its `DatasetInfo`.

    ``val_fraction``: stratified part of the training pool held out for validation (seeded by
    ``seed``). ``label_fraction``: stratified part of the remaining training set kept (at least
    one per class, seeded); the rest is dropped. The test set does not depend on ``seed``
    (digits: a fixed 25% split; CIFAR: the official test set). ``data_dir`` is used by CIFAR
    only (default ``$KDLAB_DATA_DIR`` or ``./data``); see `kdlab.data.cifar`.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key == "digits":
        from kdlab.data.digits import load_digits_splits

        return load_digits_splits(val_fraction=val_fraction, label_fraction=label_fraction, seed=seed)
    if key in ("cifar10", "cifar100"):
        from kdlab.data.cifar import load_cifar_splits

        return load_cifar_splits(
            key, data_dir, val_fraction=val_fraction, label_fraction=label_fraction, seed=seed
        )
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


__all__ = [
    "AugmentSpec",
    "BatchLoader",
    "DATASETS",
    "DatasetInfo",
    "Splits",
    "TensorSet",
    "augment_batch",
    "list_datasets",
    "load_dataset",
    "normalize",
]
