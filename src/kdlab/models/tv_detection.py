"""torchvision's one-stage detectors (FCOS, RetinaNet) as kdlab detectors (the ``vision`` extra).

``tv_fcos`` and ``tv_retinanet`` (registered) build ``torchvision.models.detection.FCOS`` /
``RetinaNet`` from scratch (no weights are ever loaded: the backbone is built here, randomly
initialised) and wrap it in :class:`TVDetector`, a plain tensor-in, tensor-out module like
``gfl_det``, so the one Trainer, the teacher cache, checkpoints and resume treat it as any kdlab
detector:

* ``forward(x)`` runs torchvision's ``backbone`` (body + ``backbone.fpn``) and ``head`` on the
  batch tensor and returns ONE tensor ``[B, P, C + 4]`` (RetinaNet: class logits, box deltas;
  ``P`` = points × anchors of every level) or ``[B, P, C + 5]`` (FCOS: + centerness logit). The
  model's ``transform`` (resize to 800 px, ImageNet normalisation, padding) is never called: kdlab's
  loaders already normalise the images and give them at ``data.image_size``, so a 64×64 canvas is
  not upscaled. Image sides must be multiples of 32 (the P5 stride; torchvision's transform would
  pad to that).
* every FPN output level passes through an identity module named ``p3``, ``p4``, ``p5`` (``p6``,
  ``p7`` with ``levels: 5``), so the FPN maps are tapped by forward hooks under the same names as
  ``gfl_det``'s: ``det_fitnets`` and ``fgd`` work unchanged, between two torchvision detectors or a
  torchvision detector and ``gfl_det`` (same strides 8/16/32).
* :meth:`TVDetector.layout` gives a :class:`TVLayout` (the anchors of an ``h × w`` input); it
  computes torchvision's own training losses from the output and kdlab's targets
  (:meth:`TVLayout.tv_loss`, the ``tv_det`` loss term) and runs torchvision's own
  ``postprocess_detections`` (score threshold, top-k per level, class-wise NMS; boxes / scores /
  labels) for evaluation (:meth:`TVLayout.detections`).

Targets: kdlab's ``[B, M, 5]`` rows ``(cls, x1, y1, x2, y2)`` (``cls = −1`` pads) become
torchvision's list of ``{"boxes": [k, 4] float, "labels": [k] int64}``
(:func:`to_torchvision_targets`). FCOS and RetinaNet use sigmoid class heads whose loss puts the
target 1 at column ``labels`` directly (torchvision's ``compute_loss``: ``gt_classes_target[fg,
labels[matched]] = 1``; background is "no positive column", not a class index), so the labels are
NOT shifted: ``num_classes`` = the data's class count, class ``k`` is column ``k``. (Faster R-CNN's
softmax head reserves 0 for background; it is not wrapped here.)

Backbones (``backbone``): ``small`` — five stride-2 stages of conv-BN-ReLU (widths ``w, w, 2w,
4w, 8w``; C3..C5 at strides 8/16/32), for CPU-sized work; ``resnet18`` / ``resnet34`` /
``resnet50`` — torchvision's ResNet with ``weights=None`` and trainable BatchNorm (torchvision's
``resnet_fpn_backbone`` freezes BN, which makes no sense from scratch), its first conv rebuilt for
``in_channels`` (1 for the MNIST canvas). The FPN is torchvision's ``FeaturePyramidNetwork`` on
C3..C5 (``levels: 3``, the default, P3–P5: a 64×64 image has a 2×2 P5 already) or with
``LastLevelP6P7`` (``levels: 5``, the papers' P3–P7). The heads' GroupNorm uses
``gcd(fpn_channels, 32)`` groups (torchvision's 32 at its widths; narrower FPNs would not divide).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from ._registry import check_width, register_model, scaled
from .detection import level_size

LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)


def _tv():
    try:
        import torchvision  # noqa: F401
        from torchvision.models import detection
    except ImportError:
        raise ImportError("torchvision detectors (tv_fcos, tv_retinanet) need torchvision: "
                          "pip install 'kdlab[vision]'") from None
    return detection


def to_torchvision_targets(y: torch.Tensor, label_offset: int = 0) -> list[dict]:
    """kdlab targets ``[B, M, 5]`` (rows ``cls, x1, y1, x2, y2``; ``cls < 0`` pads) -> torchvision's
    list of per-image ``{"boxes": float [k, 4] (x1, y1, x2, y2, pixels), "labels": int64 [k]}``,
    padding rows dropped, order kept. ``label_offset`` is added to every label (0 for FCOS and
    RetinaNet, whose sigmoid heads reserve no background column; 1 for a softmax head with
    background 0)."""
    if y.dim() != 3 or y.shape[-1] != 5:
        raise ValueError(f"detection targets must be [B, M, 5] (cls, x1, y1, x2, y2), got {tuple(y.shape)}")
    out = []
    for t in y:
        keep = t[:, 0] >= 0
        out.append({"boxes": t[keep, 1:5].float(), "labels": t[keep, 0].round().long() + int(label_offset)})
    return out


class TVLayout:
    """The anchors of an ``h × w`` input for a :class:`TVDetector` and the torchvision model that
    scores and decodes its output (module doc). ``anchors [P, 4]`` (pixels, P = Σ points × A),
    ``per_level``: anchors per level, ``num_classes``, ``kind`` (``fcos`` / ``retinanet``)."""

    def __init__(self, net, kind: str, anchors: torch.Tensor, per_level: list, image_hw, num_classes: int):
        self.net, self.kind = net, kind
        self.anchors, self.per_level = anchors, list(per_level)
        self.image_hw = (int(image_hw[0]), int(image_hw[1]))
        self.num_classes = int(num_classes)

    def split(self, out):
        raise ValueError(f"this loss term needs a GFL-style head (per-edge box distributions); the torchvision "
                         f"{self.kind} detector has none: train it with term tv_det and distil it with fgd or "
                         f"det_fitnets (ld, det_kd and gfl are not available for torchvision detectors)")

    def head_outputs(self, out: torch.Tensor) -> dict:
        """torchvision's head-output dict (``cls_logits [B, P, C]``, ``bbox_regression [B, P, 4]``,
        FCOS also ``bbox_ctrness [B, P, 1]``) from the wrapper's single tensor."""
        C = self.num_classes
        width = C + (5 if self.kind == "fcos" else 4)
        if out.dim() != 3 or out.shape[1] != self.anchors.shape[0] or out.shape[2] != width:
            raise ValueError(f"{self.kind} output {tuple(out.shape)} does not fit the layout "
                             f"[B, {self.anchors.shape[0]}, {width}] of a {self.image_hw[0]}x{self.image_hw[1]} input")
        d = {"cls_logits": out[..., :C], "bbox_regression": out[..., C:C + 4]}
        if self.kind == "fcos":
            d["bbox_ctrness"] = out[..., C + 4:C + 5]
        return d

    def tv_loss(self, out: torch.Tensor, targets: list[dict]) -> dict:
        """torchvision's own training losses (``compute_loss``) of the output for ``targets``
        (:func:`to_torchvision_targets`): FCOS ``classification`` (sigmoid focal), ``bbox_regression``
        (GIoU), ``bbox_ctrness`` (BCE), each per foreground point; RetinaNet ``classification``
        (sigmoid focal) and ``bbox_regression`` (L1 on the box deltas), per foreground anchor."""
        ho = self.head_outputs(out.float())
        anchors = [self.anchors] * out.shape[0]
        if len(targets) != out.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {out.shape[0]} images")
        if self.kind == "fcos":
            return self.net.compute_loss(targets, ho, anchors, self.per_level)
        return self.net.compute_loss(targets, ho, anchors)

    @torch.no_grad()
    def detections(self, out: torch.Tensor) -> list:
        """Per image ``(boxes [d, 4], scores [d], labels [d])`` from torchvision's own
        ``postprocess_detections`` (the model's ``score_thresh``, ``topk_candidates`` per level,
        class-wise NMS at ``nms_thresh``, at most ``detections_per_img``), boxes clipped to the image."""
        ho = self.head_outputs(out.float())
        split = {k: list(v.split(self.per_level, dim=1)) for k, v in ho.items()}
        anchors = [list(self.anchors.split(self.per_level))] * out.shape[0]
        dets = self.net.postprocess_detections(split, anchors, [self.image_hw] * out.shape[0])
        return [(d["boxes"], d["scores"], d["labels"]) for d in dets]


