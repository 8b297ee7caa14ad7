"""Feature-based terms: FitNets hints, attention transfer (AT) and neuron selectivity transfer (NST).

Spatial size mismatches are resolved by area-resizing (adaptive average pooling) the larger map
to the smaller one; channel mismatches in FitNets by a learnable 1x1 conv regressor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.attention import attention_pair
from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss


def common_spatial(fs: torch.Tensor, ft: torch.Tensor):
    """Resize two [B,C,H,W] maps to their common (smaller) spatial size by area averaging."""
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    if tuple(fs.shape[-2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[-2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def _active(epoch: int, from_epoch: int, until_epoch: Optional[int]) -> bool:
    return epoch >= from_epoch and (until_epoch is None or epoch < until_epoch)


# ------------------------------------------------------------------------------------------- FitNets


def hint_loss(fs_regressed: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """FitNets hint (Romero et al. 2015): ``½‖u_h − r(v_g)‖²`` per sample; here the mean squared
    error ``mean((r(F_s) − F_t)²)`` over batch, channels and positions (a size-independent scale)."""
    return (fs_regressed - ft).pow(2).mean()


@register_loss("fitnets", "FitNets hint: MSE(r(F_s), F_t) with a learnable 1x1 conv regressor r",
               "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015")
class FitNets(LossTerm):
    """``layers``: the hint pair ``[[student_guided, teacher_hint]]`` (exactly one).

    Two-stage schedule as data: ``until_epoch: E`` makes the term active only in epochs < E (the
    hint stage); the other terms (``ce``/``kd``) carry the KD stage (give them weight and let
    FitNets stop). ``from_epoch`` delays the term. Outside its window the term is 0.
    """

    needs_teacher = True

    def __init__(self, layers=None, from_epoch: int = 0, until_epoch: Optional[int] = None):
        super().__init__()
        if layers is None:
            raise ValueError("fitnets needs a hint layer: set layers: [[student_layer, teacher_layer]] "
                             "(e.g. [[stage2, layer2]])")
        self.pairs = layer_pairs(layers, "fitnets")
        if len(self.pairs) != 1:
            raise ValueError("fitnets takes exactly one hint pair: layers: [[student_layer, teacher_layer]]")
        if from_epoch < 0 or (until_epoch is not None and until_epoch <= from_epoch):
            raise ValueError("fitnets: need 0 <= from_epoch < until_epoch (until_epoch: null = always)")
        self.from_epoch, self.until_epoch = int(from_epoch), until_epoch
        self.regressor: Optional[nn.Module] = None

    def setup(self, probe: BatchRecord) -> None:
        s, t = self.pairs[0]
        fs, ft = probe.s_feats.get(s), probe.t_feats.get(t)
        if fs is None or ft is None or fs.dim() != 4 or ft.dim() != 4:
            raise ValueError(f"fitnets: hint layers {s!r}/{t!r} must be conv stages with [B,C,H,W] "
                             f"outputs; pick stage names from the models' stage_names")
        self.regressor = nn.Conv2d(fs.shape[1], ft.shape[1], kernel_size=1, bias=False).to(fs.device)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        if not _active(rec.epoch, self.from_epoch, self.until_epoch):
            return rec.s_logits.new_zeros(())
        if self.regressor is None:
            self.setup(rec)
        s, t = self.pairs[0]
        fs, ft = common_spatial(self.regressor(rec.s_feats[s]), rec.t_feats[t])
        return hint_loss(fs, ft)


# ------------------------------------------------------------------------------------------------ AT


def at_distance(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample ``‖Q_s/‖Q_s‖₂ − Q_t/‖Q_t‖₂‖₂`` with ``Q = vec(Σ_c |F_c|^p)`` (maps resized to the
    common spatial size by area averaging): a [B] tensor."""
    a_s, a_t, _ = attention_pair(fs, ft, p)
    return (a_s - a_t).norm(dim=1)


