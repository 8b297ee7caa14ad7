"""A small one-stage anchor-free detector (backbone, FPN-lite neck, GFL-style head) and the box
operations detection needs.

**Detector** (``gfl_det``, registered): five stride-2 stages of two 3×3 conv-BN-ReLU layers
(widths ``w, 2w, 4w, 8w, 8w``), an FPN-lite neck (1×1 laterals to ``fpn_channels``, top-down nearest
upsampling and addition, one 3×3 conv per level: modules ``p3``, ``p4``, ``p5`` at strides 8, 16,
32, the layers distillation taps) and a head shared by the levels (Li et al., *Generalized Focal
Loss*, NeurIPS 2020): ``head_convs`` 3×3 conv-GroupNorm-ReLU layers per branch, a class branch with
one sigmoid logit per class (joint class and localisation quality, trained by quality focal loss)
and a box branch giving, for each of the four edges, logits over ``reg_max + 1`` bins (the edge's
distance from the point in stride units is the expectation of that distribution), scaled by one
learnable scalar per level.

The forward pass returns ONE tensor ``[B, P, C + 4·(reg_max+1)]`` (every point of every level, P3
first, row-major): class logits then the four edge distributions (left, top, right, bottom). So the
detector is a plain tensor-in, tensor-out model: the teacher cache stores its output like any
logits, and its FPN maps are tapped by name. :meth:`GFLDetector.layout` (or :func:`det_layout`)
gives the points, strides and assignment ranges that decode it.

**Box ops**: boxes are ``[x1, y1, x2, y2]`` in pixels. :func:`box_iou` and :func:`nms` use
``torchvision.ops`` when torchvision is installed and a pure-torch implementation otherwise (both
tested against each other and against hand-worked values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import check_width, register_model, scaled

try:  # optional: torchvision's compiled box ops
    import torchvision.ops as _tvops  # noqa: F401
    HAVE_TORCHVISION = True
except Exception:  # pragma: no cover - depends on the environment
    _tvops = None
    HAVE_TORCHVISION = False


# ------------------------------------------------------------------------------------- box ops


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)


def box_iou_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, M]`` of boxes ``a [N, 4]`` and ``b [M, 4]`` (pure torch)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp_min(1e-12)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, M]``: ``torchvision.ops.box_iou`` when present, else :func:`box_iou_torch`."""
    if HAVE_TORCHVISION:
        return _tvops.box_iou(a.float(), b.float())
    return box_iou_torch(a.float(), b.float())


def aligned_iou(a: torch.Tensor, b: torch.Tensor, giou: bool = False) -> torch.Tensor:
    """IoU (or generalised IoU, Rezatofighi et al. 2019) of matching rows ``a[i]``, ``b[i]``."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = (box_area(a) + box_area(b) - inter).clamp_min(1e-9)
    iou = inter / union
    if not giou:
        return iou
    elt = torch.minimum(a[..., :2], b[..., :2])
    erb = torch.maximum(a[..., 2:], b[..., 2:])
    ewh = (erb - elt).clamp_min(0)
    enclose = (ewh[..., 0] * ewh[..., 1]).clamp_min(1e-9)
    return iou - (enclose - union) / enclose


def nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (pure torch): indices kept, by decreasing score. A box is
    dropped when its IoU with a kept higher-scoring box is above ``iou_threshold``."""
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    if order.numel() == 0:
        return order
    iou = box_iou_torch(boxes.float(), boxes.float())
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.nms`` when present, else :func:`nms_torch` (same contract)."""
    if HAVE_TORCHVISION:
        return _tvops.nms(boxes.float(), scores.float(), float(iou_threshold))
    return nms_torch(boxes, scores, iou_threshold)


def batched_nms(boxes, scores, labels, iou_threshold: float) -> torch.Tensor:
    """Class-wise NMS (boxes of different labels never suppress each other), by the offset trick."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() + 1.0)
    return nms(boxes + offset, scores, iou_threshold)


# ------------------------------------------------------------------------------ distributions


