"""More response-based terms: Decoupled KD (DKD), the label-smoothing control (``ls``) and
multi-teacher KD (``mtkd``, averaged soft targets)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kdlab.distill.losses.base import BatchRecord, LossTerm, register_loss
from kdlab.distill.losses.response import CrossEntropy, kl_terms, standardize_logits


def dkd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, T: float = 4.0, labelled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022), averaged over the batch.

    With ``p = softmax(z/T)`` and target class ``y``:

    * TCKD = ``KL(b_t ‖ b_s)`` with the binary distribution ``b = [p_y, 1 − p_y]``;
    * NCKD = ``KL(p̂_t ‖ p̂_s)`` with ``p̂_k = exp(z_k/T) / Σ_{j≠y} exp(z_j/T)`` for k ≠ y (the
      non-target distribution renormalised over the non-target classes; computed by masking the
      target logit with −1000 before the softmax);
    * loss = ``(α·TCKD + β·NCKD) · T²``.

    Unlabelled samples (``labelled`` False, their ``y`` −1; transfer sets): the target part needs the label, so TCKD is
    averaged over the labelled samples only (0 when there are none); NCKD splits off the teacher's
    top class instead of the label. With every sample labelled this is exactly the formula above:
    ``T² · (α · mean_{labelled} TCKD + β · mean_{all} NCKD)``.
    """
    partial = labelled is not None
    if partial:
        y = torch.where(labelled, y, t_logits.argmax(dim=1))
    gt = F.one_hot(y, s_logits.shape[1]).bool()
    p_s = F.softmax(s_logits / T, dim=1)
    p_t = F.softmax(t_logits / T, dim=1)
    ps_y = p_s.masked_select(gt)
    pt_y = p_t.masked_select(gt)
    b_s = torch.stack([ps_y, 1.0 - ps_y], dim=1).clamp_min(1e-12)
    b_t = torch.stack([pt_y, 1.0 - pt_y], dim=1).clamp_min(1e-12)
    tckd = kl_terms(b_t, b_t.log(), b_s.log())
    log_q_s = F.log_softmax(s_logits / T - 1000.0 * gt, dim=1)
    log_q_t = F.log_softmax(t_logits / T - 1000.0 * gt, dim=1)
    nckd = kl_terms(log_q_t.exp(), log_q_t, log_q_s)
    if partial:
        lab = labelled.to(tckd.dtype)
        tckd_mean = (tckd * lab).sum() / lab.sum().clamp_min(1.0)
        return (alpha * tckd_mean + beta * nckd.mean()) * (T * T)
    return (alpha * tckd + beta * nckd).mean() * (T * T)


@register_loss("dkd", "Decoupled KD: (α·TCKD + β·NCKD)·T², α=1, β=8; logit_stand: Z-scored logits (Sun et al. 2024)",
               "Zhao, Cui, Song, Qiu & Liang, Decoupled Knowledge Distillation, CVPR 2022; "
               "logit_stand: Sun, Ren, Li, Wang & Cao, Logit Standardization in Knowledge Distillation, CVPR 2024")
