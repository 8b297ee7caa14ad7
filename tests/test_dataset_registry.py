"""Adding a data set is one file: a toy data set registered here, in the test module, is loaded
through `kdlab.data.load_dataset` and accepted by recipes."""

from __future__ import annotations

import pytest
import torch

from kdlab.core.config import RecipeError
from kdlab.data import (
    DATASETS,
    DatasetInfo,
    Splits,
    TensorSet,
    list_datasets,
    load_dataset,
    register_dataset,
)
from kdlab.data.splits import train_val_from_pool
from kdlab.train.recipe import recipe_from_dict

TOY_INFO = DatasetInfo("toy_squares", 2, 1, 4, (0.5,), (0.5,), ("dark", "light"))


@register_dataset("toy_squares", description="4x4 grey squares, dark (0) or light (1)")
def toy_squares(data_dir=None, *, val_fraction, label_fraction, seed):
    # 40 images: image i is a flat square of value i / 40; label 1 when i >= 20
    x = (torch.arange(40, dtype=torch.float32) / 40).reshape(40, 1, 1, 1).repeat(1, 1, 4, 4)
    y = (torch.arange(40) >= 20).long()
    test = TensorSet(x[::4], y[::4])  # 10 fixed test images
    keep = torch.tensor([i for i in range(40) if i % 4])
    train, val = train_val_from_pool(x[keep], y[keep], name="toy_squares",
                                     val_fraction=val_fraction, label_fraction=label_fraction,
                                     seed=seed)
    return Splits(train, val, test, TOY_INFO)


def test_toy_dataset_loads_through_the_registry():
    assert "toy_squares" in DATASETS
    assert ("toy_squares", "4x4 grey squares, dark (0) or light (1)") in list_datasets()
    s = load_dataset("toy_squares", val_fraction=0.2, seed=1)
    # 30 pool images (15 per class): val round(0.2 * 30) = 6 (3 per class), train 24
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 10)
    assert s.info is TOY_INFO
    assert torch.equal(s.test.y, torch.tensor([0] * 5 + [1] * 5))
    assert torch.bincount(s.val.y).tolist() == [3, 3]
    # case, '-' and '_' are ignored when loading
    assert torch.equal(load_dataset("TOY-SQUARES", val_fraction=0.2, seed=1).val.x, s.val.x)
    half = load_dataset("toy_squares", val_fraction=0.2, label_fraction=0.5, seed=1)
    assert torch.bincount(half.train.y).tolist() == [6, 6]  # round(0.5 * 12) per class


def test_toy_dataset_in_a_recipe():
    raw = {"name": "toy", "data": {"name": "toy_squares"}, "student": {"model": "cnn_tiny"}}
    assert recipe_from_dict(raw).data.name == "toy_squares"
    with pytest.raises(RecipeError, match="did you mean toy_squares"):
        recipe_from_dict({**raw, "data": {"name": "toy_square"}})


def test_builtins_registered_and_unknown_names():
    assert {"digits", "mnist5k", "cifar10", "cifar100"} <= set(DATASETS.names())
    with pytest.raises(ValueError, match="did you mean mnist5k") as e:
        load_dataset("mnist")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset("digits")(lambda data_dir=None, **kw: None)


def test_a_loader_must_return_splits():
    @register_dataset("toy_broken", description="returns the wrong type")
    def broken(data_dir=None, *, val_fraction, label_fraction, seed):
        return {"train": None}

    with pytest.raises(TypeError, match="not kdlab.data.Splits"):
        load_dataset("toy_broken")