class TVDetector(nn.Module):
    """A torchvision FCOS / RetinaNet (``self.net``) as a kdlab detector (module doc)."""

    classifier_name = "net.head.classification_head.cls_logits"

    def __init__(self, net: nn.Module, kind: str, num_classes: int, levels: int, fpn_channels: int):
        super().__init__()
        self.net = net
        self.tv_kind = kind
        self.num_classes = int(num_classes)
        self.stage_names = LEVEL_NAMES[:levels]
        self.strides = STRIDES[:levels]
        for n in self.stage_names:  # the FPN outputs pass through these: hooks tap them by name
            setattr(self, n, nn.Identity())
        self.feature_dim = int(fpn_channels)
        self._anchor_cache: dict = {}

    def _check_size(self, h: int, w: int) -> None:
        if h % 32 or w % 32:
            raise ValueError(f"{self.tv_kind} (torchvision) needs image sides that are multiples of 32 (the P5 "
                             f"stride), got {h}x{w}; set data.image_size to e.g. [64, 64]")

    def fpn(self, x: torch.Tensor) -> list:
        """The FPN maps (P3 first), each through its identity tap."""
        self._check_size(int(x.shape[-2]), int(x.shape[-1]))
        feats = self.net.backbone(x)
        if len(feats) != len(self.stage_names):
            raise ValueError(f"the backbone gave {len(feats)} FPN levels, the detector expects {len(self.stage_names)}")
        return [getattr(self, n)(f) for n, f in zip(self.stage_names, feats.values())]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ho = self.net.head(self.fpn(x))
        parts = [ho["cls_logits"], ho["bbox_regression"]]
        if self.tv_kind == "fcos":
            parts.append(ho["bbox_ctrness"])
        return torch.cat(parts, -1)

    def layout(self, h: int, w: int, device=None) -> TVLayout:
        """The :class:`TVLayout` of an ``h × w`` input (anchors from the model's own
        ``anchor_generator``; level sizes as the stride-2 convs give them; cached per size and device)."""
        from torchvision.models.detection.image_list import ImageList

        self._check_size(int(h), int(w))
        key = (int(h), int(w), str(device))
        if key not in self._anchor_cache:
            sizes = [(level_size(h, s), level_size(w, s)) for s in self.strides]
            dev = device if device is not None else torch.device("cpu")
            images = ImageList(torch.empty(1, 1, h, w, device=dev), [(int(h), int(w))])
            maps = [torch.empty(1, 1, a, b, device=dev) for a, b in sizes]
            anchors = self.net.anchor_generator(images, maps)[0]
            A = self.net.anchor_generator.num_anchors_per_location()[0]
            self._anchor_cache[key] = (anchors, [a * b * A for a, b in sizes])
        anchors, per_level = self._anchor_cache[key]
        return TVLayout(self.net, self.tv_kind, anchors, per_level, (h, w), self.num_classes)