class DKD(LossTerm):
    """``logit_stand: true`` Z-scores both logits per sample before DKD (as the authors' DKD code
    does with ``LOGIT_STAND``); off (the default) is unchanged."""

    needs_teacher = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: int = 0,
                 logit_stand: bool = False):
        super().__init__()
        self.logit_stand = bool(logit_stand)
        if T <= 0:
            raise ValueError("dkd: temperature T must be > 0")
        if alpha < 0 or beta < 0:
            raise ValueError("dkd: alpha and beta must be >= 0")
        if warmup < 0:
            raise ValueError("dkd: warmup (epochs of linear ramp) must be >= 0")
        self.alpha, self.beta, self.T, self.warmup = float(alpha), float(beta), float(T), int(warmup)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        ramp = min((rec.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        s, t = rec.s_logits, rec.teacher_logits(self.name)
        if self.logit_stand:
            s, t = standardize_logits(s), standardize_logits(t)
        return ramp * dkd_loss(s, t, rec.y, self.alpha, self.beta, self.T, labelled=rec.labelled)


def label_smoothing_loss(s_logits: torch.Tensor, y: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy to the smoothed target ``q = (1 − ε)·onehot(y) + ε/K``:

    ``−Σ_k q_k log p_k = (1 − ε)·(−log p_y) + ε · mean_k(−log p_k)``, averaged over the batch.
    It is KD with a uniform "teacher" and is the control KD is compared with (Müller et al. 2019;
    Yuan et al. 2020). Same value as ``ce`` with ``label_smoothing: ε``.
    """
    log_p = F.log_softmax(s_logits, dim=1)
    nll = -log_p.gather(1, y.view(-1, 1)).squeeze(1)
    return ((1.0 - epsilon) * nll + epsilon * (-log_p.mean(dim=1))).mean()


@register_loss("ls", "label smoothing (uniform-target control for KD): CE to (1−ε)·onehot + ε/K",
               "Szegedy et al. 2016 (Inception-v3); Müller, Kornblith & Hinton, When Does Label Smoothing Help?, 2019")
class LabelSmoothing(CrossEntropy):
    """``ce`` with ``label_smoothing: ε``, written out as the control's formula
    (:func:`label_smoothing_loss`)."""

    def __init__(self, epsilon: float = 0.1):
        if not 0.0 <= epsilon < 1.0:
            raise ValueError("ls: epsilon must be in [0, 1) (e.g. epsilon: 0.1)")
        super().__init__(label_smoothing=epsilon)
        self.epsilon = float(epsilon)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return label_smoothing_loss(rec.s_logits, rec.y, self.epsilon)


def multi_teacher_kd_loss(s_logits: torch.Tensor, t_logits_list: list, T: float = 4.0) -> torch.Tensor:
    """Multi-teacher KD with averaged soft targets:
    ``p̄ = (1/m) Σ_i softmax(t_i/T)``, loss = ``T² · KL(p̄ ‖ softmax(s/T))`` averaged over the batch."""
    if not t_logits_list:
        raise ValueError("multi-teacher KD needs at least one teacher's logits")
    p_bar = torch.stack([F.softmax(t / T, dim=1) for t in t_logits_list]).mean(0)
    log_p_s = F.log_softmax(s_logits / T, dim=1)
    return kl_terms(p_bar, p_bar.clamp_min(1e-30).log(), log_p_s).mean() * (T * T)


@register_loss("mtkd", "multi-teacher KD: T²·KL(mean_i softmax(t_i/T) ‖ softmax(s/T))",
               "Hinton et al. 2015 (ensemble soft targets); You et al., Learning from Multiple Teacher Networks, KDD 2017")
class MultiTeacherKD(LossTerm):
    """The recipe's teacher (``rec.t_logits``, when ``include_main``) plus the extra teachers in
    ``checkpoints`` (kdlab model checkpoints; the run's builder loads them frozen and serves their
    logits in ``rec.extra_teachers`` like the main teacher's, cached or live). ``recipes`` (optional, one per checkpoint) name the
    teacher recipes that ``kdlab compare``/``kdlab paradigm`` train first when a checkpoint is missing."""

    def __init__(self, checkpoints: list | None = None, T: float = 4.0, include_main: bool = True,
                 recipes: list | None = None):
        super().__init__()
        # recipes: the teacher recipes that train the checkpoints (used by `kdlab compare` /
        # kdlab.train.build.ensure_teachers to train missing ones); the term itself ignores them
        self.recipes = [str(r) for r in (recipes or [])]
        if self.recipes and len(self.recipes) != len(checkpoints or []):
            raise ValueError("mtkd: 'recipes' must list one teacher recipe per entry of 'checkpoints'")
        if T <= 0:
            raise ValueError("mtkd: temperature T must be > 0")
        self.checkpoints = [str(c) for c in (checkpoints or [])]
        self.T, self.include_main = float(T), bool(include_main)
        self.needs_teacher = self.include_main
        if not self.checkpoints and not self.include_main:
            raise ValueError("mtkd: no teachers; list teacher checkpoints in 'checkpoints: [a.pt, b.pt]'")

    def extra_teacher_checkpoints(self) -> list[str]:
        return list(self.checkpoints)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        ts = [rec.teacher_logits(self.name)] if self.include_main else []
        missing = [p for p in self.checkpoints if p not in rec.extra_teachers]
        if missing:
            raise ValueError(f"mtkd: no outputs of extra teacher {missing[0]}; build the run with "
                             f"kdlab.train.build.build_run, which loads the extra teachers")
        ts += [rec.extra_teachers[p] for p in self.checkpoints]
        return multi_teacher_kd_loss(rec.s_logits, ts, self.T)
