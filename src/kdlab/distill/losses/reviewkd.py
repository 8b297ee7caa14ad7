"""ReviewKD (Chen, Liu, Zhao & Jia, Distilling Knowledge via Knowledge Review, CVPR 2021): a
student stage is taught by the teacher's *same and shallower* stages through a residual
"review" path with attention-based fusion (ABF), and the hierarchical context loss (HCL).

ABF (one per tapped student stage, built in ``setup`` from the probe's shapes): ``x = BN(conv1x1(F_s))``
to ``mid_channel`` channels; for every stage but the deepest, the residual ``r`` coming from the
next deeper stage is resized (nearest) to ``x``'s size and fused with two sigmoid attention maps
``[a_1, a_2] = σ(conv1x1([x, r]))``: ``x ← x·a_1 + r·a_2``; ``x`` is resized (nearest) to the teacher
stage's size, passed on as the residual of the next shallower stage, and ``BN(conv3x3(x))`` with the
teacher's channel count is the stage's output. Deepest stage first, as in the authors' code.

HCL, per stage (``hcl_stage``): ``(MSE(G_s, F_t) + Σ_l w_l·MSE(pool_l(G_s), pool_l(F_t))) / (1 + Σ_l w_l)``
over the pooled levels ``l ∈ (4, 2, 1)`` smaller than the map (``l < H``), with weights 1/2, 1/4,
1/8 given in order to the levels that are used (adaptive average pooling to l x l), MSE the mean
over all elements. For a constant difference ``G_s − F_t = d`` every MSE is d², so the stage loss
is exactly d². The term is ``warmup``-ramped like the mdistiller config (``min((epoch+1)/warmup, 1)``;
mdistiller: weight 1, 20 warm-up epochs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss


def hcl_stage(fs: torch.Tensor, ft: torch.Tensor, levels=(4, 2, 1)) -> torch.Tensor:
    """The hierarchical context loss of one stage pair (same shapes [B, C, H, W])."""
    h = fs.shape[2]
    loss = F.mse_loss(fs, ft)
    w, tot = 1.0, 1.0
    for lv in levels:
        if lv >= h:
            continue
        w /= 2.0
        loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, (lv, lv)), F.adaptive_avg_pool2d(ft, (lv, lv)))
        tot += w
    return loss / tot


def hcl_loss(fs_list, ft_list, levels=(4, 2, 1)) -> torch.Tensor:
    """Σ over stage pairs of :func:`hcl_stage`."""
    return sum(hcl_stage(fs, ft, levels) for fs, ft in zip(fs_list, ft_list))


class ABF(nn.Module):
    """One attention-based fusion block (see the module docstring)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 1, bias=False), nn.BatchNorm2d(mid_ch))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
        self.att = nn.Sequential(nn.Conv2d(2 * mid_ch, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], out_size) -> tuple:
        x = self.conv1(x)
        if self.att is not None and residual is not None:
            r = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            a = self.att(torch.cat([x, r], dim=1))
            x = x * a[:, 0:1] + r * a[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


@register_loss("reviewkd", "ReviewKD: attention-based fusion of student stages (deep to shallow) + hierarchical context loss (levels 4,2,1 weighted 1/2,1/4,1/8)",
               "Chen, Liu, Zhao & Jia, Distilling Knowledge via Knowledge Review, CVPR 2021")
class ReviewKD(LossTerm):
    """``layers``: ``[[student_stage, teacher_stage], ...]`` shallow to deep; ``mid_channel``: the
    fusion width (default: the largest teacher channel count, at most 256)."""

    needs_teacher = True

    def __init__(self, layers=None, mid_channel: Optional[int] = None, warmup: int = 20,
                 levels=(4, 2, 1)):
        super().__init__()
        self.pairs = layer_pairs(layers, "reviewkd")
        if mid_channel is not None and mid_channel < 1:
            raise ValueError("reviewkd: mid_channel must be >= 1 (or null for the default)")
        if warmup < 0:
            raise ValueError("reviewkd: warmup (epochs of linear ramp) must be >= 0")
        self.mid_channel, self.warmup = mid_channel, int(warmup)
        self.levels = tuple(int(v) for v in levels)
        self.abfs: Optional[nn.ModuleList] = None

    def setup(self, probe: BatchRecord) -> None:
        fs = [probe.s_feats.get(s) for s, _ in self.pairs]
        ft = [probe.t_feats.get(t) for _, t in self.pairs]
        if any(f is None or f.dim() != 4 for f in fs + ft):
            raise ValueError("reviewkd: every layer must be a conv stage with [B,C,H,W] outputs; "
                             "pick names from the models' stage_names")
        mid = self.mid_channel or min(256, max(f.shape[1] for f in ft))
        n = len(self.pairs)
        dev = fs[0].device
        self.abfs = nn.ModuleList([ABF(fs[i].shape[1], mid, ft[i].shape[1], fuse=i < n - 1)
                                   for i in range(n)]).to(dev)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        if self.abfs is None:
            self.setup(rec)
        ramp = min((rec.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        fs = [rec.s_feats[s] for s, _ in self.pairs]
        ft = [rec.t_feats[t] for _, t in self.pairs]
        outs = [None] * len(fs)
        residual = None
        for i in reversed(range(len(fs))):
            outs[i], residual = self.abfs[i](fs[i], residual, ft[i].shape[-2:])
        return ramp * hcl_loss(outs, ft, self.levels)
