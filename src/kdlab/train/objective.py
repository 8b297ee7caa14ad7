"""What the one training loop optimises: an :class:`Objective`.

The :class:`kdlab.train.trainer.Trainer` knows nothing about students, teachers or recipes. It
uses of an objective exactly what :class:`Objective` declares, and nothing else (every objective
subclasses it; the defaults are those of a classifier trained on images):

* ``models() -> dict[str, nn.Module]``: the models that are trained, evaluated, early-stopped and
  checkpointed (the first is the *primary* model: its validation score drives early stopping and
  its checkpoint is the run's ``best.pt``; any other model ``name`` gets ``<name>/best.pt``);
* ``parameters() -> list[nn.Parameter]``: everything the optimiser updates (models plus any
  trainable heads of loss terms; default: the models' parameters);
* ``step(batch, ctx) -> (loss, logs)``: the scalar to minimise for one training batch, and a dict
  of detached scalar tensors to average over the epoch (``logs["n"]``, when present, is the weight of
  this step in those averages and in the throughput, in sample units; otherwise
  :meth:`Objective.batch_weight` of the batch);
* ``evaluate(name, loader) -> dict[str, float]``: validation / test metrics of model ``name``;
* ``monitor: tuple[str, str]``: the metric of ``evaluate`` that selects the best epoch and its
  direction, ``("acc", "max")`` for classifiers, ``("bpb", "min")`` for language models;
* ``checkpoint_meta(name) -> dict``: what a model file needs besides its weights to be rebuilt
  (``kdlab.core.checkpoint.model_checkpoint`` keys);
* ``sample_unit``: what the throughput counts (``images``, ``tokens``, ``boxes``): the result
  files name it ``<sample_unit>_per_s``; ``batch_weight(batch)``: a batch's size in that unit;
* ``window_normalised``: per-unit losses are normalised over a whole gradient-accumulation window
  (the loop then puts ``token_denominator``, the window's total :meth:`batch_weight`, and
  ``grad_accum`` into ``ctx.extra``);
* ``teacher_time_s`` / ``mask_time_s``: cumulative seconds spent on the teacher's outputs and, of
  those, on causal masks (0 for an objective without a teacher);
* ``state_dict()`` / ``load_state_dict(state)``: trainable state besides the models' weights
  (heads of loss terms), saved in ``last.pt`` for resuming;
* ``setup(batch)``: called once by :func:`kdlab.train.build.build_run` with a real batch before
  training (loss terms that build heads from feature shapes); ``broadcast_modules()``: the modules
  whose initial weights rank 0 sends to every process.

Distributed training is the :class:`kdlab.train.runtime.Runtime`'s alone: an objective that runs a
model through ``runtime.wrap_ddp(model)`` lets DDP average that model's gradients; the runtime then
scales each process's loss and all-reduces every other parameter itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses import BatchRecord
from kdlab.models.taps import Taps


@dataclass
class StepContext:
    """Where the loop is: epoch and step counters, and the runtime (device, autocast)."""

    epoch: int
    step: int
    runtime: Any = None
    extra: dict = field(default_factory=dict)


class Objective:
    """The contract between the :class:`~kdlab.train.trainer.Trainer` and what it trains (see the
    module doc). Subclasses implement :meth:`models`, :meth:`step` and :meth:`evaluate`; the rest
    has working defaults."""

    monitor: tuple[str, str] = ("acc", "max")
    sample_unit: str = "images"
    window_normalised: bool = False
    teacher_time_s: float = 0.0
    mask_time_s: float = 0.0

    def models(self) -> dict[str, nn.Module]:
        raise NotImplementedError(f"{type(self).__name__}.models()")

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.models().values() for p in m.parameters()]

    def step(self, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__}.step()")

    def evaluate(self, name: str, loader: Any) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__}.evaluate()")

    def checkpoint_meta(self, name: str) -> dict:
        return {}

    def batch_weight(self, batch: Any) -> float:
        """The size of a training batch in :attr:`sample_unit` (default: its first tensor's
        first dimension, the number of images)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return float(first.shape[0]) if hasattr(first, "shape") else 1.0

    def setup(self, batch: Any) -> None:
        """Called once with a real training batch before training (default: nothing)."""

    def broadcast_modules(self) -> list[nn.Module]:
        """Modules whose initial weights every process takes from rank 0 (default: the models)."""
        return list(self.models().values())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (default: nothing to restore)."""

    def nonfinite_cause(self) -> Optional[str]:
        """Why the loss turned non-finite, when the objective knows (e.g. a teacher cache that
        overflowed float16), as one line naming the fix; None when it does not."""
        return None


def split_metrics(model: nn.Module, loader, runtime=None) -> dict[str, float]:
    """Top-1 accuracy, mean cross-entropy and count of a classifier over ``loader.epoch(0)``."""
    from kdlab.train.evaluation import evaluate

    return evaluate(model, loader, amp=runtime.amp if runtime is not None else "none")


class DistillObjective(Objective):
    """A student trained with weighted loss terms, reading one :class:`BatchRecord` per step.

    This is every method of the library (CE alone is a teacher; KD, feature, relation and masked
    terms are students). ``teacher`` and ``extra_teachers`` are :class:`kdlab.distill.teachers.
    TeacherSource`s (``extra_teachers`` by checkpoint path, for ``mtkd``); ``meta`` is the
    checkpoint metadata of the student (``model_name``, ``model_kwargs``, ``num_classes``,
    ``in_channels``, ``dataset``, ...); ``n_data`` is the size of the training set (memory banks).

    ``partial_labels``: the training set holds unlabelled samples (``y = −1``, a transfer set); the
    record then carries ``labelled = y >= 0``, terms flagged ``needs_labels`` see only the labelled
    samples (a batch without any gives them a zero), the others see all. ``view``: the student's
    view of an input (``student.input``; the teacher always sees the full input), used in training
    and in evaluation.
    """

    monitor = ("acc", "max")

    def __init__(self, student: nn.Module, terms, *, runtime, teacher=None, extra_teachers=None,
                 meta: Optional[dict] = None, n_data: int = 0, channels_last: bool = False,
                 compile: bool = False, partial_labels: bool = False, view=None, train_labels=None,
                 mix=None, mix_seed: int = 0):
        """``mix``: a :class:`kdlab.data.augment.MixSpec` (mixup / CutMix of each training batch,
        drawn from ``derive_seed(mix_seed, "mix", epoch, step)``, so per epoch position)."""
        from kdlab.distill.losses import LossTerm

        self.student = student
        self.terms = [(n, float(w), t) for n, w, t in terms]
        if not all(isinstance(t, LossTerm) for _, _, t in self.terms):
            raise ValueError("DistillObjective: every term must be a kdlab LossTerm")
        self.term_modules = nn.ModuleList([t for _, _, t in self.terms]).to(runtime.device)
        self.runtime = runtime
        self.teacher = teacher
        self.extra_teachers = dict(extra_teachers or {})
        self.meta = dict(meta or {})
        self.n_data = int(n_data)
        self.partial_labels = bool(partial_labels)
        self.train_labels = train_labels  # labels of the training set by index (crd label positives)
        self.view = view
        self.mix = mix if (mix is not None and mix.active) else None
        self.mix_seed = int(mix_seed)
        if self.mix is not None and self.partial_labels:
            raise ValueError("mixup / cutmix need every training sample labelled; drop them or set "
                             "data.unlabelled: drop")
        self.channels_last = channels_last
        # under torchrun the runtime wraps the student in DistributedDataParallel (it syncs the
        # student's gradients in backward; the runtime all-reduces the terms' heads itself)
        self.forward_model = runtime.wrap_ddp(student)
        if compile:  # falls back to eager with one line where the student cannot be compiled
            from kdlab.models.compiled import Compiled

            self.forward_model = Compiled(self.forward_model, "student")
        self.teacher_time_s = 0.0  # seconds spent in the teacher sources (outputs and masks)
        self.s_layers = list(dict.fromkeys(l for _, _, t in self.terms for l in t.student_layers()))
        needs = any(t.needs_teacher for _, _, t in self.terms)
        if needs and teacher is None:
            raise ValueError("these loss terms need a teacher; give the recipe a teacher section")

    @property
    def compile_warmup_s(self) -> float:
        """Seconds of each compiled model's first call (``train.compile``): student and teacher
        forwards. With a probe batch (:meth:`setup`) that call is the probe's, in the run's set-up;
        the student's recompilation for training mode and gradients (its first training step) is
        not counted here."""
        parts = [self.forward_model] + [getattr(s, "live", s) for s in [self.teacher, *self.extra_teachers.values()]
                                        if s is not None]
        return float(sum(getattr(getattr(p, "runner", p), "warmup_s", 0.0) for p in parts))

    @property
    def mask_time_s(self) -> float:
        """Of ``teacher_time_s``: seconds the teacher sources spent computing causal masks
        (cumulative, like ``teacher_time_s``; the rest is teacher forward passes and cache reads)."""
        srcs = [self.teacher, *self.extra_teachers.values()]
        return float(sum(getattr(s, "mask_time_s", 0.0) for s in srcs if s is not None))

    # -- the protocol ----------------------------------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.term_modules.parameters())

    def broadcast_modules(self) -> list[nn.Module]:
        return [self.student, self.term_modules]

    def checkpoint_meta(self, name: str) -> dict:
        return dict(self.meta)

    def nonfinite_cause(self) -> Optional[str]:
        """Why the loss turned non-finite, when a teacher source knows (its outputs overflowed the
        fp16 teacher cache); None otherwise."""
        for src in [self.teacher, *self.extra_teachers.values()]:
            why = getattr(src, "range_error", None)
            msg = why() if why is not None else None
            if msg:
                return msg
        return None

    def evaluate(self, name: str, loader) -> dict[str, float]:
        if self.view is not None:
            from kdlab.data.views import ViewLoader

            loader = ViewLoader(loader, self.view)
        return split_metrics(self.models()[name], loader, self.runtime)

    def record(self, batch, epoch: int, step: int) -> BatchRecord:
        """The batch record of ``batch = (x, y, idx)``: student and teacher outputs."""
        x, y, idx = batch
        mix = None
        if self.mix is not None and self.student.training:  # training steps only (not setup's probe)
            from kdlab.core.seeding import derive_seed
            from kdlab.data.augment import apply_mix, draw_mix

            g = torch.Generator().manual_seed(derive_seed(self.mix_seed, "mix", epoch, step))
            mix = draw_mix(x.shape[0], x.shape[-2], x.shape[-1], self.mix, g)
            x = apply_mix(x, mix)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t, extra = None, {}
        if self.teacher is not None or self.extra_teachers:  # a baseline's teacher time stays 0
            t0 = time.perf_counter()
            if self.teacher is not None:
                t = self.teacher(x, y, idx, epoch, step)
            extra = {p: src(x, y, idx, epoch, step).logits for p, src in self.extra_teachers.items()}
            self.teacher_time_s += time.perf_counter() - t0
        xs = x if self.view is None else self.view(x)
        with self.runtime.autocast(), Taps(self.student, self.s_layers) as taps:
            s_logits = self.forward_model(xs)
            s_feats = {n: taps[n] for n in self.s_layers}
        return BatchRecord(x=x, y=y, s_logits=s_logits.float(),
                           t_logits=t.logits if t is not None else None,
                           s_feats=s_feats, t_feats=t.feats if t is not None else {},
                           masks=t.masks if t is not None else {}, index=idx, epoch=epoch, step=step,
                           extra={"n_data": self.n_data, "train_labels": self.train_labels,
                                  "forward_student": self.forward_student,
                                  "forward_teacher": self.forward_teacher, "mix": mix},
                           extra_teachers=extra,
                           labelled=(y >= 0) if self.partial_labels else None)

    def forward_student(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits of another view of a batch (normalised inputs; the student's
        ``view`` applied), with gradients: for terms that need more than the batch's own view
        (``mlkd``'s strong augmentation)."""
        xs = x if self.view is None else self.view(x)
        with self.runtime.autocast():
            return self.forward_model(xs).float()

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits of another view of a batch (no gradients, never cached)."""
        if self.teacher is None:
            raise ValueError("this loss term needs a teacher; give the recipe a teacher section")
        with torch.no_grad(), self.runtime.autocast():
            return self.teacher.teacher(x).float()

    def losses(self, rec: BatchRecord) -> tuple[torch.Tensor, dict]:
        """The weighted sum of the terms (zero-weight terms skipped) and each unweighted term."""
        parts = {}
        total = 0.0
        lab_rec = None
        with self.runtime.autocast():
            for name, w, term in self.terms:
                if w == 0:
                    continue
                mix = rec.extra.get("mix") if isinstance(rec.extra, dict) else None
                if term.needs_labels and mix is not None:  # mixup / CutMix: λ·L(y) + (1−λ)·L(y[π])
                    from dataclasses import replace

                    other = replace(rec, y=rec.y[mix.perm.to(rec.y.device)])
                    v = mix.lam * term(rec).float() + (1.0 - mix.lam) * term(other).float()
                elif term.needs_labels and rec.labelled is not None:
                    if lab_rec is None:
                        lab_rec = rec.only_labelled()
                    # no labelled sample in this batch: a zero that keeps the graph (DDP, optimiser)
                    v = term(lab_rec).float() if lab_rec.y.numel() else rec.s_logits.sum() * 0.0
                else:
                    v = term(rec).float()
                parts[name] = v
                total = total + w * v
        return total, parts

    def step(self, batch, ctx: StepContext):
        rec = self.record(batch, ctx.epoch, ctx.step)
        total, parts = self.losses(rec)
        y = rec.y
        if rec.labelled is None:
            acc = (rec.s_logits.detach().argmax(1) == y).float().mean()
        else:  # accuracy on the labelled samples of the batch (0 when it has none)
            hit = (rec.s_logits.detach().argmax(1) == y) & rec.labelled
            acc = hit.float().sum() / rec.labelled.float().sum().clamp_min(1.0)
        logs = {"loss": total.detach(), **{k: v.detach() for k, v in parts.items()},
                "train_acc": acc, "n": y.shape[0]}
        return total, logs

    def setup(self, batch) -> None:
        """Give every term a probe record of a real batch (student in eval mode, no gradients)."""
        self.student.eval()
        teacher0, mask0 = self.teacher_time_s, self.mask_time_s
        with torch.no_grad():
            rec = self.record(batch, 0, 0)
        # the probe's teacher outputs (in a study: the first batch's cache entries) and masks
        self.setup_teacher_time_s = self.teacher_time_s - teacher0
        self.setup_mask_time_s = self.mask_time_s - mask0
        self.student.train()
        for _, _, term in self.terms:
            term.setup(rec)
        self.term_modules.to(self.runtime.device)

    def state_dict(self) -> dict:
        return {"terms": self.term_modules.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.term_modules.load_state_dict(state["terms"])


def mutual_loss(logits: list[torch.Tensor], y: torch.Tensor, k: int, T: float = 1.0) -> torch.Tensor:
    """Deep Mutual Learning, peer k: ``CE(z_k, y) + T²/(K−1) · Σ_{l≠k} KL(softmax(z_l/T) ‖ softmax(z_k/T))``
    (the other peers' outputs detached: all peers are updated simultaneously on the same batch)."""
    from kdlab.distill.losses import kd_loss

    K = len(logits)
    loss = F.cross_entropy(logits[k], y)
    if K > 1:
        kl = sum(kd_loss(logits[k], z.detach(), T) for l, z in enumerate(logits) if l != k)
        loss = loss + kl / (K - 1)
    return loss


class PeerObjective(Objective):
    """Deep Mutual Learning (Zhang et al., CVPR 2018): K peers trained together, peer k with
    :func:`mutual_loss`. The step's loss is the sum over peers; since each peer's loss depends on
    the others only through detached outputs, one optimiser over all peers is the same as one
    optimiser per peer. Every peer is evaluated and checkpointed (``peer0`` is the primary model).
    """

    monitor = ("acc", "max")

    def __init__(self, peers: dict[str, nn.Module], metas: dict[str, dict], *, runtime, T: float = 1.0):
        if len(peers) < 2:
            raise ValueError("DML needs at least two peers (e.g. paradigm.peers: [cnn_tiny, cnn_tiny])")
        self.peers = dict(peers)
        self.metas = dict(metas)
        self.runtime = runtime
        self.T = float(T)

    def models(self) -> dict[str, nn.Module]:
        return dict(self.peers)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.peers.values() for p in m.parameters()]

    def checkpoint_meta(self, name: str) -> dict:
        return dict(self.metas[name])

    def evaluate(self, name: str, loader) -> dict[str, float]:
        return split_metrics(self.peers[name], loader, self.runtime)

    def step(self, batch, ctx: StepContext):
        x, y, _ = batch
        with self.runtime.autocast():
            logits = [m(x).float() for m in self.peers.values()]
        losses = [mutual_loss(logits, y, k, self.T) for k in range(len(logits))]
        total = torch.stack(losses).sum()
        logs = {"loss": total.detach(), "n": y.shape[0],
                "train_acc": (logits[0].detach().argmax(1) == y).float().mean()}
        for k, (name, l) in enumerate(zip(self.peers, losses)):
            logs[f"{name}_loss"] = l.detach()
        return total, logs