def at_loss(pairs: list, beta: float = 1000.0, p: float = 2.0, per_position: bool = True,
            squared: bool = False) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017):
    ``β/2 · Σ_j ‖Q_s^j/‖Q_s^j‖ − Q_t^j/‖Q_t^j‖‖₂`` averaged over the batch. With ``per_position``
    (the paper's practice: "β = 10³ divided by the number of elements in the attention map"), the
    pair j's distance is divided by its map's H·W. ``squared`` uses the squared distance, as the
    authors' released code does (``β/2 · mean((Q_s − Q_t)²)`` over batch and positions)."""
    total = 0.0
    for fs, ft in pairs:
        d = at_distance(fs, ft, p)
        d = (d.pow(2) if squared else d).mean()
        if per_position:
            h = min(fs.shape[-2], ft.shape[-2])
            w = min(fs.shape[-1], ft.shape[-1])
            d = d / (h * w)
        total = total + d
    return beta / 2.0 * total


@register_loss("at", "attention transfer: β/2·Σ_j ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖₂ over layer pairs",
               "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017")
class AttentionTransfer(LossTerm):
    needs_teacher = True

    def __init__(self, layers=None, beta: float = 1000.0, p: float = 2.0, per_position: bool = True,
                 squared: bool = False):
        super().__init__()
        self.pairs = layer_pairs(layers, "at")
        self.squared = bool(squared)
        if p <= 0 or beta < 0:
            raise ValueError("at: need p > 0 and beta >= 0")
        self.beta, self.p, self.per_position = float(beta), float(p), bool(per_position)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return at_loss([(rec.s_feats[s], rec.t_feats[t]) for s, t in self.pairs],
                       self.beta, self.p, self.per_position, self.squared)


# ----------------------------------------------------------------------------------------------- NST


def channel_distributions(f: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H·W]: each channel's activation pattern, L2-normalised over positions."""
    v = f.flatten(2)
    return v / v.norm(dim=2, keepdim=True).clamp_min(1e-12)


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel: str = "poly", degree: int = 2, c: float = 0.0):
    """Per-sample squared MMD between sample sets x [B, n, d] and y [B, m, d]:

    ``MMD² = 1/n² Σ_{i,i'} k(x_i,x_i') + 1/m² Σ_{j,j'} k(y_j,y_j') − 2/(nm) Σ_{i,j} k(x_i,y_j)``
    with ``k(a,b) = (aᵀb + c)^d`` (poly; NST uses d = 2, c = 0) or ``k(a,b) = aᵀb`` (linear, for
    which MMD² = ‖mean_i x_i − mean_j y_j‖², an attention-transfer-like map distance)."""
    def k(a, b):
        g = a @ b.transpose(1, 2)
        return g if kernel == "linear" else (g + c).pow(degree)

    return k(x, x).mean(dim=(1, 2)) + k(y, y).mean(dim=(1, 2)) - 2 * k(x, y).mean(dim=(1, 2))


def nst_loss(fs: torch.Tensor, ft: torch.Tensor, kernel: str = "poly", degree: int = 2, c: float = 0.0):
    """NST (Huang & Wang 2017): MMD² between the student's and teacher's sets of L2-normalised
    per-channel activation distributions (maps area-resized to the common size), batch mean."""
    fs, ft = common_spatial(fs, ft)
    return mmd2(channel_distributions(fs), channel_distributions(ft), kernel, degree, c).mean()


@register_loss("nst", "neuron selectivity transfer: MMD² (polynomial or linear kernel) of channel distributions",
               "Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, 2017")
class NST(LossTerm):
    needs_teacher = True

    def __init__(self, layers=None, kernel: str = "poly", degree: int = 2, c: float = 0.0):
        super().__init__()
        self.pairs = layer_pairs(layers, "nst")
        if kernel not in ("poly", "linear"):
            raise ValueError("nst: kernel must be 'poly' or 'linear'")
        if degree < 1:
            raise ValueError("nst: degree must be >= 1")
        self.kernel, self.degree, self.c = kernel, int(degree), float(c)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return sum(nst_loss(rec.s_feats[s], rec.t_feats[t], self.kernel, self.degree, self.c)
                   for s, t in self.pairs)
