"""DIST (Huang, You, Wang, Qian & Xu, Knowledge Distillation from A Stronger Teacher, NeurIPS 2022):
match the *relations* of the softened predictions instead of their values.

With ``Y_s = softmax(z_s/τ)`` and ``Y_t = softmax(z_t/τ)`` ([B, K]) and the Pearson correlation
``ρ(u, v) = cov(u, v) / (σ_u σ_v)`` (computed as the cosine of the mean-centred vectors, ``eps``
1e-8 in the denominator as in the authors' code),

* inter-class relation: ``L_inter = 1 − (1/B) Σ_i ρ(Y_s[i, :], Y_t[i, :])`` (each sample's row);
* intra-class relation: ``L_intra = 1 − (1/K) Σ_k ρ(Y_s[:, k], Y_t[:, k])`` (each class's column);
* ``L_DIST = τ² · (β·L_inter + γ·L_intra)``, β = γ = 1.

The τ² factor **is applied**, as in the authors' released code (``inter_loss = tau**2 * ...``);
the paper's equation has no τ², so at τ = 1 (its ImageNet setting) both agree. Pearson
correlation is invariant to a positive affine map of each compared vector, so ``L_inter`` is
unchanged when every row of ``Y_s`` goes through ``a_i·y + b_i`` (a_i > 0), ``L_intra`` when every
column does, and the whole loss under one common ``a·Y + b``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.distill.losses.base import BatchRecord, LossTerm, register_loss


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of every row of ``a`` with the same row of ``b``: [N]."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """``1 − mean_i ρ(y_s[i], y_t[i])`` over the samples (rows)."""
    return 1.0 - pearson_rows(y_s, y_t).mean()


def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """``1 − mean_k ρ(y_s[:, k], y_t[:, k])`` over the classes (columns)."""
    return inter_class_relation(y_s.t(), y_t.t())


def dist_relations(y_s: torch.Tensor, y_t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """``β·L_inter + γ·L_intra`` of two probability (or any score) matrices [B, K] (no τ²)."""
    return beta * inter_class_relation(y_s, y_t) + gamma * intra_class_relation(y_s, y_t)


def dist_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 4.0, beta: float = 1.0,
              gamma: float = 1.0) -> torch.Tensor:
    """``τ² · (β·L_inter + γ·L_intra)`` of ``softmax(z/τ)`` (the authors' code, τ² included)."""
    y_s = F.softmax(s_logits / T, dim=1)
    y_t = F.softmax(t_logits / T, dim=1)
    return (T * T) * dist_relations(y_s, y_t, beta, gamma)


@register_loss("dist", "DIST: τ²·(β·(1 − Pearson over each sample's classes) + γ·(1 − Pearson over each class's samples)), β=γ=1",
               "Huang, You, Wang, Qian & Xu, Knowledge Distillation from A Stronger Teacher, NeurIPS 2022")
class DIST(LossTerm):
    needs_teacher = True

    def __init__(self, T: float = 4.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        if T <= 0:
            raise ValueError("dist: temperature T must be > 0")
        if beta < 0 or gamma < 0:
            raise ValueError("dist: beta and gamma must be >= 0")
        self.T, self.beta, self.gamma = float(T), float(beta), float(gamma)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return dist_loss(rec.s_logits, rec.teacher_logits(self.name), self.T, self.beta, self.gamma)
