"""Hierarchical multi-attention transfer, HMAT (Gou, Sun, Yu, Wan & Tao, ACM TOMM 2022/2023,
doi 10.1145/3568679), and its simpler hierarchical-AT variant (``hier_at``).

What is pinned down from the paper (its abstract; no reference code is public): different kinds of
attention transfer at different depths — *position-based* attention for low-level (shallow)
features, *channel-based* attention for high-level (deep) features, and *activation-based*
attention for mid- and high-level features. The exact map definitions below are kdlab's reading
(standard forms of each kind of attention), not the paper's equations:

* activation attention (AT): ``a = vec(Σ_c F_c²) / ‖·‖₂`` (:func:`kdlab.distill.losses.attention.attention_pair`,
  maps area-resized to the common size), compared across scales: the squared distance
  ``‖a_s − a_t‖²`` at the map's own size and after average-pooling the maps to 4x4, 2x2, 1x1
  (levels smaller than the map), weighted 1, 1/2, 1/4, 1/8 and normalised by the weight sum
  (the ReviewKD pyramid) — :func:`pyramid_attention_loss`;
* position attention: the [HW, HW] cosine-similarity matrix of the per-position feature vectors
  (``f̂_iᵀ f̂_j``), independent of the channel count; MSE between student and teacher. Its cost
  grows with (HW)², so both maps are first area-pooled to at most ``pos_size`` x ``pos_size``
  (default 14: a 28x28 stage is compared at 14x14; 8x8 digits maps are unchanged);
* channel attention: the [C, C] matrix of cosine similarities between channels (each channel's
  map L2-normalised over positions); the student's map first goes through a learnable 1x1 conv to
  the teacher's channel count (built in ``setup``); MSE.

Stage pairs are given shallow to deep and grouped: the first ``max(1, n//3)`` pairs are low level
(position), the last ``max(1, n//3)`` high level (channel + activation), the rest mid level
(activation); with one pair it is high level. ``hier_at`` is the activation attention alone at
every stage (the hierarchy of AT maps with the cross-scale pyramid).

Cross-layer alignment (``w_cross`` > 0, off by default; kdlab's reading, the paper's equations
could not be consulted): the student's activation attention at stage pair i is also aligned with
the teacher's at every other pair j ≠ i, through the same pyramid after area-resizing the larger
map to the smaller (so a deep map meets a shallow one at the deep scale):
``w_cross · mean_{i≠j} pyramid(F_s^i, F_t^j)`` over the n(n−1) ordered pairs.

The pyramid's 1x1 level compares two single-element maps that both normalise to 1, so it is
always 0: it only adds its weight 1/8 (or 1/2 on a 2x2 map) to the normaliser, i.e. a constant
rescaling of each stage's term (x0.93 on maps of 7x7 or larger). Kept as it is (the shipped
studies ran with it); ``levels: [4, 2]`` leaves it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.attention import spatial_attention
from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss
from kdlab.distill.losses.feature import common_spatial


def pyramid_attention_loss(fs: torch.Tensor, ft: torch.Tensor, levels=(4, 2, 1)) -> torch.Tensor:
    """Weighted mean over scales of the batch-mean ``‖a_s − a_t‖²`` of L2-normalised activation
    attention maps (see the module docstring)."""
    ms, mt = spatial_attention(fs), spatial_attention(ft)
    ms, mt = common_spatial(ms.unsqueeze(1), mt.unsqueeze(1))

    def dist(a, b):
        a = F.normalize(a.flatten(1), dim=1)
        b = F.normalize(b.flatten(1), dim=1)
        return (a - b).pow(2).sum(dim=1).mean()

    h = ms.shape[-2]
    loss, w, tot = dist(ms, mt), 1.0, 1.0
    for lv in levels:
        if lv >= h:
            continue
        w /= 2.0
        loss = loss + w * dist(F.adaptive_avg_pool2d(ms, (lv, lv)), F.adaptive_avg_pool2d(mt, (lv, lv)))
        tot += w
    return loss / tot


def cross_layer_attention_loss(s_feats, t_feats, levels=(4, 2, 1)) -> torch.Tensor:
    """Mean over the ordered stage pairs i ≠ j of :func:`pyramid_attention_loss` between the
    student's stage i and the teacher's stage j (maps area-resized to the smaller of the two)."""
    n = len(s_feats)
    if n != len(t_feats) or n < 2:
        raise ValueError("cross-layer attention needs the same number (>= 2) of student and teacher stages")
    terms = [pyramid_attention_loss(s_feats[i], t_feats[j], levels) for i in range(n) for j in range(n) if i != j]
    return sum(terms) / len(terms)


def position_attention(f: torch.Tensor) -> torch.Tensor:
    """[B, HW, HW] cosine similarities of the per-position feature vectors of [B, C, H, W]."""
    v = F.normalize(f.flatten(2), dim=1)  # [B, C, HW], unit vector per position
    return v.transpose(1, 2) @ v


def channel_attention(f: torch.Tensor) -> torch.Tensor:
    """[B, C, C] cosine similarities of the channels (each map L2-normalised over positions)."""
    v = F.normalize(f.flatten(2), dim=2)
    return v @ v.transpose(1, 2)


def hierarchy(n: int) -> list[str]:
    """The level of each of ``n`` stage pairs (shallow to deep): ``low | mid | high``."""
    if n == 1:
        return ["high"]
    k = max(1, n // 3)
    return ["low"] * k + ["mid"] * (n - 2 * k) + ["high"] * k


class _Stages(LossTerm):
    needs_teacher = True

    def __init__(self, layers, who: str, levels=(4, 2, 1)):
        super().__init__()
        self.pairs = layer_pairs(layers, who)
        self.levels = tuple(int(v) for v in levels)


@register_loss("hier_at", "hierarchical AT: activation attention at every stage, squared distance averaged over scales (own, 4, 2, 1)",
               "after Gou, Sun, Yu, Wan & Tao, Hierarchical Multi-Attention Transfer for Knowledge Distillation, ACM TOMM 2022; "
               "Zagoruyko & Komodakis, ICLR 2017")
class HierarchicalAT(_Stages):
    def __init__(self, layers=None, levels=(4, 2, 1)):
        super().__init__(layers, "hier_at", levels)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return sum(pyramid_attention_loss(rec.s_feats[s], rec.t_feats[t], self.levels) for s, t in self.pairs)


@register_loss("hmat", "HMAT: position attention (shallow), activation attention (mid, deep), channel attention (deep)",
               "Gou, Sun, Yu, Wan & Tao, Hierarchical Multi-Attention Transfer for Knowledge Distillation, ACM TOMM 2022 (doi 10.1145/3568679)")
class HMAT(_Stages):
    """``w_pos``, ``w_act``, ``w_ch``: the weights of the three kinds of attention; ``w_cross``: the
    weight of the cross-layer activation-attention term (0: off, see the module docstring)."""

    def __init__(self, layers=None, w_pos: float = 1.0, w_act: float = 1.0, w_ch: float = 1.0, levels=(4, 2, 1),
                 pos_size: int = 14, w_cross: float = 0.0):
        super().__init__(layers, "hmat", levels)
        if min(w_pos, w_act, w_ch, w_cross) < 0:
            raise ValueError("hmat: w_pos, w_act, w_ch and w_cross must be >= 0")
        self.w_cross = float(w_cross)
        if pos_size < 1:
            raise ValueError("hmat: pos_size (largest side of the position-attention maps) must be >= 1")
        self.pos_size = int(pos_size)
        self.w_pos, self.w_act, self.w_ch = float(w_pos), float(w_act), float(w_ch)
        self.level_of = hierarchy(len(self.pairs))
        self.adapters = None

    def setup(self, probe: BatchRecord) -> None:
        ads = {}
        for (s, t), lv in zip(self.pairs, self.level_of):
            fs, ft = probe.s_feats.get(s), probe.t_feats.get(t)
            if fs is None or ft is None or fs.dim() != 4 or ft.dim() != 4:
                raise ValueError(f"hmat: layers {s!r}/{t!r} must be conv stages with [B,C,H,W] outputs")
            if lv == "high":
                ads[f"{s}__{t}".replace(".", "_")] = nn.Conv2d(fs.shape[1], ft.shape[1], 1, bias=False).to(fs.device)
        self.adapters = nn.ModuleDict(ads)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        if self.adapters is None:
            self.setup(rec)
        total = rec.s_logits.new_zeros(())
        for (s, t), lv in zip(self.pairs, self.level_of):
            fs, ft = rec.s_feats[s], rec.t_feats[t]
            if lv == "low":
                a, b = common_spatial(fs, ft)
                if max(a.shape[-2:]) > self.pos_size:
                    size = (min(a.shape[-2], self.pos_size), min(a.shape[-1], self.pos_size))
                    a, b = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
                total = total + self.w_pos * (position_attention(a) - position_attention(b)).pow(2).mean()
                continue
            total = total + self.w_act * pyramid_attention_loss(fs, ft, self.levels)
            if lv == "high":
                a, b = common_spatial(self.adapters[f"{s}__{t}".replace(".", "_")](fs), ft)
                total = total + self.w_ch * (channel_attention(a) - channel_attention(b)).pow(2).mean()
        if self.w_cross > 0 and len(self.pairs) > 1:
            total = total + self.w_cross * cross_layer_attention_loss(
                [rec.s_feats[s] for s, _ in self.pairs], [rec.t_feats[t] for _, t in self.pairs], self.levels)
        return total
