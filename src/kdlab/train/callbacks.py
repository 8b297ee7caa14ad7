"""Callbacks: code that runs at fixed points of :class:`kdlab.train.trainer.Trainer`'s loop.

Subclass :class:`Callback` and override what you need; raise :class:`StopTraining` from
``on_epoch_end`` to end the run after the current epoch (it finishes normally: best checkpoint,
test metrics, ``result.json``). Any other exception propagates (e.g. ``optuna.TrialPruned``).
"""

from __future__ import annotations

from typing import Callable, Optional


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch."""


class Callback:
    def on_fit_start(self, trainer) -> None:
        """Before the first epoch (after a resume restored the state)."""

    def on_step_end(self, trainer, ctx) -> None:
        """After every training batch (after the optimiser step when one was taken)."""

    def on_epoch_end(self, trainer, row: dict) -> None:
        """After an epoch's validation and checkpoints; ``row`` is its metrics.csv row."""

    def on_fit_end(self, trainer, result: dict) -> None:
        """After ``result.json`` was written."""


class EpochHook(Callback):
    """Calls ``fn(row)`` after every epoch (a quick way to watch or prune a run)."""

    def __init__(self, fn: Callable[[dict], Optional[bool]]):
        self.fn = fn

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.fn(row) is False:
            raise StopTraining


class ReapplyMasks(Callback):
    """Keeps pruned weights at zero: re-applies unstructured pruning keep-masks after every step
    (``masks``: parameter name -> 0/1 tensor, as :func:`kdlab.compress.prune` returns them)."""

    def __init__(self, model, masks: dict, apply: Callable):
        self.model, self.masks, self.apply = model, masks, apply

    def on_step_end(self, trainer, ctx) -> None:
        self.apply(self.model, self.masks)
