"""Detection metrics from the standard implementation: ``pycocotools``' COCOeval.

:func:`coco_metrics` scores detections against ground truth given as plain per-image lists (boxes
``[x1, y1, x2, y2]`` in pixels, integer labels), building both COCO objects in memory:

* ``map``: AP averaged over IoU 0.50:0.05:0.95 and classes (COCO's headline AP);
* ``map50``: AP at IoU 0.5; ``map_s`` / ``map_m`` / ``map_l``: AP of small (< 32² px), medium and
  large (> 96² px) objects — NaN when the ground truth has no object of that size (COCOeval's −1);
* ``precision``: COCOeval's precision array ``[T, R, K, A, M]`` (PR curves) when asked.

:func:`predict` runs a detector over a loader and post-processes its output: sigmoid scores above
``score_thr``, the ``pre_nms`` best (point, class) pairs, class-wise NMS at ``iou_thr``, at most
``max_det`` detections per image (NMS from :mod:`kdlab.models.detection`: torchvision's when
installed, a tested pure-torch one otherwise).
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch

from kdlab.models.detection import batched_nms, layout_of


def _require_coco():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("detection metrics need pycocotools: pip install pycocotools "
                          "(or pip install 'kdlab[detection]')") from None
    return COCO, COCOeval


def targets_to_lists(y: torch.Tensor):
    """Padded targets ``[B, M, 5]`` -> per image ``(boxes [k, 4], labels [k])`` numpy arrays."""
    out = []
    for t in y.detach().cpu():
        keep = t[:, 0] >= 0
        out.append((t[keep, 1:5].numpy().astype(np.float64), t[keep, 0].numpy().astype(np.int64)))
    return out


def coco_metrics(gts, dets, num_classes: int, *, image_sizes=None, with_precision: bool = False) -> dict:
    """COCO box metrics (module doc). ``gts``: per image ``(boxes [k, 4], labels [k])``; ``dets``:
    per image ``(boxes [d, 4], scores [d], labels [d])``, boxes ``[x1, y1, x2, y2]`` in pixels."""
    COCO, COCOeval = _require_coco()
    images, anns, results = [], [], []
    aid = 1
    for i, (boxes, labels) in enumerate(gts):
        hw = image_sizes[i] if image_sizes is not None else (1, 1)
        images.append({"id": i + 1, "height": int(hw[0]), "width": int(hw[1])})
        for b, c in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(labels).reshape(-1)):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": aid, "image_id": i + 1, "category_id": int(c) + 1, "bbox": [float(b[0]), float(b[1]), w, h],
                         "area": w * h, "iscrowd": 0})
            aid += 1
    for i, (boxes, scores, labels) in enumerate(dets):
        for b, s, c in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(scores).reshape(-1),
                           np.asarray(labels).reshape(-1)):
            results.append({"image_id": i + 1, "category_id": int(c) + 1,
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                            "score": float(s)})
    nan = float("nan")
    out = {"map": 0.0, "map50": 0.0, "map_s": nan, "map_m": nan, "map_l": nan, "n": len(gts)}
    if not anns:
        out.update(map=nan, map50=nan)
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k + 1, "name": str(k)} for k in range(int(num_classes))]}
        gt.createIndex()
        if not results:  # nothing detected: AP 0 where there is ground truth
            sizes = {"map_s": (0, 32 ** 2), "map_m": (32 ** 2, 96 ** 2), "map_l": (96 ** 2, math.inf)}
            areas = [a["area"] for a in anns]
            for k, (lo, hi) in sizes.items():
                out[k] = 0.0 if any(lo <= a < hi for a in areas) else nan
            if with_precision:  # COCOeval's layout: 10 IoUs, 101 recalls, K classes, 4 areas, 3 maxDets
                present = {a["category_id"] - 1 for a in anns}
                prec = np.zeros((10, 101, int(num_classes), 4, 3))
                prec[:, :, [k for k in range(int(num_classes)) if k not in present]] = -1.0
                out["precision"] = prec
            return out
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [float(v) if v >= 0 else nan for v in ev.stats]
    out.update(map=s[0], map50=s[1], map_s=s[3], map_m=s[4], map_l=s[5])
    if with_precision:
        out["precision"] = ev.eval["precision"]
    return out


@torch.no_grad()
def postprocess(out: torch.Tensor, layout, *, score_thr: float = 0.05, pre_nms: int = 100,
                iou_thr: float = 0.6, max_det: int = 100):
    """Per image ``(boxes [d, 4], scores [d], labels [d])`` tensors from a detector output (a layout
    with its own ``detections``, a torchvision detector's, post-processes by itself)."""
    if hasattr(layout, "detections"):
        return layout.detections(out)
    scores, boxes = layout.decode(out)
    dets = []
    C = scores.shape[-1]
    for sc, bx in zip(scores, boxes):
        flat = sc.reshape(-1)
        keep = torch.nonzero(flat > score_thr).squeeze(1)
        if keep.numel() > pre_nms:
            keep = keep[flat[keep].topk(pre_nms).indices]
        s = flat[keep]
        pts, labels = keep // C, keep % C
        b = bx[pts]
        k = batched_nms(b, s, labels, iou_thr)[:max_det]
        dets.append((b[k], s[k], labels[k]))
    return dets


@torch.no_grad()
def predict(model, loader, *, view=None, **post) -> tuple[list, list]:
    """``(gts, dets)`` of ``model`` over ``loader.epoch(0)``: ground truth and detections as numpy
    lists for :func:`coco_metrics`."""
    was = model.training
    model.eval()
    gts, dets = [], []
    try:
        for x, y, _ in loader.epoch(0):
            xs = view(x) if view is not None else x
            out = model(xs).float()
            lay = layout_of(model, xs)
            for b, s, l in postprocess(out, lay, **post):
                dets.append((b.cpu().numpy(), s.cpu().numpy(), l.cpu().numpy()))
            gts += targets_to_lists(y)
    finally:
        model.train(was)
    return gts, dets


def evaluate_detector(model, loader, num_classes: int, *, image_hw=None, with_precision: bool = False,
                      **post) -> dict:
    """COCO metrics of ``model`` on ``loader`` (:func:`predict` then :func:`coco_metrics`)."""
    gts, dets = predict(model, loader, **post)
    sizes = [image_hw] * len(gts) if image_hw is not None else None
    return coco_metrics(gts, dets, num_classes, image_sizes=sizes, with_precision=with_precision)
