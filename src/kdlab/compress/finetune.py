"""Fine-tuning of pruned and quantization-aware models, on the one training loop.

A pruned or fake-quantized model is an already built module, so :func:`finetune` writes its
settings as a recipe (``ce`` alone, or ``(1 − alpha)·CE + alpha·KD(T)`` from a live ``teacher``)
and builds the run with :func:`kdlab.train.build.build_run`, given the model and its loaders, like
every run; it trains with :class:`kdlab.train.trainer.Trainer`: checkpoints, resume, metrics and (with a validation loader)
best-epoch selection and patience like every run. Unstructured-pruning keep-masks are re-applied
after every optimiser step by the :class:`kdlab.train.callbacks.ReapplyMasks` callback.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdlab.compress.prune import apply_masks
from kdlab.evaluate.accuracy import accuracy


class _FirstSteps:
    """A loader limited to its first ``n`` batches per epoch (``max_steps``)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def epoch(self, e: int):
        for i, batch in enumerate(self.loader.epoch(e)):
            if i >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        return min(len(self.loader), self.n)


def finetune(model: nn.Module, loader, *, epochs: int = 1, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, teacher: nn.Module | None = None,
             alpha: float = 0.9, T: float = 4.0, masks: dict | None = None,
             seed: int = 0, max_steps: int | None = None, device: str | torch.device = "cpu",
             progress: bool = True, desc: str = "fine-tune", val_loader=None, run_dir=None,
             patience: Optional[int] = None, meta: Optional[dict] = None,
             on_epoch: Callable[[int, nn.Module], dict | None] | None = None) -> list[dict]:
    """Fine-tune ``model`` in place (SGD, cosine schedule) and return the per-epoch metrics rows.

    ``teacher``: distil from it (KD on logits) with weight ``alpha``; ``masks``: keep-masks of
    unstructured pruning, kept applied; ``val_loader``: select the best epoch on it (the model ends
    with the best epoch's weights) with ``patience``; ``run_dir``: where the run's checkpoints and
    metrics go (default a temporary folder); ``max_steps`` caps the steps per epoch (tests);
    ``meta``: checkpoint metadata of the model (how to rebuild it); ``on_epoch(e, model)`` may add
    metrics to each row.
    """
    from kdlab.train.recipe import Recipe
    from kdlab.train.build import build_run, trainer_for
    from kdlab.train.callbacks import Callback, ReapplyMasks
    from kdlab.train.runtime import Runtime

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return []
    dev = torch.device(device)
    runtime = Runtime(str(dev), "none", dist=None)
    model.to(dev)
    frozen = {}
    if teacher is not None:
        frozen = {p: p.requires_grad for p in teacher.parameters()}  # restored after training
        loss = [{"term": "ce", "weight": 1.0 - alpha}, {"term": "kd", "weight": alpha, "T": T}]
    else:
        loss = [{"term": "ce", "weight": 1.0}]
    meta = meta or {"model_name": type(model).__name__, "model_kwargs": {}, "num_classes": 0,
                    "in_channels": 0, "dataset": ""}
    train_loader = loader if max_steps is None else _FirstSteps(loader, max_steps)
    recipe = Recipe(name=desc, student={"model": str(meta.get("model_name") or type(model).__name__)},
                    teacher=None if teacher is None else {"model": type(teacher).__name__},
                    train={"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                           "schedule": "cosine", "patience": patience, "seed": seed, "device": str(dev.type),
                           "teacher_mode": "live"},
                    loss=loss)
    # no setup probe: a forward pass would move a fake-quantized model's observers
    run = build_run(recipe, loaders=(train_loader, val_loader, None), teacher=teacher, runtime=runtime,
                    student=model, meta=meta, probe=False)
    callbacks: list = [ReapplyMasks(model, masks, apply_masks)] if masks else []
    if on_epoch is not None:
        class _Extra(Callback):
            def on_epoch_end(self, trainer, row):
                extra = on_epoch(row["epoch"] - 1, model)
                if isinstance(extra, dict):
                    row.update(extra)
        callbacks.append(_Extra())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(run_dir) if run_dir is not None else Path(tmp)
        trainer = trainer_for(run, folder, progress=progress, method=desc, callbacks=callbacks,
                              identity={"finetune": desc, "epochs": epochs, "lr": lr}, info={})
        try:
            trainer.fit(resume=run_dir is not None)
        finally:
            for p, flag in frozen.items():
                p.requires_grad_(flag)
        history = trainer.state.history or _read_history(folder)
    if masks:
        apply_masks(model, masks)
    model.eval()
    return history


def _read_history(folder: Path) -> list[dict]:
    from kdlab.core.io import read_csv

    return [{k: float(v) for k, v in row.items()} for row in read_csv(folder / "metrics.csv")]


def evaluate_accuracy(model, loader, device: str | torch.device = "cpu",
                      max_batches: int | None = None) -> float:
    """Top-1 accuracy over ``loader.epoch(0)`` (see :func:`kdlab.evaluate.accuracy.accuracy`)."""
    return accuracy(model, loader, device=device if isinstance(model, nn.Module) else None,
                    max_batches=max_batches)


__all__ = ["finetune", "evaluate_accuracy"]
