"""Detection loss terms: the detector's own GFL loss and four distillation terms.

Every term reads a :class:`BatchRecord` whose ``s_logits`` / ``t_logits`` are detector outputs
``[B, P, C + 4(n+1)]`` (:mod:`kdlab.models.detection`), ``y`` the padded targets ``[B, M, 5]`` (rows
``[cls, x1, y1, x2, y2]``, ``cls = −1`` pads) and ``extra["layout"]`` the
:class:`kdlab.models.detection.Layout` of the batch (the detection objective puts it there).

* ``gfl`` — the detector's training loss (Li et al., NeurIPS 2020): quality focal loss on the class
  logits (the target of the positive class is the IoU of the predicted box with its ground truth;
  β = 2; summed, divided by the positive count), GIoU loss (weight 2) and distribution focal loss
  (weight 0.25) on the positives, both weighted by the detached top class score and divided by its
  sum (the DFL also by the 4 edges). Points are assigned FCOS-style: inside the box, within
  ``radius`` strides of its centre, and on the level whose range holds the largest edge distance;
  a point claimed by several boxes takes the smallest.
* ``fgd`` — focal and global distillation (Yang et al., CVPR 2022) on every FPN level.
* ``ld`` — localization distillation (Zheng et al., CVPR 2022): KL at temperature T between the
  teacher's and the student's edge distributions at the positive points.
* ``det_kd`` — logit KD on the head's sigmoid class scores (binary KL at temperature T).
* ``det_fitnets`` — FitNets hints on every FPN level (MSE after a 1×1 adapter).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss
from kdlab.models.detection import (
    aligned_iou,
    bbox2distance,
    box_area,
    distance2bbox,
    integral,
)

FPN_LEVELS = ["p3", "p4", "p5"]


# --------------------------------------------------------------------------------- assignment


def assign_points(layout, y: torch.Tensor, radius: float = 1.5):
    """``(labels [B, P], boxes [B, P, 4])``: each point's class (−1: background) and the box it
    regresses (see the module doc for the rule)."""
    cls, boxes = y[..., 0], y[..., 1:5].float()
    pts = layout.points  # [P, 2]
    d = bbox2distance(pts[None, :, None, :], boxes[:, None, :, :])  # [B, P, M, 4]
    inside = d.min(-1).values > 0
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, M, 2]
    r = (radius * layout.strides)[None, :, None]
    near = ((pts[None, :, None, 0] - centres[:, None, :, 0]).abs() < r) & \
           ((pts[None, :, None, 1] - centres[:, None, :, 1]).abs() < r)
    maxd = d.max(-1).values
    in_range = (maxd > layout.lo[None, :, None]) & (maxd <= layout.hi[None, :, None])
    ok = inside & near & in_range & (cls >= 0)[:, None, :]
    area = box_area(boxes)[:, None, :].expand_as(maxd)
    area = torch.where(ok, area, torch.full_like(area, math.inf))
    best_area, best = area.min(-1)  # [B, P]
    pos = torch.isfinite(best_area)
    labels = torch.where(pos, cls.gather(1, best).long(), torch.full_like(best, -1))
    tboxes = torch.gather(boxes, 1, best[..., None].expand(*best.shape, 4))
    return labels, tboxes


def record_assignment(rec: BatchRecord, radius: float = 1.5):
    """The assignment of ``rec`` (computed once per record and kept in ``rec.extra``)."""
    key = ("assign", float(radius))
    if key not in rec.extra:
        rec.extra[key] = assign_points(record_layout(rec), rec.y, radius)
    return rec.extra[key]


def record_layout(rec: BatchRecord):
    lay = rec.extra.get("layout")
    if lay is None:
        raise ValueError("detection loss terms need a detection run (task: detection); the batch has no layout")
    return lay


# ---------------------------------------------------------------------------------- GFL losses


def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, score: torch.Tensor,
                       beta: float = 2.0) -> torch.Tensor:
    """QFL per element ``[N, C]``: ``−|y − σ|^β · (y log σ + (1 − y) log(1 − σ))`` with target ``y`` =
    ``score`` at each point's label (``labels ≥ 0``) and 0 elsewhere."""
    sig = logits.sigmoid()
    target = torch.zeros_like(logits)
    pos = labels >= 0
    if pos.any():
        target[pos, labels[pos]] = score[pos].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (target - sig).abs().pow(beta)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL per row: ``−((y_{i+1} − y) log S_i + (y − y_i) log S_{i+1})`` for the two bins around the
    target distance ``y`` (in bins, ``0 ≤ y < n``); ``logits [N, n+1]``, ``target [N]``."""
    left = target.floor().long()
    right = left + 1
    wl = right.to(target.dtype) - target
    wr = target - left.to(target.dtype)
    return F.cross_entropy(logits, left, reduction="none") * wl + F.cross_entropy(logits, right, reduction="none") * wr


@register_loss("gfl", "detector loss: quality focal loss + GIoU + distribution focal loss (GFL head)",
               "Li et al., Generalized Focal Loss, NeurIPS 2020")
class GFLLoss(LossTerm):
    """``qfl_weight``, ``giou_weight``, ``dfl_weight``: the three parts (GFL's 1, 2, 0.25);
    ``beta``: QFL's focusing exponent; ``radius``: centre sampling radius in strides."""

    needs_labels = True

    def __init__(self, qfl_weight: float = 1.0, giou_weight: float = 2.0, dfl_weight: float = 0.25,
                 beta: float = 2.0, radius: float = 1.5):
        super().__init__()
        if min(qfl_weight, giou_weight, dfl_weight) < 0 or beta < 0 or radius <= 0:
            raise ValueError("gfl: the weights and beta must be >= 0 and radius > 0")
        self.qfl_weight, self.giou_weight, self.dfl_weight = float(qfl_weight), float(giou_weight), float(dfl_weight)
        self.beta, self.radius = float(beta), float(radius)

    def parts(self, rec: BatchRecord) -> dict:
        lay = record_layout(rec)
        cls, reg = lay.split(rec.s_logits)
        labels, tboxes = record_assignment(rec, self.radius)
        pos = labels >= 0
        npos = max(int(pos.sum()), 1)
        zero = rec.s_logits.sum() * 0.0
        score = torch.zeros(labels.shape, dtype=cls.dtype, device=cls.device)
        giou = dfl = zero
        if pos.any():
            pts = lay.points[None].expand(*labels.shape, 2)[pos]
            st = lay.strides[None].expand(*labels.shape)[pos]
            preg = reg[pos]  # [n, 4, bins]
            pbox = distance2bbox(pts, integral(preg) * st[:, None])
            tb = tboxes[pos]
            score[pos] = aligned_iou(pbox.detach(), tb).clamp_min(0)
            w = cls.detach().sigmoid().max(-1).values[pos]
            wsum = w.sum().clamp_min(1e-6)
            giou = (w * (1.0 - aligned_iou(pbox, tb, giou=True))).sum() / wsum
            td = (bbox2distance(pts, tb) / st[:, None]).clamp(0, lay.reg_max - 0.01)
            d = distribution_focal_loss(preg.reshape(-1, lay.reg_max + 1), td.reshape(-1)).reshape(-1, 4)
            dfl = (w[:, None] * d).sum() / (4.0 * wsum)
        C = cls.shape[-1]
        qfl = quality_focal_loss(cls.reshape(-1, C), labels.reshape(-1), score.reshape(-1), self.beta).sum() / npos
        return {"qfl": qfl, "giou": giou, "dfl": dfl}

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        p = self.parts(rec)
        return self.qfl_weight * p["qfl"] + self.giou_weight * p["giou"] + self.dfl_weight * p["dfl"]


# ------------------------------------------------------------------------------------------ LD


def ld_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Per row: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the last dimension (the bins)."""
    pt = F.softmax(t_logits / T, -1)
    return T * T * (pt * (F.log_softmax(t_logits / T, -1) - F.log_softmax(s_logits / T, -1))).sum(-1)


@register_loss("ld", "localization distillation: KL(T) between teacher and student box-edge distributions "
                     "at positive points", "Zheng et al., Localization Distillation for Dense Object Detection, "
                                           "CVPR 2022")
class LD(LossTerm):
    """``T``: temperature (paper: 10). The KL of each edge of each positive point is weighted by the
    student's detached top class score and the weighted mean is returned (the recipe weight is the
    paper's 0.25)."""

    needs_teacher = True
    needs_labels = True

    def __init__(self, T: float = 10.0, radius: float = 1.5):
        super().__init__()
        if T <= 0 or radius <= 0:
            raise ValueError("ld: T and radius must be > 0")
        self.T, self.radius = float(T), float(radius)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        lay = record_layout(rec)
        s_cls, s_reg = lay.split(rec.s_logits)
        _, t_reg = lay.split(rec.teacher_logits("ld"))
        labels, _ = record_assignment(rec, self.radius)
        pos = labels >= 0
        if not pos.any():
            return rec.s_logits.sum() * 0.0
        kl = ld_kl(s_reg[pos], t_reg[pos].float(), self.T)  # [n, 4]
        w = s_cls.detach().sigmoid().max(-1).values[pos][:, None].expand_as(kl)
        return (w * kl).sum() / w.sum().clamp_min(1e-6)


# ------------------------------------------------------------------------------------ head KD


def binary_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Elementwise ``KL(Bern(σ(t/T)) ‖ Bern(σ(s/T)))``."""
    pt = torch.sigmoid(t_logits / T)
    ls, lt = F.logsigmoid(s_logits / T), F.logsigmoid(t_logits / T)
    ls1, lt1 = F.logsigmoid(-s_logits / T), F.logsigmoid(-t_logits / T)
    return pt * (lt - ls) + (1 - pt) * (lt1 - ls1)


@register_loss("det_kd", "logit KD on the detection head's sigmoid class scores: T^2 * binary KL, summed, "
                         "per positive point", "Hinton et al. 2015; as the classification KD of LD's head")
class DetKD(LossTerm):
    """``T``: temperature. Sum over points and classes of ``T²·KL(Bern(σ(t/T)) ‖ Bern(σ(s/T)))``
    divided by the number of positive points (as QFL is)."""

    needs_teacher = True
    needs_labels = True

    def __init__(self, T: float = 2.0, radius: float = 1.5):
        super().__init__()
        if T <= 0:
            raise ValueError("det_kd: T must be > 0")
        self.T, self.radius = float(T), float(radius)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        lay = record_layout(rec)
        s_cls, _ = lay.split(rec.s_logits)
        t_cls, _ = lay.split(rec.teacher_logits("det_kd"))
        labels, _ = record_assignment(rec, self.radius)
        npos = max(int((labels >= 0).sum()), 1)
        return self.T ** 2 * binary_kl(s_cls, t_cls.float(), self.T).sum() / npos


# ----------------------------------------------------------------------------------- FitNets


def _adapter(cs: int, ct: int, device) -> nn.Module:
    return nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1).to(device)


def _fpn_pairs(layers, who: str):
    return layer_pairs(layers if layers is not None else FPN_LEVELS, who)


@register_loss("det_fitnets", "FitNets hints on every FPN level: mean over levels of MSE(adapter(F_s), F_t)",
               "Romero et al., FitNets, ICLR 2015 (as the feature-imitation baseline of FGD)")
class DetFitNets(LossTerm):
    """``layers``: FPN level names (default p3, p4, p5) or [student, teacher] pairs."""

    needs_teacher = True

    def __init__(self, layers=None):
        super().__init__()
        self.pairs = _fpn_pairs(layers, "det_fitnets")
        self.adapters = nn.ModuleDict()

    def setup(self, probe: BatchRecord) -> None:
        for i, (s, t) in enumerate(self.pairs):
            fs, ft = probe.s_feats[s], probe.t_feats[t]
            self.adapters[str(i)] = _adapter(fs.shape[1], ft.shape[1], fs.device)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        out = 0.0
        for i, (s, t) in enumerate(self.pairs):
            fs = self.adapters[str(i)](rec.s_feats[s]) if str(i) in self.adapters else rec.s_feats[s]
            out = out + (fs - rec.t_feats[t].float()).pow(2).mean()
        return out / len(self.pairs)


# ----------------------------------------------------------------------------------------- FGD


def fgd_masks(y: torch.Tensor, image_hw, feat_hw):
    """FGD's foreground and background masks ``[B, h, w]`` on an ``h × w`` feature map of an image of
    ``image_hw``: each box is scaled to the map, covers the cells it overlaps (rows ``floor(y1')``
    to ``ceil(y2') − 1``, likewise columns), and gives them ``1 / (rows · cols)``; the foreground is
    the maximum over boxes, the background is 1 where the foreground is 0, divided by its sum per
    image (an image without background keeps zeros)."""
    H, W = image_hw
    h, w = feat_hw
    cls, boxes = y[..., 0], y[..., 1:5].float()
    x1 = torch.floor(boxes[..., 0] * w / W)
    x2 = torch.ceil(boxes[..., 2] * w / W)
    y1 = torch.floor(boxes[..., 1] * h / H)
    y2 = torch.ceil(boxes[..., 3] * h / H)
    x1, y1 = x1.clamp(0, w - 1), y1.clamp(0, h - 1)
    x2, y2 = torch.maximum(x2.clamp(1, w), x1 + 1), torch.maximum(y2.clamp(1, h), y1 + 1)
    value = 1.0 / ((y2 - y1) * (x2 - x1))  # [B, M]
    rows = torch.arange(h, device=y.device, dtype=torch.float32)[None, None, :, None]
    cols = torch.arange(w, device=y.device, dtype=torch.float32)[None, None, None, :]
    cover = (rows >= y1[..., None, None]) & (rows < y2[..., None, None]) & \
            (cols >= x1[..., None, None]) & (cols < x2[..., None, None]) & (cls >= 0)[..., None, None]
    fg = torch.where(cover, value[..., None, None], torch.zeros_like(value[..., None, None])).amax(1)  # [B, h, w]
    bg = (fg == 0).float()
    total = bg.sum((1, 2), keepdim=True)
    bg = torch.where(total > 0, bg / total.clamp_min(1.0), bg)
    return fg, bg


def fgd_attention(f: torch.Tensor, T: float):
    """FGD's attention of a map ``[B, C, H, W]``: spatial ``H·W·softmax(mean_c|F| / T)`` ``[B, H, W]``
    and channel ``C·softmax(mean_hw|F| / T)`` ``[B, C]``."""
    B, C, H, W = f.shape
    a = f.abs()
    spatial = H * W * F.softmax((a.mean(1) / T).reshape(B, -1), dim=1).reshape(B, H, W)
    channel = C * F.softmax(a.mean((2, 3)) / T, dim=1)
    return spatial, channel


class GcRelation(nn.Module):
    """The GcBlock that FGD's global loss passes a map through: ``F + Wv(LN(ReLU…))(Σ_j softmax(Wk F)_j F_j)``
    (Cao et al., GCNet, 2019); the last 1×1 conv starts at zero, as in FGD."""

    def __init__(self, c: int):
        super().__init__()
        mid = max(1, c // 2)
        self.conv_mask = nn.Conv2d(c, 1, 1)
        self.channel_add = nn.Sequential(nn.Conv2d(c, mid, 1), nn.LayerNorm([mid, 1, 1]), nn.ReLU(inplace=True),
                                         nn.Conv2d(mid, c, 1))
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        B, C, H, W = f.shape
        weights = F.softmax(self.conv_mask(f).reshape(B, 1, H * W), dim=2)  # [B, 1, HW]
        context = torch.bmm(f.reshape(B, C, H * W), weights.transpose(1, 2)).reshape(B, C, 1, 1)
        return f + self.channel_add(context)


def fgd_parts(fs: torch.Tensor, ft: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, T: float,
              gc_s: Optional[nn.Module] = None, gc_t: Optional[nn.Module] = None) -> dict:
    """The four FGD losses of one level (``fs`` already adapted to the teacher's channels), each
    summed over the map and divided by the batch size:

    * ``fg`` / ``bg``: ``Σ M · S_t · C_t · (F_s − F_t)²`` with the foreground / background mask;
    * ``attention``: ``Σ|C_s − C_t| + Σ|S_s − S_t|``;
    * ``global``: ``Σ (G_s(F_s) − G_t(F_t))²`` through the GcBlocks (0 without them).
    """
    B = fs.shape[0]
    s_sp, s_ch = fgd_attention(fs, T)
    t_sp, t_ch = fgd_attention(ft, T)
    wt = t_sp[:, None] * t_ch[:, :, None, None]  # [B, C, H, W]
    sq = (fs - ft).pow(2) * wt
    out = {"fg": (sq * fg[:, None]).sum() / B, "bg": (sq * bg[:, None]).sum() / B,
           "attention": ((s_ch - t_ch).abs().sum() + (s_sp - t_sp).abs().sum()) / B}
    if gc_s is not None and gc_t is not None:
        out["global"] = (gc_s(fs) - gc_t(ft)).pow(2).sum() / B
    else:
        out["global"] = fs.sum() * 0.0
    return out


@register_loss("fgd", "focal and global distillation on FPN levels: masked, attention-weighted feature MSE "
                      "(fg alpha, bg beta), attention loss (gamma), GcBlock relation loss (lam)",
               "Yang et al., Focal and Global Knowledge Distillation for Detectors, CVPR 2022")
class FGD(LossTerm):
    """``layers``: FPN levels (default p3, p4, p5; or [student, teacher] pairs); ``temp``: attention
    temperature (0.5); ``alpha``/``beta``: foreground/background feature loss (1e-3, 5e-4);
    ``gamma``: attention loss (1e-3); ``lam``: global relation loss (5e-6). A 1×1 adapter maps the
    student's channels to the teacher's when they differ. The term is the sum over levels."""

    needs_teacher = True
    needs_labels = True

    def __init__(self, layers=None, temp: float = 0.5, alpha: float = 1e-3, beta: float = 5e-4,
                 gamma: float = 1e-3, lam: float = 5e-6):
        super().__init__()
        if temp <= 0 or min(alpha, beta, gamma, lam) < 0:
            raise ValueError("fgd: temp must be > 0 and alpha, beta, gamma, lam >= 0")
        self.pairs = _fpn_pairs(layers, "fgd")
        self.temp, self.alpha, self.beta, self.gamma, self.lam = (float(v) for v in (temp, alpha, beta, gamma, lam))
        self.adapters = nn.ModuleDict()
        self.gc_s = nn.ModuleDict()
        self.gc_t = nn.ModuleDict()

    def setup(self, probe: BatchRecord) -> None:
        for i, (s, t) in enumerate(self.pairs):
            fs, ft = probe.s_feats.get(s), probe.t_feats.get(t)
            if fs is None or ft is None or fs.dim() != 4 or ft.dim() != 4:
                raise ValueError(f"fgd: layers {s!r}/{t!r} must be FPN maps [B, C, H, W] (e.g. p3, p4, p5)")
            if fs.shape[-2:] != ft.shape[-2:]:
                raise ValueError(f"fgd: {s} {tuple(fs.shape[-2:])} and {t} {tuple(ft.shape[-2:])} differ in size")
            c = ft.shape[1]
            self.adapters[str(i)] = _adapter(fs.shape[1], c, fs.device)
            self.gc_s[str(i)] = GcRelation(c).to(fs.device)
            self.gc_t[str(i)] = GcRelation(c).to(fs.device)

    def level_parts(self, rec: BatchRecord) -> list[dict]:
        out = []
        for i, (s, t) in enumerate(self.pairs):
            k = str(i)
            fs = rec.s_feats[s]
            fs = self.adapters[k](fs) if k in self.adapters else fs
            ft = rec.t_feats[t].float()
            fg, bg = fgd_masks(rec.y, rec.x.shape[-2:], ft.shape[-2:])
            out.append(fgd_parts(fs, ft, fg, bg, self.temp, self.gc_s[k] if k in self.gc_s else None,
                                 self.gc_t[k] if k in self.gc_t else None))
        return out

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        total = 0.0
        for p in self.level_parts(rec):
            total = total + self.alpha * p["fg"] + self.beta * p["bg"] + self.gamma * p["attention"] \
                + self.lam * p["global"]
        return total
