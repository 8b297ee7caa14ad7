"""MLKD, multi-level logit distillation (Jin, Wang & Lin, CVPR 2023): KD at several temperatures
plus class- and batch-level correlation losses, over a weak and a strong view of every batch.

With ``P = softmax(z/T)`` ([B, K]) for the student (s) and the teacher (t):

* instance level: ``KD_T = T² · mean_i KL(P_t[i] ‖ P_s[i])``;
* class level: ``CC_T = ‖P_tᵀP_t − P_sᵀP_s‖²_F / K`` (K x K class correlation);
* batch level: ``BC_T = ‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B`` (B x B sample correlation);
* temperatures ``T ∈ {4, 3, 5, 2, 6}``;
* prediction-confidence masks from the teacher on the weak view at T = 1: ``m̄`` = the fraction of
  samples whose max probability is ≤ the batch median, ``c̄`` = the fraction of classes whose summed
  probability is ≤ the median over classes. The authors' code multiplies the *batch-mean* losses
  by the boolean masks and averages (``(kd_loss(...) * mask).mean()``), which is the loss times
  that fraction; kdlab computes exactly that.

    L = Σ_T [ m̄·KD_T(weak) + KD_T(strong) + c̄·CC_T(weak) + m̄·BC_T(weak) ] + ce_strong · CE(z_s(strong), y)

(the cross-entropy on the weak view is the recipe's ``ce`` term). As in the released code, the
class and batch correlation losses of the strong view are not part of the objective. One
deviation: the released code's strong-view KD at T = 2 and T = 6 reads the *weak* logits (a copy
slip); kdlab uses the strong view at all five temperatures.

The strong view (loop support: the objective passes ``forward_student`` / ``forward_teacher`` in
``rec.extra``, which run the student with gradients and the frozen teacher live on any input) is
made from the batch's weak view (the loader's crop/flip) by :func:`strong_view`, batched on the
device from a generator seeded by ``(seed, epoch, step)``: a second random crop with zero padding
``pad``, a per-image contrast/brightness jitter and a ``cutout`` x ``cutout`` erased square. This
stands in for the AutoAugment-style strong augmentation of the paper, which kdlab's batched
augmentation does not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.core.seeding import derive_seed
from kdlab.data.augment import crop_with_offsets
from kdlab.distill.losses.base import BatchRecord, LossTerm, register_loss
from kdlab.distill.losses.response import kl_rows, standardize_logits


def class_correlation_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``‖P_tᵀP_t − P_sᵀP_s‖²_F / K`` with ``P = softmax(z/T)``."""
    p_s, p_t = F.softmax(s_logits / T, dim=1), F.softmax(t_logits / T, dim=1)
    return (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / s_logits.shape[1]


def batch_correlation_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B`` with ``P = softmax(z/T)``."""
    p_s, p_t = F.softmax(s_logits / T, dim=1), F.softmax(t_logits / T, dim=1)
    return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / s_logits.shape[0]


def confidence_fractions(t_logits_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m̄, c̄)``: the fraction of samples whose teacher confidence ``max_k p_k`` is at or below
    the batch median, and of classes whose summed probability ``Σ_i p_ik`` is at or below the
    median over classes (median = linear-interpolation 50th percentile, as numpy's)."""
    p = F.softmax(t_logits_weak.detach().float(), dim=1)
    conf = p.max(dim=1).values
    cls = p.sum(dim=0)
    m = (conf <= torch.quantile(conf, 0.5)).float().mean()
    c = (cls <= torch.quantile(cls, 0.5)).float().mean()
    return m, c


def strong_view(x: torch.Tensor, generator: torch.Generator, pad: int = 2, cutout: int = 0,
                jitter: float = 0.4) -> torch.Tensor:
    """A strong augmentation of a normalised batch [N, C, H, W], every draw from ``generator``:
    random crop with zero padding ``pad``; ``x·a + b`` per image with ``a ~ U(1 − jitter, 1 + jitter)``,
    ``b ~ U(−jitter, jitter)``; a ``cutout`` x ``cutout`` square (rows and columns
    ``[c − cutout//2, c − cutout//2 + cutout)`` around a uniform centre c, clipped) set to 0."""
    n, _, h, w = x.shape
    dev = generator.device
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
        x = crop_with_offsets(x, pad, dy, dx)
    if jitter > 0:
        a = 1.0 + (torch.rand(n, generator=generator, device=dev) * 2 - 1) * jitter
        b = (torch.rand(n, generator=generator, device=dev) * 2 - 1) * jitter
        x = x * a.to(x.device).view(-1, 1, 1, 1) + b.to(x.device).view(-1, 1, 1, 1)
    if cutout > 0:
        cy = torch.randint(0, h, (n,), generator=generator, device=dev).to(x.device)
        cx = torch.randint(0, w, (n,), generator=generator, device=dev).to(x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        lo_r = cy.view(-1, 1, 1) - cutout // 2
        lo_c = cx.view(-1, 1, 1) - cutout // 2
        inside = (rows >= lo_r) & (rows < lo_r + cutout) & (cols >= lo_c) & (cols < lo_c + cutout)
        x = x.masked_fill(inside.unsqueeze(1), 0.0)
    return x


def mlkd_loss(s_weak: torch.Tensor, t_weak: torch.Tensor, s_strong: torch.Tensor, t_strong: torch.Tensor,
              temperatures=(4.0, 3.0, 5.0, 2.0, 6.0), logit_stand: bool = False) -> torch.Tensor:
    """``Σ_T [m̄·KD_T(weak) + KD_T(strong) + c̄·CC_T(weak) + m̄·BC_T(weak)]`` (see the module doc;
    no cross-entropy). ``logit_stand`` Z-scores the logits of the KD parts only, as the logit
    standardisation authors' MLKD code does."""
    m, c = confidence_fractions(t_weak)
    kw_s, kw_t, ks_s, ks_t = s_weak, t_weak, s_strong, t_strong
    if logit_stand:
        kw_s, kw_t, ks_s, ks_t = (standardize_logits(z) for z in (s_weak, t_weak, s_strong, t_strong))
    total = s_weak.new_zeros(())
    for T in temperatures:
        total = total + m * kl_rows(kw_s, kw_t, T).mean() * T * T + kl_rows(ks_s, ks_t, T).mean() * T * T
        total = total + c * class_correlation_loss(s_weak, t_weak, T) + m * batch_correlation_loss(s_weak, t_weak, T)
    return total


@register_loss("mlkd", "multi-level logit distillation: KD at T∈{4,3,5,2,6} + class/batch correlation, weak + strong views",
               "Jin, Wang & Lin, Multi-Level Logit Distillation, CVPR 2023")
class MLKD(LossTerm):
    """``pad``/``cutout``/``jitter``: the strong view (:func:`strong_view`); ``ce_strong``: the
    weight of the cross-entropy on the strong view (1, as the reference's CE on both views);
    ``seed``: its draws are seeded by ``(seed, epoch, step)``."""

    needs_teacher = True

    def __init__(self, temperatures=(4.0, 3.0, 5.0, 2.0, 6.0), ce_strong: float = 1.0, pad: int = 2,
                 cutout: int = 0, jitter: float = 0.4, logit_stand: bool = False, seed: int = 0):
        super().__init__()
        temps = [float(t) for t in temperatures]
        if not temps or min(temps) <= 0:
            raise ValueError("mlkd: temperatures must be a non-empty list of values > 0 (e.g. [4, 3, 5, 2, 6])")
        if pad < 0 or cutout < 0 or not 0 <= jitter < 1 or ce_strong < 0:
            raise ValueError("mlkd: need pad >= 0, cutout >= 0, 0 <= jitter < 1 and ce_strong >= 0")
        self.temperatures = tuple(temps)
        self.ce_strong, self.pad, self.cutout, self.jitter = float(ce_strong), int(pad), int(cutout), float(jitter)
        self.logit_stand, self.seed = bool(logit_stand), int(seed)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        fs, ft = rec.extra.get("forward_student"), rec.extra.get("forward_teacher")
        if fs is None or ft is None:
            raise ValueError("mlkd needs the objective's forward_student/forward_teacher in rec.extra "
                             "(run it through kdlab.train.build.build_run)")
        g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, "mlkd", rec.epoch, rec.step))
        x_strong = strong_view(rec.x, g, self.pad, self.cutout, self.jitter)
        s_strong = fs(x_strong)
        t_strong = ft(x_strong)
        loss = mlkd_loss(rec.s_logits, rec.teacher_logits(self.name), s_strong, t_strong,
                         self.temperatures, self.logit_stand)
        if self.ce_strong:
            y = rec.y
            keep = y >= 0
            if keep.any():
                loss = loss + self.ce_strong * F.cross_entropy(s_strong[keep], y[keep])
        return loss
