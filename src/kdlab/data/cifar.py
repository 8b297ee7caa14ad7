"""CIFAR-10 / CIFAR-100 from the official "python version" pickles (no torchvision).

Expected layout (what the official archives extract to)::

    <data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <data_dir>/cifar-100-python/{train, test, meta}

``data_dir`` may also point at the ``cifar-10-batches-py`` / ``cifar-100-python`` folder itself.
The files were pickled by Python 2, so they are read with ``encoding="bytes"`` by an unpickler
that builds only containers, numbers, strings and numpy arrays (:class:`DataUnpickler`: a file naming
any other Python object is refused, nothing in it runs) and their keys are bytes (``b"data"``, ``b"labels"``, ...); str keys are accepted as well.
``data`` is uint8 ``[N, 3072]`` (1024 red, then green, then blue values, row-major 32x32);
it becomes float32 ``[N, 3, 32, 32]`` / 255.

The test set is the official one, untouched; the validation set is a stratified, seeded
``val_fraction`` of the official training set.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdlab.data.registry import register_dataset
from kdlab.data.splits import DatasetInfo, Splits, TensorSet, train_val_from_pool

# Per-channel statistics of the official training sets (pixel values / 255).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class CifarFormat:
    name: str
    title: str
    folder: str
    url: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple
    std: tuple


CIFAR10 = CifarFormat(
    name="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
CIFAR100 = CifarFormat(
    name="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
)
FORMATS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def default_data_dir() -> Path:
    """``$KDLAB_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get("KDLAB_DATA_DIR", "data"))


def _download_hint(fmt: CifarFormat, parent: Path) -> str:
    return (
        f"download {fmt.url} and extract it into {parent} "
        f"(tar -xzf {fmt.url.rsplit('/', 1)[-1]} -C {parent}) so that {parent / fmt.folder} exists"
    )


def resolve_cifar_dir(fmt: CifarFormat, data_dir=None) -> Path:
    """The folder holding ``fmt``'s files: ``data_dir/<folder>`` or ``data_dir`` itself."""
    root = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
    for cand in (root / fmt.folder, root):
        if (cand / fmt.test_file).is_file() or (cand.name == fmt.folder and cand.is_dir()):
            return cand
    parent = root.parent if root.name == fmt.folder else root
    raise FileNotFoundError(f"{fmt.title} not found in {root}: {_download_hint(fmt, parent)}")


def _key(d: dict, name: str):
    """``d[b"name"]`` or ``d["name"]``."""
    if name.encode() in d:
        return d[name.encode()]
    if name in d:
        return d[name]
    raise KeyError(name)


class DataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data and numpy arrays only: the globals a CIFAR pickle names
    (numpy's array reconstruction and dtypes) are allowed, any other raises
    ``pickle.UnpicklingError`` before it is called (the "restricting globals" pattern of the
    Python ``pickle`` documentation)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
               ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the file names the Python object {module}.{name}, which "
                                     f"loading would run; a data file holds only arrays and numbers")


def _read_pickle(fmt: CifarFormat, folder: Path, fname: str) -> dict:
    path = folder / fname
    if not path.is_file():
        raise FileNotFoundError(
            f"{fmt.title} file missing: {path}; re-{_download_hint(fmt, folder.parent)}"
        )
    try:
        with open(path, "rb") as f:
            obj = DataUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if "names the Python object" in str(e):
            raise ValueError(f"refused {path}: {e} (nothing in it ran); re-"
                             f"{_download_hint(fmt, folder.parent)}") from None
        raise ValueError(f"cannot read {path} (UnpicklingError: {e}); "
                         f"re-{_download_hint(fmt, folder.parent)}") from None
    except Exception as e:  # truncated / not a pickle
        raise ValueError(
            f"cannot read {path} ({type(e).__name__}: {e}); "
            f"re-{_download_hint(fmt, folder.parent)}"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR pickle (no dict inside); re-download {fmt.url}")
    return obj


def _read_batch(fmt: CifarFormat, folder: Path, fname: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(fmt, folder, fname)
    try:
        data = np.asarray(_key(d, "data"), dtype=np.uint8)
        labels = np.asarray(_key(d, fmt.label_key), dtype=np.int64)
    except KeyError as e:
        raise ValueError(
            f"{folder / fname} has no {e.args[0]!r} entry; is it a {fmt.title} file? "
            f"re-download {fmt.url}"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{folder / fname}: expected data [N, 3072] and N labels, got {data.shape} and "
            f"{labels.shape}; re-download {fmt.url}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        raise ValueError(f"{folder / fname}: labels outside 0..{fmt.num_classes - 1}")
    return data, labels


def _to_tensors(data: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32)).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(labels)


def read_cifar(name: str, data_dir=None):
    """Raw official sets: ``(train TensorSet, test TensorSet, class names)``."""
    fmt = FORMATS[name]
    folder = resolve_cifar_dir(fmt, data_dir)
    parts = [_read_batch(fmt, folder, f) for f in fmt.train_files]
    train = TensorSet(*_to_tensors(np.concatenate([p[0] for p in parts]),
                                   np.concatenate([p[1] for p in parts])))
    test = TensorSet(*_to_tensors(*_read_batch(fmt, folder, fmt.test_file)))
    meta = _read_pickle(fmt, folder, fmt.meta_file)
    try:
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, fmt.names_key))
    except KeyError:
        raise ValueError(f"{folder / fmt.meta_file} has no {fmt.names_key!r}; re-download {fmt.url}") from None
    if len(names) != fmt.num_classes:
        raise ValueError(
            f"{folder / fmt.meta_file} lists {len(names)} classes, expected {fmt.num_classes}"
        )
    return train, test, names


def load_cifar_splits(
    name: str,
    data_dir=None,
    *,
    val_fraction: float = 0.1,
    label_fraction: float = 1.0,
    seed: int = 0,
) -> Splits:
    """CIFAR-10 / CIFAR-100 as `Splits` (official test set; stratified seeded validation)."""
    fmt = FORMATS[name]
    pool, test, names = read_cifar(name, data_dir)
    train, val = train_val_from_pool(
        pool.x, pool.y, name=name, val_fraction=val_fraction,
        label_fraction=label_fraction, seed=seed,
    )
    info = DatasetInfo(
        name=name,
        num_classes=fmt.num_classes,
        in_channels=3,
        image_size=32,
        mean=fmt.mean,
        std=fmt.std,
        classes=names,
    )
    return Splits(train=train, val=val, test=test, info=info)


@register_dataset("cifar10", description="CIFAR-10, 32x32 RGB, 10 classes (python pickles in "
                                         "data_dir)", reference=CIFAR10.url)
def cifar10(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0,
            seed: int = 0) -> Splits:
    """Registered loader: `load_cifar_splits` for CIFAR-10."""
    return load_cifar_splits("cifar10", data_dir, val_fraction=val_fraction,
                             label_fraction=label_fraction, seed=seed)


@register_dataset("cifar100", description="CIFAR-100, 32x32 RGB, 100 fine classes (python "
                                          "pickles in data_dir)", reference=CIFAR100.url)
def cifar100(data_dir=None, *, val_fraction: float = 0.1, label_fraction: float = 1.0,
             seed: int = 0) -> Splits:
    """Registered loader: `load_cifar_splits` for CIFAR-100."""
    return load_cifar_splits("cifar100", data_dir, val_fraction=val_fraction,
                             label_fraction=label_fraction, seed=seed)