def integral(logits: torch.Tensor) -> torch.Tensor:
    """The expectation ``Σ_i softmax(logits)_i · i`` over the last dimension (GFL's Integral): the
    distance, in bins, that a distribution over ``0..reg_max`` stands for."""
    bins = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return (logits.softmax(-1) * bins).sum(-1)


def distance2bbox(points: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Boxes from points ``[..., 2]`` and distances ``[..., 4]`` (left, top, right, bottom)."""
    return torch.stack([points[..., 0] - dist[..., 0], points[..., 1] - dist[..., 1],
                        points[..., 0] + dist[..., 2], points[..., 1] + dist[..., 3]], -1)


def bbox2distance(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Distances (left, top, right, bottom) from points to the edges of boxes."""
    return torch.stack([points[..., 0] - boxes[..., 0], points[..., 1] - boxes[..., 1],
                        boxes[..., 2] - points[..., 0], boxes[..., 3] - points[..., 1]], -1)


# ------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """How the rows of a detector's output map to the image: ``points [P, 2]`` (x, y centres in
    pixels), ``strides [P]``, ``lo``/``hi [P]`` (the range of max edge distance a point of that level
    is assigned), ``sizes`` (``(h, w)`` per level), ``num_classes``, ``reg_max``."""

    points: torch.Tensor
    strides: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    sizes: list
    num_classes: int
    reg_max: int

    def split(self, out: torch.Tensor):
        """``(cls_logits [B, P, C], box_logits [B, P, 4, reg_max+1])`` of a detector output."""
        C = self.num_classes
        return out[..., :C], out[..., C:].reshape(*out.shape[:-1], 4, self.reg_max + 1)

    def decode(self, out: torch.Tensor):
        """``(scores [B, P, C], boxes [B, P, 4])``: sigmoid class scores and decoded boxes."""
        cls, reg = self.split(out)
        dist = integral(reg.float()) * self.strides[None, :, None]
        return cls.float().sigmoid(), distance2bbox(self.points[None], dist)


def level_size(n: int, stride: int) -> int:
    """Size of a feature map after the stride-2 convs (k=3, p=1) that reach ``stride``."""
    for _ in range(int(round(math.log2(stride)))):
        n = (n + 1) // 2
    return n


def det_layout(h: int, w: int, strides, num_classes: int, reg_max: int, range_factor: float,
               device=None) -> Layout:
    """The :class:`Layout` of an ``h × w`` input. Level ``l`` (stride ``s_l``) is assigned objects
    whose largest edge distance from the point lies in ``(range_factor·s_{l−1}, range_factor·s_l]``
    (the first level from 0, the last to infinity), as FCOS assigns levels by regression range."""
    pts, st, lo, hi, sizes = [], [], [], [], []
    edges = [0.0] + [range_factor * s for s in strides[:-1]] + [float("inf")]
    for i, s in enumerate(strides):
        lh, lw = level_size(h, s), level_size(w, s)
        yy, xx = torch.meshgrid(torch.arange(lh, dtype=torch.float32), torch.arange(lw, dtype=torch.float32),
                                indexing="ij")
        p = torch.stack([(xx.reshape(-1) + 0.5) * s, (yy.reshape(-1) + 0.5) * s], -1)
        pts.append(p)
        st.append(torch.full((p.shape[0],), float(s)))
        lo.append(torch.full((p.shape[0],), edges[i]))
        hi.append(torch.full((p.shape[0],), edges[i + 1]))
        sizes.append((lh, lw))
    cat = lambda xs: torch.cat(xs).to(device) if device is not None else torch.cat(xs)  # noqa: E731
    return Layout(cat(pts), cat(st), cat(lo), cat(hi), sizes, int(num_classes), int(reg_max))


def layout_of(model: nn.Module, x: torch.Tensor) -> Layout:
    """The layout of ``model`` (a detector with ``layout(h, w, device)``) for the batch ``x``."""
    fn = getattr(model, "layout", None)
    if fn is None:
        raise ValueError(f"{type(model).__name__} is not a kdlab detector (it has no layout(h, w)); use a "
                         f"detection model such as gfl_det")
    return fn(int(x.shape[-2]), int(x.shape[-1]), x.device)


# ----------------------------------------------------------------------------------- detector


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Scale(nn.Module):
    """One learnable scalar (GFL's per-level scale of the box logits)."""

    def __init__(self, v: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(v)))

    def forward(self, x):
        return x * self.scale


