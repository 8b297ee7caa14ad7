"""VID, variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019).

The mutual information between a teacher feature t and a student feature s is bounded below by
``H(t) + E[log q(t | s)]`` with a Gaussian ``q(t | s) = N(t; μ(s), diag(σ²))``: μ is a small
regressor on the student feature (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, as in the authors'
and RepDistiller's code, mid width = the teacher's channels) and σ² a learned variance per teacher
channel, kept positive by the softplus parametrisation ``σ²_c = log(1 + exp(α_c)) + ε`` (ε = 1e-5).
Minimising ``−log q`` per element gives the loss

    L_VID = mean_{b,c,h,w} ½ · ( (t − μ(s))² / σ²_c + log σ²_c )

(the constant ½·log 2π of the Gaussian's negative log-likelihood is left out, as in the reference
code). ``α_c`` starts at ``log(exp(init_var − ε) − 1)``, so the initial variance is exactly
``init_var`` = 5 and at ``μ = t`` the loss is ``½·ln 5``. Spatial mismatches: the larger map is
average-pooled to the smaller (as in RepDistiller's VIDLoss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss


def vid_nll(mu: torch.Tensor, target: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``mean ½((t − μ)²/σ² + log σ²)`` with ``var`` per channel ([C])."""
    v = var.view(1, -1, *([1] * (mu.dim() - 2)))
    return (0.5 * ((mu - target).pow(2) / v + v.log())).mean()


def softplus_inverse(v: float) -> float:
    """``α`` with ``log(1 + e^α) = v``."""
    return math.log(math.expm1(v))


class VIDHead(nn.Module):
    """Regressor μ(s) and the per-channel variance of one layer pair."""

    def __init__(self, s_ch: int, t_ch: int, mid_ch: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.mu = nn.Sequential(nn.Conv2d(s_ch, mid_ch, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(mid_ch, mid_ch, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(mid_ch, t_ch, 1, bias=False))
        self.alpha = nn.Parameter(torch.full((t_ch,), softplus_inverse(init_var - eps)))
        self.eps = float(eps)

    def variance(self) -> torch.Tensor:
        return F.softplus(self.alpha) + self.eps

    def forward(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        hs, ht = fs.shape[-1], ft.shape[-1]
        if hs > ht:
            fs = F.adaptive_avg_pool2d(fs, ft.shape[-2:])
        elif ht > hs:
            ft = F.adaptive_avg_pool2d(ft, fs.shape[-2:])
        return vid_nll(self.mu(fs), ft, self.variance())


@register_loss("vid", "VID: Gaussian −log q(t|s) with a regressed mean and learned per-channel variance (softplus, initial 5)",
               "Ahn, Hu, Damianou, Lawrence & Dai, Variational Information Distillation for Knowledge Transfer, CVPR 2019")
class VID(LossTerm):
    """``layers``: ``[[student, teacher], ...]`` pairs; the loss is the sum over pairs."""

    needs_teacher = True

    def __init__(self, layers=None, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.pairs = layer_pairs(layers, "vid")
        if init_var <= eps or eps <= 0:
            raise ValueError("vid: need init_var > eps > 0 (the paper's init_var is 5)")
        self.init_var, self.eps = float(init_var), float(eps)
        self.heads = None

    def setup(self, probe: BatchRecord) -> None:
        heads = []
        for s, t in self.pairs:
            fs, ft = probe.s_feats.get(s), probe.t_feats.get(t)
            if fs is None or ft is None or fs.dim() != 4 or ft.dim() != 4:
                raise ValueError(f"vid: layers {s!r}/{t!r} must be conv stages with [B,C,H,W] outputs")
            heads.append(VIDHead(fs.shape[1], ft.shape[1], ft.shape[1], self.init_var, self.eps).to(fs.device))
        self.heads = nn.ModuleList(heads)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        if self.heads is None:
            self.setup(rec)
        return sum(h(rec.s_feats[s], rec.t_feats[t]) for h, (s, t) in zip(self.heads, self.pairs))
