"""The dataset registry: a data set is one loader function registered by decorator.

A loader has the signature ``fn(data_dir=None, *, val_fraction, label_fraction, seed) -> Splits``
(see `kdlab.data.splits`), e.g. in your own module::

    from kdlab.data import Splits, register_dataset

    @register_dataset("toy", description="4x4 toy images, 2 classes")
    def toy(data_dir=None, *, val_fraction, label_fraction, seed):
        ...
        return Splits(train, val, test, info)

Importing that module is all it takes: ``load_dataset("toy")`` and recipes with
``data: {name: toy}`` then find it. The built-in loaders (digits, mnist5k, cifar10, cifar100)
register when `kdlab.data` is imported.
"""

from __future__ import annotations

import difflib
from typing import Callable

from kdlab.core.registry import Registry

DATASETS = Registry("dataset")


def register_dataset(name: str, description: str = "", reference: str = "", **meta) -> Callable:
    """Decorator: register ``fn(data_dir=None, *, val_fraction, label_fraction, seed) -> Splits``
    under ``name`` (a second registration of one name raises ValueError)."""
    return DATASETS.register(name, description=description, reference=reference, **meta)


def list_datasets() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered data set, sorted by name."""
    return [(e.name, e.description) for e in DATASETS.entries()]


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def dataset_name(name) -> str:
    """The registered name for ``name``: exact, else ignoring case, ``-`` and ``_``
    (``CIFAR-10`` -> ``cifar10``). Unknown names raise ValueError with the closest names."""
    name = str(name)
    if name in DATASETS:
        return name
    by_key = {_key(n): n for n in DATASETS.names()}
    if _key(name) in by_key:
        return by_key[_key(name)]
    close = difflib.get_close_matches(_key(name), list(by_key), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(by_key[c] for c in close)}? " if close else ""
    raise ValueError(f"unknown dataset {name!r}; {hint}registered: {', '.join(DATASETS.names())} "
                     f"(a new one is a function decorated with @kdlab.data.register_dataset)")


def check_dataset_name(name) -> str:
    """Validator for recipe fields: ``name`` itself if it is a registered data set (ValueError
    with the closest names otherwise). Aliases are not accepted in recipes."""
    canonical = dataset_name(name)
    if canonical != name:
        raise ValueError(f"dataset {name!r} is spelled {canonical!r} in recipes")
    return name


def check_trained_on(ck: dict, info, who: str, *, allow: bool = False, override: str = "") -> None:
    """A model checkpoint ``ck`` is used on data set ``info``: when both its recorded ``dataset``
    and ``info.name`` are registered data sets and differ, one ValueError line (``allow``: the
    user asked for the cross-data use with ``override``). Class and channel counts are checked by
    :func:`kdlab.core.checkpoint.check_fits`; matching counts do not make two data sets one."""
    trained = ck.get("dataset")
    if allow or not trained or str(trained) not in DATASETS or str(info.name) not in DATASETS:
        return
    if str(trained) != str(info.name):
        raise ValueError(f"{who} was trained on '{trained}', not on '{info.name}' (matching class "
                         f"counts do not make them the same task); use a model trained on "
                         f"'{info.name}', or {override or 'pass the override'} to use it deliberately")