class GFLDetector(nn.Module):
    """See the module doc. ``width``: base channels ``w`` of the backbone; ``fpn_channels``: FPN
    and head channels; ``head_convs``: conv layers per head branch; ``reg_max``: the largest bin of
    the edge distributions; ``range_factor``: level assignment ranges (:func:`det_layout`)."""

    strides = (8, 16, 32)
    stage_names = ["p3", "p4", "p5"]
    classifier_name = "gfl_cls"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 16, fpn_channels: int = 32,
                 head_convs: int = 2, reg_max: int = 6, range_factor: float = 3.0):
        super().__init__()
        w = scaled(1, check_width(width))
        if fpn_channels < 1 or head_convs < 0 or reg_max < 1 or range_factor <= 0:
            raise ValueError("gfl_det: fpn_channels >= 1, head_convs >= 0, reg_max >= 1 and range_factor > 0 "
                             f"are needed, got {fpn_channels}, {head_convs}, {reg_max}, {range_factor}")
        self.num_classes, self.reg_max, self.range_factor = int(num_classes), int(reg_max), float(range_factor)
        chans = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.stem = _cbr(in_channels, w)
        stages, c = [], w
        for co in chans:
            stages.append(nn.Sequential(_cbr(c, co, 2), _cbr(co, co)))
            c = co
        self.c1, self.c2, self.c3, self.c4, self.c5 = stages
        F_ = int(fpn_channels)
        self.lat3, self.lat4, self.lat5 = (nn.Conv2d(ci, F_, 1) for ci in chans[2:])
        self.p3, self.p4, self.p5 = (nn.Conv2d(F_, F_, 3, 1, 1) for _ in range(3))
        groups = math.gcd(F_, 8) if F_ >= 8 else 1

        def branch():
            layers = []
            for _ in range(int(head_convs)):
                layers += [nn.Conv2d(F_, F_, 3, 1, 1, bias=False), nn.GroupNorm(groups, F_), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_convs, self.reg_convs = branch(), branch()
        self.gfl_cls = nn.Conv2d(F_, self.num_classes, 3, 1, 1)
        self.gfl_reg = nn.Conv2d(F_, 4 * (self.reg_max + 1), 3, 1, 1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.feature_dim = F_
        nn.init.normal_(self.gfl_cls.weight, std=0.01)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        nn.init.normal_(self.gfl_reg.weight, std=0.01)
        nn.init.zeros_(self.gfl_reg.bias)

    def fpn(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.c3(self.c2(self.c1(self.stem(x))))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        m5 = self.lat5(c5)
        m4 = self.lat4(c4) + F.interpolate(m5, size=c4.shape[-2:], mode="nearest")
        m3 = self.lat3(c3) + F.interpolate(m4, size=c3.shape[-2:], mode="nearest")
        return [self.p3(m3), self.p4(m4), self.p5(m5)]

    def head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        outs = []
        for f, sc in zip(feats, self.scales):
            cls = self.gfl_cls(self.cls_convs(f))
            reg = sc(self.gfl_reg(self.reg_convs(f)))
            outs.append(torch.cat([cls, reg], 1).flatten(2).transpose(1, 2))
        return torch.cat(outs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fpn(x))

    def layout(self, h: int, w: int, device=None) -> Layout:
        return det_layout(h, w, self.strides, self.num_classes, self.reg_max, self.range_factor, device)


@register_model("gfl_det", "one-stage anchor-free detector: 5-stage CNN, FPN-lite (p3..p5), GFL head "
                           "(quality focal loss, distribution focal loss); output [B, P, C+4(reg_max+1)]")
def gfl_det(num_classes: int = 10, in_channels: int = 1, width: float = 16, fpn_channels: int = 32,
            head_convs: int = 2, reg_max: int = 6, range_factor: float = 3.0) -> GFLDetector:
    return GFLDetector(num_classes, in_channels, width, fpn_channels, head_convs, reg_max, range_factor)