# ------------------------------------------------------------------------------------- build


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _FPNBackbone(nn.Module):
    """``body`` (returns C3..C5 as ``p3``..``p5``) then torchvision's ``FeaturePyramidNetwork``
    (``fpn``); ``out_channels`` as torchvision's detectors require (BackboneWithFPN's layout, without
    its forced extra max-pool level)."""

    def __init__(self, body: nn.Module, in_channels_list: list, out_channels: int, levels: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

        self.body = body
        extra = LastLevelP6P7(out_channels, out_channels) if levels == 5 else None
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=extra)
        self.out_channels = int(out_channels)

    def forward(self, x):
        return self.fpn(self.body(x))


def _backbone(backbone: str, in_channels: int, width: float, fpn_channels: int, levels: int) -> _FPNBackbone:
    from torchvision.models._utils import IntermediateLayerGetter

    returns = {"c3": "p3", "c4": "p4", "c5": "p5"}
    if backbone == "small":
        w = scaled(1, check_width(width))
        chans = [w, w, 2 * w, 4 * w, 8 * w]
        stages, c = OrderedDict(), in_channels
        for name, co in zip(("stem", "c2", "c3", "c4", "c5"), chans):
            stages[name] = nn.Sequential(_cbr(c, co, 2), _cbr(co, co)) if name != "stem" else _cbr(c, co, 2)
            c = co
        body = IntermediateLayerGetter(nn.Sequential(stages), returns)
        return _FPNBackbone(body, chans[2:], fpn_channels, levels)
    if backbone in ("resnet18", "resnet34", "resnet50"):
        import torchvision

        net = getattr(torchvision.models, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        mult = 4 if backbone == "resnet50" else 1
        body = IntermediateLayerGetter(net, {"layer2": "p3", "layer3": "p4", "layer4": "p5"})
        return _FPNBackbone(body, [128 * mult, 256 * mult, 512 * mult], fpn_channels, levels)
    raise ValueError(f"backbone must be small, resnet18, resnet34 or resnet50, not {backbone!r}")


def _check(name: str, fpn_channels: int, levels: int) -> None:
    if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f"{name}: fpn_channels must be an integer >= 1, got {fpn_channels!r}")
    if levels not in (3, 5):
        raise ValueError(f"{name}: levels must be 3 (P3-P5) or 5 (P3-P7, with P6/P7 blocks), got {levels!r}")


