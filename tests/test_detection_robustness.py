"""Detection robustness: the corruption suite on 1-channel 64x64 canvases, mPC / rPC / mCE worked out
by hand, and hand-made detectors whose mAP under corruption is known without running COCOeval in
the test (a memorising oracle: 1 everywhere; a clean-only oracle: 1 clean, 0 corrupted; an empty
detector: 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.data.corruptions import CORRUPTIONS, STANDARD_CORRUPTIONS, corrupt
from kdlab.data.mnist_canvas import BoxSet
from kdlab.data.splits import DatasetInfo
from kdlab.evaluate.detection_robustness import (corruption_errors, detection_robustness_metrics,
                                                 evaluate_detection_robustness, mean_performance)
from kdlab.models.detection import det_layout

torch.set_num_threads(1)


# --------------------------------------------------------------------------- corruptions on canvases

def test_every_corruption_takes_a_grey_64x64_canvas():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=g) * 0.5 + 0.25
    assert len(STANDARD_CORRUPTIONS) == 15
    for c in CORRUPTIONS:
        for s in (1, 5):
            y = corrupt(x, c, s, seed=3)
            assert y.shape == (2, 1, 64, 64) and y.dtype == x.dtype, c
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, c
            assert not torch.equal(y, x), f"{c} s{s} left the canvas unchanged"
            assert torch.equal(y, corrupt(x, c, s, seed=3)), f"{c} is not deterministic per seed"


def test_grey_canvas_values_of_the_published_constants():
    # CIFAR-10-C constants (make_cifar_c.py): contrast c = 0.75, brightness + 0.05, gaussian sigma 0.04 at s1
    x = torch.full((1, 1, 64, 64), 0.2)
    x[..., 32:] = 0.6  # mean 0.4
    y = corrupt(x, "contrast", 1)
    assert torch.allclose(y[..., :32], torch.full_like(y[..., :32], 0.4 - 0.2 * 0.75), atol=1e-6)
    assert torch.allclose(y[..., 32:], torch.full_like(y[..., 32:], 0.4 + 0.2 * 0.75), atol=1e-6)
    assert torch.allclose(corrupt(x, "brightness", 1), x + 0.05, atol=1e-6)
    flat = torch.full((1, 1, 64, 64), 0.5)
    noise = corrupt(flat, "gaussian_noise", 1) - flat
    assert abs(float(noise.std()) - 0.04) < 0.002 and abs(float(noise.mean())) < 0.002


# --------------------------------------------------------------------------- the metrics by hand

def test_mpc_rpc_mce_by_hand():
    clean = {"a": {"map": 0.5, "map50": 0.8}, "ref": {"map": 0.6, "map50": 0.9}}
    a = {"gaussian_noise": {1: 0.4, 2: 0.2}, "contrast": {1: 0.3, 2: 0.1}, "speckle_noise": {1: 0.45, 2: 0.35}}
    r = {"gaussian_noise": {1: 0.5, 2: 0.5}, "contrast": {1: 0.5, 2: 0.5}, "speckle_noise": {1: 0.5, 2: 0.5}}
    a50 = {c: {s: 0.8 for s in (1, 2)} for c in a}
    r50 = {c: {s: 0.6 for s in (1, 2)} for c in r}
    met = detection_robustness_metrics(clean, {"a": {"map": a, "map50": a50}, "ref": {"map": r, "map50": r50}}, "ref")
    # mPC over the two standard corruptions: (0.4 + 0.2 + 0.3 + 0.1) / 4 = 0.25; speckle is an extra
    assert met["a"]["mPC"] == pytest.approx(0.25)
    assert met["a"]["rPC"] == pytest.approx(0.25 / 0.5)
    # CE: gaussian (0.6 + 0.8) / (0.5 + 0.5) = 1.4, contrast (0.7 + 0.9) / 1.0 = 1.6 -> mCE 1.5
    assert met["a"]["CE"]["gaussian_noise"] == pytest.approx(1.4)
    assert met["a"]["CE"]["contrast"] == pytest.approx(1.6)
    assert met["a"]["mCE"] == pytest.approx(1.5)
    assert met["a"]["mPC_extra"] == pytest.approx(0.4)
    assert met["a"]["mCE_extra"] == pytest.approx((0.55 + 0.65) / 1.0)
    assert met["a"]["mPC50"] == pytest.approx(0.8) and met["a"]["rPC50"] == pytest.approx(1.0)
    assert met["ref"]["mCE"] == pytest.approx(1.0) and met["ref"]["rPC"] == pytest.approx(0.5 / 0.6)
    assert mean_performance(a, ["contrast"]) == pytest.approx(0.2)
    assert corruption_errors({"c": {1: 1.0}}, {"c": {1: 1.0}})["c"] != corruption_errors({"c": {1: 1.0}}, {"c": {1: 1.0}})["c"]  # 0/0 is NaN


# --------------------------------------------------------------------------- hand-made detectors

INFO = DatasetInfo(name="toy-canvas", num_classes=10, in_channels=1, image_size=(64, 64), mean=(0.5,), std=(0.25,),
                   classes=tuple(str(i) for i in range(10)))
BOXES = [[(3, 10.0, 12.0, 30.0, 40.0)],
         [(1, 5.0, 5.0, 21.0, 25.0), (7, 36.0, 30.0, 60.0, 58.0)],
         [(0, 20.0, 2.0, 44.0, 20.0)]]


def toy_set() -> BoxSet:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(len(BOXES), 1, 64, 64, generator=g) * 0.6 + 0.2
    y = torch.full((len(BOXES), 2, 5), -1.0)
    y[..., 1:] = 0
    for i, boxes in enumerate(BOXES):
        for k, b in enumerate(boxes):
            y[i, k] = torch.tensor(b)
    return BoxSet(x, y)


class HandDetector(nn.Module):
    """Outputs the ground-truth boxes exactly, at score σ(10), from a per-pixel layout (stride 1,
    reg_max 64: each box from the point at its centre, each edge distance split over two bins).
    ``mode``: ``memorise`` (ignores the image: the i-th image seen in a pass is BOXES[i]),
    ``clean`` (boxes only for an image equal to the clean one), ``empty`` (no detection)."""

    def __init__(self, mode: str, clean_x=None):
        super().__init__()
        self.mode, self.clean_x, self.pos = mode, clean_x, 0
        self.lay = det_layout(64, 64, [1], 10, 64, 1e9)

    def layout(self, h, w, device=None):
        return self.lay

    def forward(self, x):
        B = x.shape[0]
        P = self.lay.points.shape[0]
        out = torch.full((B, P, 10 + 4 * 65), -10.0)
        for b in range(B):
            i = self.pos % len(BOXES)
            self.pos += 1
            if self.mode == "empty":
                continue
            if self.mode == "clean" and not torch.allclose(x[b], (self.clean_x[i] - 0.5) / 0.25, atol=1e-6):
                continue
            for cls, x1, y1, x2, y2 in BOXES[i]:
                px, py = math.floor((x1 + x2) / 2), math.floor((y1 + y2) / 2)
                p = py * 64 + px
                cx, cy = px + 0.5, py + 0.5
                out[b, p, cls] = 10.0
                for e, d in enumerate((cx - x1, cy - y1, x2 - cx, y2 - cy)):
                    lo, f = int(math.floor(d)), d - math.floor(d)
                    logits = torch.full((65,), -1e4)
                    logits[lo] = math.log(1 - f) if f < 1 else -1e4
                    if f > 0:
                        logits[lo + 1] = math.log(f)
                    out[b, p, 10 + e * 65: 10 + (e + 1) * 65] = logits
        return out


def test_known_detectors_give_the_metrics_worked_out_by_hand():
    ts = toy_set()
    models = {"empty": HandDetector("empty"), "oracle": HandDetector("memorise"),
              "clean_only": HandDetector("clean", ts.x)}
    res = evaluate_detection_robustness(models, ts, INFO, ["gaussian_noise", "contrast", "speckle_noise"], [1, 3],
                                        seed=0, batch_size=2, reference="empty")
    met = res.metrics
    # boxes are unchanged by the corruptions: the image-blind oracle keeps mAP 1 everywhere
    assert res.clean["oracle"]["map"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for per in res.perf["oracle"]["map"].values() for v in per.values())
    assert met["oracle"]["mPC"] == pytest.approx(1.0) and met["oracle"]["rPC"] == pytest.approx(1.0)
    # every corruption changes every image: the clean-only oracle finds nothing under corruption
    assert res.clean["clean_only"]["map50"] == pytest.approx(1.0)
    assert met["clean_only"]["mPC"] == 0.0 and met["clean_only"]["rPC"] == 0.0
    assert met["empty"]["mPC"] == 0.0 and res.clean["empty"]["map"] == 0.0
    # mCE against the empty detector (error 1 everywhere): oracle 0 / 2 = 0, clean-only 2 / 2 = 1
    assert met["oracle"]["mCE"] == pytest.approx(0.0)
    assert met["clean_only"]["mCE"] == pytest.approx(1.0)
    assert met["empty"]["mCE"] == pytest.approx(1.0)
    assert met["oracle"]["n_standard"] == 2 and met["oracle"]["n_extra"] == 1
    assert len(res.rows()) == 3 * (1 + 3 * 2)


def test_detectors_see_the_corrupted_normalised_images(tmp_path):
    ts = toy_set()
    seen = []

    class Spy(HandDetector):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    res = evaluate_detection_robustness({"spy": Spy("empty")}, ts, INFO, ["contrast"], [2], seed=5, batch_size=2,
                                        out_dir=tmp_path)
    assert len(seen) == 4  # clean: 2 batches, contrast s2: 2 batches
    assert torch.allclose(torch.cat(seen[:2]), (ts.x - 0.5) / 0.25)
    m = ts.x.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(torch.cat(seen[2:]), ((ts.x - m) * 0.5 + m - 0.5) / 0.25, atol=1e-6)
    for f in ("robustness.csv", "robustness.json", "robustness.md", "robustness_heatmap.png"):
        assert (tmp_path / f).is_file()
    assert res.summary()["models"]["spy"]["map"]["contrast"]["2"] == 0.0
    assert not list(tmp_path.glob("*.tmp*"))


def test_coco_map_equals_the_full_cocoeval_summary():
    from kdlab.evaluate.detection import coco_metrics
    from kdlab.evaluate.detection_robustness import coco_map

    rng = np.random.default_rng(0)
    gts, dets = [], []
    for i in range(12):
        k = int(rng.integers(1, 4))
        xy = rng.uniform(0, 40, (k, 2))
        wh = rng.uniform(6, 24, (k, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, 4, k)
        gts.append((boxes, labels))
        d = int(rng.integers(0, 6))
        src = boxes[rng.integers(0, k, d)] + rng.normal(0, 3, (d, 4))
        dets.append((src, rng.uniform(0.05, 1, d), np.where(rng.uniform(size=d) < 0.7, labels[0], rng.integers(0, 4, d))))
    full = coco_metrics(gts, dets, 4, image_sizes=[(64, 64)] * 12)
    fast = coco_map(gts, dets, 4, image_sizes=[(64, 64)] * 12)
    assert 0 < full["map"] < 1 and 0 < full["map50"] < 1
    assert fast["map"] == pytest.approx(full["map"], abs=1e-12)
    assert fast["map50"] == pytest.approx(full["map50"], abs=1e-12)
    assert coco_map(gts, [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))] * 12, 4)["map"] == 0.0
