"""The batch record that loss terms read, the LossTerm base class and the term registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from kdlab.core.registry import Registry

LOSSES = Registry("loss", "kdlab losses")


def register_loss(name: str, description: str = "", reference: str = ""):
    """Register a LossTerm subclass under ``name`` (the ``term:`` key of a recipe)."""

    def deco(cls):
        cls.name = name
        return LOSSES.register(name, description=description, reference=reference)(cls)

    return deco


@dataclass
class BatchRecord:
    """Everything one training step knows about one batch.

    x, y: the (augmented, normalised) inputs and labels.
    s_logits / t_logits: student / teacher outputs (t_logits None without a teacher).
    s_feats / t_feats: tapped layer outputs by layer name (teacher's detached).
    masks: causal masks by teacher layer name, [B, H, W] in [0, 1].
    index: dataset indices of the batch (for memory banks); epoch / step: progress counters.
    extra: anything else a term or a paradigm wants to pass along.
    extra_teachers: logits of the extra teachers a term asked for (``mtkd``), by checkpoint path.
    labelled: bool mask [B] of the samples that have a label (``y >= 0``; unlabelled ones carry
        ``y = −1``), or None when every sample of the run is labelled. A term flagged
        ``needs_labels`` is given :meth:`only_labelled` (never an unlabelled sample).
    """

    x: torch.Tensor
    y: torch.Tensor
    s_logits: torch.Tensor
    t_logits: Optional[torch.Tensor] = None
    s_feats: dict = field(default_factory=dict)
    t_feats: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    index: Optional[torch.Tensor] = None
    epoch: int = 0
    step: int = 0
    extra: dict = field(default_factory=dict)
    extra_teachers: dict = field(default_factory=dict)
    labelled: Optional[torch.Tensor] = None

    def only_labelled(self) -> "BatchRecord":
        """The record restricted to its labelled samples (rows of every per-sample tensor);
        ``self`` when every sample is labelled."""
        if self.labelled is None:
            return self
        keep = self.labelled
        rows = lambda t: t[keep] if isinstance(t, torch.Tensor) else t  # noqa: E731
        return BatchRecord(
            x=rows(self.x), y=rows(self.y), s_logits=rows(self.s_logits), t_logits=rows(self.t_logits),
            s_feats={k: rows(v) for k, v in self.s_feats.items()},
            t_feats={k: rows(v) for k, v in self.t_feats.items()},
            masks={k: rows(v) for k, v in self.masks.items()}, index=rows(self.index),
            epoch=self.epoch, step=self.step, extra=self.extra,
            extra_teachers={k: rows(v) for k, v in self.extra_teachers.items()}, labelled=None)

    def teacher_logits(self, who: str) -> torch.Tensor:
        if self.t_logits is None:
            raise ValueError(f"loss '{who}' needs teacher logits, but the run has no teacher")
        return self.t_logits


class LossTerm(nn.Module):
    """Base class of every loss term. Subclasses set the class flags and implement forward()."""

    name: str = "?"
    needs_teacher: bool = False
    needs_masks: bool = False
    # reads the labels: the objective gives it only the labelled samples of a batch (transfer sets)
    needs_labels: bool = False

    def student_layers(self) -> list[str]:
        """Student layers the term reads: those of its ``pairs`` (from :func:`layer_pairs`), if any."""
        return [s for s, _ in getattr(self, "pairs", ())]

    def teacher_layers(self) -> list[str]:
        """Teacher layers the term reads: those of its ``pairs``, if any."""
        return [t for _, t in getattr(self, "pairs", ())]

    def mask_layers(self) -> list[str]:
        """Teacher layers at which causal masks are needed."""
        return []

    def extra_teacher_checkpoints(self) -> list[str]:
        """Checkpoints of further frozen teachers whose logits the term reads from
        ``rec.extra_teachers`` (served like the main teacher: live or cached)."""
        return []

    def setup(self, probe: BatchRecord) -> None:
        """Called once with a real batch before training (build heads from feature shapes)."""

    def forward(self, rec: BatchRecord) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_")
                         and k != "training" and isinstance(v, (int, float, str, bool, list, tuple)))


def layer_pairs(layers: Any, who: str) -> list[tuple[str, str]]:
    """Normalise a recipe's ``layers`` parameter to [(student_layer, teacher_layer), ...].

    Accepts "layer3" (same name in both), ["s", "t"] pairs, or a list of either.
    """
    if layers is None:
        raise ValueError(f"'{who}' needs 'layers': a layer name or [student_layer, teacher_layer] pairs")
    if isinstance(layers, str):
        return [(layers, layers)]
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"'{who}': layers must be a layer name or a list of names / [student, teacher] "
                         f"pairs (e.g. layers: [[stage2, layer2]]), got {layers!r}")
    out = []
    for item in layers:
        if isinstance(item, str):
            out.append((item, item))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item):
            out.append((item[0], item[1]))
        else:
            raise ValueError(f"'{who}': bad layers entry {item!r}; use 'name' or [student, teacher]")
    if not out:
        raise ValueError(f"'{who}' needs at least one layer pair")
    return out
