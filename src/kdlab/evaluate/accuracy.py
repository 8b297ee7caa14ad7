"""Accuracy of classifiers over a loader: the one implementation every command uses.

A *loader* is anything with ``epoch(e)`` yielding ``(x, y, idx)`` (:class:`kdlab.data.BatchLoader`).
A *model* is an ``nn.Module`` or any callable returning logits (an ONNX Runtime session wrapper).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdlab.train.evaluation import evaluate, predict  # noqa: F401 - the implementation lives in train


def accuracy(model, loader, device=None, max_batches: Optional[int] = None) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``loader``."""
    return evaluate(model, loader, device, max_batches=max_batches)["acc"]


@torch.no_grad()
def ensemble_accuracy(models, loader, device=None) -> float:
    """Top-1 of the ensemble that averages the models' softmax outputs."""
    probs, y = None, None
    for m in models:
        logits, y = predict(m, loader, device)
        p = torch.softmax(logits, 1)
        probs = p if probs is None else probs + p
    return (probs.argmax(1) == y).float().mean().item()


def evaluate_checkpoint(path, *, dataset=None, data_dir=None, split: str = "test", image_size=None,
                        device="auto", batch_size: int = 256, allow_other_dataset: bool = False,
                        load=None) -> dict:
    """Accuracy of a checkpoint on a split of ``dataset``: a registered name (default: the
    checkpoint's), ``imagefolder`` (``data_dir`` the folder, ``image_size`` [H, W]) or a
    ``module:function`` factory. The images are normalised as in training: the checkpoint's own
    ``normalize`` when it has one (``kdlab.fit``), else the data set's mean and std.

    A checkpoint trained on another registered data set is refused unless ``allow_other_dataset``;
    one whose recorded class names are the data's in another order has its outputs mapped by name
    (``classes_mapped`` in the result); other class names are refused."""
    from kdlab.core.checkpoint import check_fits
    from kdlab.models.adapters import load_model
    from kdlab.data import from_factory, load_dataset
    from kdlab.data.streaming import as_loader
    from kdlab.core.device import resolve_device

    dev = resolve_device(device)
    model, ck = (load or load_model)(path, dev)  # load: kdlab.compress.load_compressed reads every format
    name = dataset or ck.get("dataset")
    if not name:
        raise ValueError(f"{path} names no data set; pass --dataset NAME (or module:function)")
    if ck.get("format") == "onnx":
        dev = torch.device("cpu")  # ONNX Runtime runs on the CPU
    rec_data = (ck.get("recipe") or {}).get("data") if isinstance(ck.get("recipe"), dict) else None
    rec_data = rec_data if isinstance(rec_data, dict) else {}
    same = str(name) == str(rec_data.get("name"))
    if str(name) == "imagefolder" and same:  # the folder and size the checkpoint was trained on
        data_dir = data_dir or rec_data.get("root")
        image_size = image_size or rec_data.get("image_size")
    if ":" in str(name):
        splits = from_factory(str(name))
    else:
        if str(name) == "imagefolder" and not (data_dir and image_size):
            raise ValueError(f"--dataset imagefolder needs --data-dir DIR (the folder of class folders) and "
                             f"--image-size H W (the size {path} was trained at)")
        opts = {"root": data_dir, "image_size": list(image_size)} if str(name) == "imagefolder" else {}
        if same and rec_data.get("val_fraction") is not None:  # the recipe's split (val differs otherwise)
            opts.update(val_fraction=rec_data["val_fraction"], seed=int(ck.get("seed") or 0))
            if rec_data.get("label_fraction") is not None:  # face identities: the fraction sets the classes
                opts.update(label_fraction=float(rec_data["label_fraction"]))
        splits = load_dataset(name, None if opts.get("root") else data_dir,
                              **({k: v for k, v in opts.items() if v is not None}))
    from kdlab.data.registry import check_trained_on

    check_trained_on(ck, splits.info, f"checkpoint {path}", allow=allow_other_dataset,
                     override="pass --allow-other-dataset")
    have, want = [str(c) for c in ck.get("classes") or []], [str(c) for c in splits.info.classes or []]
    mapped = bool(have and want and have != want and sorted(have) == sorted(want))
    if mapped:  # same names, another order (e.g. another folder layout): read each output by name
        model = ReorderOutputs(model, [have.index(c) for c in want])
        ck = {**ck, "classes": want}
    check_fits(ck, splits.info, str(path))
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    mean, std = splits.info.mean, splits.info.std
    if "normalize" in ck:
        mean, std = ck["normalize"] if ck["normalize"] else (None, None)
    loader = as_loader(getattr(splits, split), batch_size, shuffle=False, seed=0, mean=mean, std=std, device=dev)
    resize = (ck.get("input") or {}).get("resize")
    if resize:  # a student trained on a resized view (student.input.resize) is evaluated on it too
        model = ResizedInput(model, resize)
    data = getattr(splits, split)
    if hasattr(splits.test, "pairs"):  # a verification data set (faces): an embedding model, scored on pairs
        if not hasattr(data, "pairs"):
            raise ValueError(f"split {split} of data set '{name}' has no verification pairs; use --split val or test")
        from kdlab.evaluate.verification import evaluate_pairs

        metrics, _ = evaluate_pairs(model, loader, data.pairs)
        return {"checkpoint": str(path), "dataset": str(name), "split": split, **metrics}
    res = {"checkpoint": str(path), "dataset": str(name), "split": split, **evaluate(model, loader, dev)}
    if mapped:
        res["classes_mapped"] = True
    return res


class ReorderOutputs(nn.Module):
    """``model``'s outputs in another class order: output ``j`` is the model's output ``index[j]``."""

    def __init__(self, model: nn.Module, index):
        super().__init__()
        self.model = model
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long), persistent=False)

    def forward(self, x):
        return self.model(x).index_select(1, self.index.to(x.device))


class ResizedInput(nn.Module):
    """``model`` fed the ``hw`` view of its input (:func:`kdlab.data.views.resize_view`)."""

    def __init__(self, model: nn.Module, hw):
        super().__init__()
        self.model, self.hw = model, tuple(hw)

    def forward(self, x):
        from kdlab.data.views import resize_view

        return self.model(resize_view(x, self.hw))