def _norm(fpn_channels: int):
    return partial(nn.GroupNorm, math.gcd(int(fpn_channels), 32))


@register_model("tv_fcos", "torchvision FCOS from scratch (vision extra): small/resnet backbone, torchvision FPN "
                           "(p3..p5), FCOS head; output [B, P, C+5]; train with term tv_det")
def tv_fcos(num_classes: int = 10, in_channels: int = 1, backbone: str = "small", width: float = 16,
            fpn_channels: int = 64, levels: int = 3, head_convs: int = 4, center_sampling_radius: float = 1.5,
            score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
            topk_candidates: int = 1000) -> TVDetector:
    """FCOS (Tian et al., ICCV 2019) as torchvision builds it, one anchor point per location (anchor
    size = the level's stride, which sets FCOS's scale ranges ``(4s, 8s]``). ``score_thresh`` 0.05
    (torchvision's default 0.2 is for display; mAP is read over all scores)."""
    det = _tv()
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead

    _check("tv_fcos", fpn_channels, levels)
    if isinstance(head_convs, bool) or not isinstance(head_convs, int) or head_convs < 0:
        raise ValueError(f"tv_fcos: head_convs must be an integer >= 0, got {head_convs!r}")
    body = _backbone(backbone, in_channels, width, fpn_channels, levels)
    anchors = AnchorGenerator(tuple((s,) for s in STRIDES[:levels]), ((1.0,),) * levels)
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=0)  # its sub-heads rebuilt: GroupNorm(32) fixed
    norm = _norm(fpn_channels)
    head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, head_convs, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=norm)
    net = det.FCOS(body, num_classes, image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels,
                   anchor_generator=anchors, head=head, center_sampling_radius=center_sampling_radius,
                   score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                   topk_candidates=topk_candidates)
    return TVDetector(net, "fcos", num_classes, levels, fpn_channels)


@register_model("tv_retinanet", "torchvision RetinaNet from scratch (vision extra): small/resnet backbone, "
                                "torchvision FPN (p3..p5), RetinaNet head (9 anchors); output [B, P*9, C+4]; "
                                "train with term tv_det")
def tv_retinanet(num_classes: int = 10, in_channels: int = 1, backbone: str = "small", width: float = 16,
                 fpn_channels: int = 64, levels: int = 3, anchor_scale: float = 4.0, fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.4, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, topk_candidates: int = 1000) -> TVDetector:
    """RetinaNet (Lin et al., ICCV 2017) as torchvision builds it: 3 scales (2^0, 2^(1/3), 2^(2/3))
    × 3 aspect ratios (0.5, 1, 2) per location, base size ``anchor_scale`` × stride (the paper's 4:
    32 px at P3; 2 suits the 12-28 px canvas digits), IoU matcher (``fg_iou_thresh`` /
    ``bg_iou_thresh``, low-quality matches allowed), GroupNorm in the head (as torchvision's v2)."""
    det = _tv()
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead

    _check("tv_retinanet", fpn_channels, levels)
    if not anchor_scale > 0:
        raise ValueError(f"tv_retinanet: anchor_scale must be > 0, got {anchor_scale!r}")
    body = _backbone(backbone, in_channels, width, fpn_channels, levels)
    sizes = tuple(tuple(int(anchor_scale * s * 2 ** (k / 3)) for k in range(3)) for s in STRIDES[:levels])
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    A = anchors.num_anchors_per_location()[0]
    head = RetinaNetHead(fpn_channels, A, num_classes, norm_layer=_norm(fpn_channels))
    net = det.RetinaNet(body, num_classes, image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels,
                        anchor_generator=anchors, head=head, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
                        score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                        topk_candidates=topk_candidates)
    return TVDetector(net, "retinanet", num_classes, levels, fpn_channels)


def is_tv_detector(model) -> bool:
    """Whether ``model`` is a :class:`TVDetector` (a torchvision detector wrapped here)."""
    return isinstance(model, TVDetector)
