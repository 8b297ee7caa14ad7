"""Relation-based terms: FSP matrices (flow of solution procedure) and relational KD (RKD)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss


# ----------------------------------------------------------------------------------------------- FSP


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Yim et al. 2017: ``G[c1, c2] = Σ_{h,w} F1[c1,h,w]·F2[c2,h,w] / (H·W)`` per sample,
    [B,C1,H,W] x [B,C2,H,W] -> [B, C1, C2]. The larger map is area-resized to the smaller first."""
    size = (min(f1.shape[-2], f2.shape[-2]), min(f1.shape[-1], f2.shape[-1]))
    if tuple(f1.shape[-2:]) != size:
        f1 = F.adaptive_avg_pool2d(f1, size)
    if tuple(f2.shape[-2:]) != size:
        f2 = F.adaptive_avg_pool2d(f2, size)
    a, b = f1.flatten(2), f2.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[-1]


def fsp_loss(gs: list, gt: list, lambdas: Optional[list] = None) -> torch.Tensor:
    """``(1/N) Σ_x Σ_i λ_i ‖G_i^T(x) − G_i^S(x)‖²_F`` (squared L2 over the matrix entries)."""
    lambdas = lambdas or [1.0] * len(gs)
    return sum(lam * (s - t).pow(2).sum(dim=(1, 2)).mean() for lam, s, t in zip(lambdas, gs, gt))


@register_loss("fsp", "FSP: L2 between student and teacher Gram (FSP) matrices of consecutive layer pairs",
               "Yim, Joo, Bae & Kim, A Gift from Knowledge Distillation, CVPR 2017")
class FSP(LossTerm):
    """``layers``: k >= 2 pairs ``[[s_1, t_1], [s_2, t_2], ...]``; the FSP matrices are taken
    between consecutive entries (s_i, s_{i+1}) and (t_i, t_{i+1}). When a student layer has a
    different channel count than its teacher layer, a learnable 1x1 conv (built in setup) maps
    the student's channels to the teacher's (as FitNets does) before the Gram matrix."""

    needs_teacher = True

    def __init__(self, layers=None):
        super().__init__()
        self.pairs = layer_pairs(layers, "fsp")
        if len(self.pairs) < 2:
            raise ValueError("fsp needs at least two layer pairs: layers: [[stage1, layer1], [stage2, layer2]]")
        self.adapters = nn.ModuleDict()

    def setup(self, probe: BatchRecord) -> None:
        for s, t in self.pairs:
            fs, ft = probe.s_feats[s], probe.t_feats[t]
            if fs.dim() != 4 or ft.dim() != 4:
                raise ValueError(f"fsp: layers {s!r}/{t!r} must give [B,C,H,W] feature maps")
            if fs.shape[1] != ft.shape[1] and s not in self.adapters:
                self.adapters[s] = nn.Conv2d(fs.shape[1], ft.shape[1], 1, bias=False).to(fs.device)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        sf = [self.adapters[s](rec.s_feats[s]) if s in self.adapters else rec.s_feats[s] for s, _ in self.pairs]
        tf = [rec.t_feats[t] for _, t in self.pairs]
        if any(a.shape[1] != b.shape[1] for a, b in zip(sf, tf)):
            raise ValueError("fsp: channel counts differ and no adapter was built (setup() not called)")
        gs = [fsp_matrix(sf[i], sf[i + 1]) for i in range(len(sf) - 1)]
        gt = [fsp_matrix(tf[i], tf[i + 1]) for i in range(len(tf) - 1)]
        return fsp_loss(gs, gt)


# ----------------------------------------------------------------------------------------------- RKD


def _embed(f: torch.Tensor) -> torch.Tensor:
    if f.dim() == 4:
        f = F.adaptive_avg_pool2d(f, 1)
    return f.flatten(1).float()


def rkd_distance_potential(e: torch.Tensor) -> torch.Tensor:
    """``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ`` with ``μ = mean_{i≠j} ‖t_i − t_j‖₂``: [B, B]."""
    d = torch.cdist(e, e).clamp_min(0)
    n = e.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    mu = d[off].mean().clamp_min(1e-12)
    return d / mu


def rkd_distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Park et al. 2019 distance-wise loss: ``mean_{i≠j} Huber(ψ_D(s_i,s_j) − ψ_D(t_i,t_j))``
    (Huber = smooth L1 with δ = 1)."""
    n = s.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    return F.smooth_l1_loss(rkd_distance_potential(s)[off], rkd_distance_potential(t)[off])


def rkd_angle_potential(e: torch.Tensor) -> torch.Tensor:
    """``ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩`` with ``e_ij = (t_i − t_j)/‖t_i − t_j‖``: [B, B, B]
    indexed [j, i, k] (vertex j)."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)          # [j, i] = t_i - t_j
    unit = F.normalize(diff, p=2, dim=2)
    return unit @ unit.transpose(1, 2)              # [j, i, k] = <e_ij, e_kj>


def rkd_angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Angle-wise loss: ``mean over triplets (i, j, k) distinct of Huber(ψ_A^s − ψ_A^t)``."""
    n = s.shape[0]
    idx = torch.arange(n, device=s.device)
    distinct = (idx.view(-1, 1, 1) != idx.view(1, -1, 1)) & (idx.view(-1, 1, 1) != idx.view(1, 1, -1)) \
        & (idx.view(1, -1, 1) != idx.view(1, 1, -1))
    return F.smooth_l1_loss(rkd_angle_potential(s)[distinct], rkd_angle_potential(t)[distinct])


@register_loss("rkd", "relational KD: distance-wise (÷ mean distance) + angle-wise Huber losses",
               "Park, Kim, Lu & Cho, Relational Knowledge Distillation, CVPR 2019")
class RKD(LossTerm):
    """``w_d · L_dist + w_a · L_angle`` (paper: 25 and 50) on embeddings: the logits by default,
    or a layer pair ``layers: [[student, teacher]]`` (feature maps globally average-pooled)."""

    needs_teacher = True

    def __init__(self, layers=None, w_d: float = 25.0, w_a: float = 50.0):
        super().__init__()
        self.pairs = layer_pairs(layers, "rkd") if layers is not None else []
        if len(self.pairs) > 1:
            raise ValueError("rkd takes at most one embedding pair: layers: [[student, teacher]] (or omit for logits)")
        if w_d < 0 or w_a < 0:
            raise ValueError("rkd: w_d and w_a must be >= 0")
        self.w_d, self.w_a = float(w_d), float(w_a)

    def student_layers(self):
        return [self.pairs[0][0]] if self.pairs else []

    def teacher_layers(self):
        return [self.pairs[0][1]] if self.pairs else []

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        if self.pairs:
            s, t = _embed(rec.s_feats[self.pairs[0][0]]), _embed(rec.t_feats[self.pairs[0][1]])
        else:
            s, t = rec.s_logits, rec.teacher_logits(self.name)
        if s.shape[0] < 3:
            return s.sum() * 0.0  # relations need at least three samples (a batch tail)
        t = t.detach()
        return self.w_d * rkd_distance_loss(s, t) + self.w_a * rkd_angle_loss(s, t)
