"""What the one training loop optimises: an :class:`Objective`.

The :class:`kdlab.train.trainer.Trainer` knows nothing about students, teachers or recipes. It asks
an objective for

* ``models() -> dict[str, nn.Module]``: the models that are trained, evaluated, early-stopped and
  checkpointed (the first is the *primary* model: its validation score drives early stopping and
  its checkpoint is the run's ``best.pt``; any other model ``name`` gets ``<name>/best.pt``);
* ``parameters() -> list[nn.Parameter]``: everything the optimiser updates (models plus any
  trainable heads of loss terms);
* ``step(batch, ctx) -> (loss, logs)``: the scalar to minimise for one training batch, and a dict
  of detached scalar tensors to average over the epoch (``logs["n"]``, when present, is the weight of
  this batch in those averages: samples or tokens; otherwise the batch's first dimension);
* ``evaluate(name, loader) -> dict[str, float]``: validation / test metrics of model ``name``;
* ``monitor: tuple[str, str]``: the metric of ``evaluate`` that selects the best epoch and its
  direction, ``("acc", "max")`` for classifiers, ``("bpb", "min")`` for language models;
* ``checkpoint_meta(name) -> dict``: what a model file needs besides its weights to be rebuilt
  (``kdlab.core.checkpoint.model_checkpoint`` keys);
* ``setup(batch)`` (optional): called once with a real batch before training (loss terms that build
  heads from feature shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class StepContext:
    """Where the loop is: epoch and step counters, and the runtime (device, autocast)."""

    epoch: int
    step: int
    runtime: Any = None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    monitor: tuple[str, str]

    def models(self) -> dict[str, nn.Module]: ...

    def parameters(self) -> list[nn.Parameter]: ...

    def step(self, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def evaluate(self, name: str, loader: Any) -> dict[str, float]: ...

    def checkpoint_meta(self, name: str) -> dict: ...
