"""CC / CCKD, correlation congruence (Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, Correlation
Congruence for Knowledge Distillation, ICCV 2019): besides the instance-level KD, match the
correlation *between instances* of a batch.

Embeddings: the student's pooled feature goes through a learnable linear head to the teacher's
width (built in ``setup``), the teacher's pooled feature is used as it is; both are L2-normalised
(``e``). The correlation of a pair is the Gaussian RBF kernel ``k(e_i, e_j) = exp(−γ‖e_i − e_j‖²)``,
which for unit vectors is ``exp(−2γ)·exp(2γ·e_iᵀe_j)`` and is approximated, as in the paper, by
its Taylor series to order P:

    k(e_i, e_j) ≈ exp(−2γ) · Σ_{p=0}^{P} (2γ)^p / p! · (e_iᵀe_j)^p

(``order: null`` uses the exact kernel). With the batch correlation matrices ``C_s``, ``C_t``
([B, B]) the loss is ``L_CC = ‖C_s − C_t‖²_F / B²`` (the paper's squared norm; torchdistill's
``CCKDLoss`` uses the unsquared ``torch.dist``). Paper defaults: γ = 0.4, P = 2.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss


def gaussian_correlation(e: torch.Tensor, gamma: float = 0.4, order: Optional[int] = 2) -> torch.Tensor:
    """[B, B] kernel matrix of unit vectors ``e`` [B, d] (Taylor order ``order``, or exact if None)."""
    g = e @ e.t()
    if order is None:
        return torch.exp(-gamma * (2.0 - 2.0 * g))
    out = torch.ones_like(g)
    for p in range(1, order + 1):
        out = out + (2.0 * gamma) ** p / math.factorial(p) * g.pow(p)
    return math.exp(-2.0 * gamma) * out


def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor, gamma: float = 0.4, order: Optional[int] = 2) -> torch.Tensor:
    """``‖C(e_s) − C(e_t)‖²_F / B²`` of two batches of unit embeddings."""
    b = e_s.shape[0]
    return (gaussian_correlation(e_s, gamma, order) - gaussian_correlation(e_t, gamma, order)).pow(2).sum() / (b * b)


def pooled(f: torch.Tensor) -> torch.Tensor:
    return f.flatten(2).mean(dim=2) if f.dim() == 4 else f.flatten(1)


@register_loss("cc", "correlation congruence: ‖C_s − C_t‖²_F/B² of Gaussian-RBF (Taylor order 2, γ=0.4) batch correlations",
               "Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019")
class CorrelationCongruence(LossTerm):
    """``layers``: one ``[student, teacher]`` pair (pooled to vectors; the deepest stages)."""

    needs_teacher = True

    def __init__(self, layers=None, gamma: float = 0.4, order: Optional[int] = 2):
        super().__init__()
        self.pairs = layer_pairs(layers, "cc")
        if len(self.pairs) != 1:
            raise ValueError("cc takes one layer pair: layers: [[student_layer, teacher_layer]]")
        if gamma <= 0 or (order is not None and order < 1):
            raise ValueError("cc: need gamma > 0 and order >= 1 (or null for the exact kernel)")
        self.gamma, self.order = float(gamma), (None if order is None else int(order))
        self.head: Optional[nn.Module] = None

    def setup(self, probe: BatchRecord) -> None:
        s, t = self.pairs[0]
        fs, ft = probe.s_feats.get(s), probe.t_feats.get(t)
        if fs is None or ft is None:
            raise ValueError(f"cc: no features at {s!r}/{t!r}; pick stage names of the models")
        self.head = nn.Linear(pooled(fs).shape[1], pooled(ft).shape[1]).to(fs.device)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        if self.head is None:
            self.setup(rec)
        s, t = self.pairs[0]
        e_s = F.normalize(self.head(pooled(rec.s_feats[s])), dim=1)
        e_t = F.normalize(pooled(rec.t_feats[t]), dim=1)
        return cc_loss(e_s, e_t, self.gamma, self.order)
