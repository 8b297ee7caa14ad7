"""Where a detector loses mAP@.5 on the canvas scenes (docs/detection.md, "The teacher"):

    OMP_NUM_THREADS=1 PYTHONPATH=src python examples/detection_teacher_errors.py runs/teacher-s3a/best.pt [test|val]

Prints COCO mAP / mAP@.5 with the default post-processing; the same detections scored
class-agnostically (every box and detection relabelled to one class: what is lost to the digit's
class); AP by digit size (longer box side, px; detections matching a digit of another size bin at
IoU >= 0.5 are left out of that bin); per ground-truth digit, whether its best-scoring detection
(score >= 0.3) at IoU >= 0.5 has the right class, a wrong one, or there is none; and, on the
validation scenes only, three other post-processing settings (NMS IoU 0.5 / 0.7, score 0.01 with
300 candidates); and the mean square of the detector's FPN maps (p3, p4, p5) over the first 200
training scenes (the scale FGD's summed feature loss grows with). The scenes are those of
`detection/teacher` (the study's test scenes).
"""

import sys

import numpy as np
import torch

from kdlab.evaluate.detection import coco_metrics, predict
from kdlab.models.detection import box_iou
from kdlab.tasks import get_task
from kdlab.tasks.detection import load_detector, make_detection_loaders
from kdlab.train.build import load_splits
from kdlab.train.runtime import Runtime


def main(ck, split="test"):
    torch.set_num_threads(1)
    r = get_task("detection").load_recipe("detection/teacher")
    splits = load_splits(r)
    _, va, te = make_detection_loaders(r, splits, Runtime("cpu", "none", None), 0)
    loader = te if split == "test" else va
    model = load_detector(ck)
    hw = splits.info.hw

    def m(g, d, k=10):
        x = coco_metrics(g, d, k, image_sizes=[hw] * len(g))
        return f"mAP {x['map']:.4f} mAP@.5 {x['map50']:.4f}"

    gts, dets = predict(model, loader)
    print(f"{split} scenes, default post-processing: {m(gts, dets)}")
    g0 = [(b, np.zeros_like(c)) for b, c in gts]
    d0 = [(b, s, np.zeros_like(c)) for b, s, c in dets]
    print(f"class-agnostic (same detections): {m(g0, d0, 1)}")
    for lo, hi in [(0, 16), (16, 20), (20, 24), (24, 99)]:
        gs, ds = [], []
        for (b, c), (db, s, dc) in zip(gts, dets):
            side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
            keep = (side >= lo) & (side < hi)
            gs.append((b[keep], c[keep]))
            kd = np.ones(len(db), bool)
            if len(db) and len(b):
                iou = box_iou(torch.tensor(db), torch.tensor(b)).numpy()
                kd = ~((iou.max(1) >= 0.5) & ~keep[iou.argmax(1)])
            ds.append((db[kd], s[kd], dc[kd]))
        print(f"digits {lo}-{hi} px ({sum(len(x[0]) for x in gs)}): {m(gs, ds)}")
    n = right = wrong = none = dup = 0
    for (b, c), (db, s, dc) in zip(gts, dets):
        hi = s >= 0.3
        db, s, dc = db[hi], s[hi], dc[hi]
        iou = box_iou(torch.tensor(b), torch.tensor(db)).numpy() if len(db) and len(b) else np.zeros((len(b), 0))
        for i in range(len(b)):
            n += 1
            match = np.nonzero(iou[i] >= 0.5)[0]
            if len(match) == 0:
                none += 1
                continue
            right += int(dc[match][np.argmax(s[match])] == c[i])
            wrong += int(dc[match][np.argmax(s[match])] != c[i])
            dup += int((dc[match] == c[i]).sum() > 1)
    print(f"{n} digits: best detection (score >= 0.3, IoU >= 0.5) of the right class {right}, of a wrong "
          f"class {wrong}, none {none}; more than one of the right class {dup}")
    feats = {}
    hooks = [getattr(model, n).register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o))
             for n in ("p3", "p4", "p5")]
    mean, std = splits.info.mean[0], splits.info.std[0]
    with torch.no_grad():
        model((splits.train.x[:200] - mean) / std)
    for h in hooks:
        h.remove()
    print("FPN mean square (200 training scenes): " + ", ".join(f"{n} {float((f ** 2).mean()):.3f}"
                                                                 for n, f in feats.items()))
    if split == "val":
        for post in [dict(iou_thr=0.5), dict(iou_thr=0.7), dict(score_thr=0.01, pre_nms=300)]:
            g, d = predict(model, loader, **post)
            print(f"post-processing {post}: {m(g, d)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
