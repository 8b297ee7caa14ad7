"""torchvision's FCOS / RetinaNet through the detection task (``tv_fcos``, ``tv_retinanet``, term
``tv_det``): the target conversion by hand, kdlab's path against torchvision's own forward (losses and
detections), training / resume / mAP through ``kdlab distill``, FGD and FitNets on FPN maps tapped by
hooks between two torchvision detectors, and the terms that are refused.

Everything but the target conversion needs torchvision (the ``vision`` extra: ``make test-vision``)
and is skipped without it."""

import json
import math

import pytest
import torch

from kdlab.models.tv_detection import to_torchvision_targets

pytest.importorskip("pycocotools")


def test_targets_to_torchvision_by_hand():
    # image 0: a padding row between two boxes; image 1: padding only
    y = torch.tensor([[[3, 10, 12, 30, 40], [-1, 0, 0, 0, 0], [7, 40, 2, 60, 20]],
                      [[-1, 0, 0, 0, 0], [-1, 5, 5, 9, 9], [-1, 0, 0, 0, 0]]], dtype=torch.float32)
    t = to_torchvision_targets(y)
    assert len(t) == 2
    assert t[0]["boxes"].dtype == torch.float32 and t[0]["labels"].dtype == torch.int64
    assert t[0]["boxes"].tolist() == [[10.0, 12.0, 30.0, 40.0], [40.0, 2.0, 60.0, 20.0]]
    assert t[0]["labels"].tolist() == [3, 7]  # FCOS / RetinaNet: class k is column k, no shift
    assert tuple(t[1]["boxes"].shape) == (0, 4) and tuple(t[1]["labels"].shape) == (0,)
    assert to_torchvision_targets(y, label_offset=1)[0]["labels"].tolist() == [4, 8]  # a softmax head's
    with pytest.raises(ValueError, match=r"\[B, M, 5\]"):
        to_torchvision_targets(torch.zeros(2, 5))


# --------------------------------------------------------------------------------- torchvision

TINY = {"tv_fcos": {"width": 2, "fpn_channels": 8, "head_convs": 1},
        "tv_retinanet": {"width": 2, "fpn_channels": 8, "anchor_scale": 2.0, "score_thresh": 0.001}}
Y = torch.tensor([[[3, 10, 12, 30, 40], [7, 40, 2, 60, 20]], [[0, 5, 5, 25, 25], [-1, 0, 0, 0, 0]]],
                 dtype=torch.float32)


def _model(name, **kw):
    pytest.importorskip("torchvision")
    from kdlab.models import create_model

    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=1, **{**TINY[name], **kw})


@pytest.mark.parametrize("name", ["tv_fcos", "tv_retinanet"])
def test_kdlab_path_equals_torchvision_own_forward(name):
    """The wrapper's single tensor + TVLayout give exactly what torchvision's own FCOS / RetinaNet
    forward gives: its training losses (train mode, targets) and its detections (eval mode). The
    transform is set to leave a 64x64 image as it is (min_size = max_size = 64, mean 0, std 1)."""
    torch.set_num_threads(1)
    m = _model(name)
    m.net.transform.min_size, m.net.transform.max_size = (64,), 64
    x = torch.randn(2, 1, 64, 64)
    lay = m.layout(64, 64)
    m.train()
    ours = lay.tv_loss(m(x), to_torchvision_targets(Y))
    theirs = m.net(list(x), to_torchvision_targets(Y))
    assert set(ours) == set(theirs) == ({"classification", "bbox_regression", "bbox_ctrness"} if name == "tv_fcos"
                                        else {"classification", "bbox_regression"})
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), k
    m.eval()
    with torch.no_grad():
        ours = lay.detections(m(x))
        theirs = m.net(list(x))
    for (b, s, lab), d in zip(ours, theirs):
        assert b.shape[0] > 0
        assert torch.allclose(b, d["boxes"], atol=1e-4) and torch.allclose(s, d["scores"], atol=1e-6)
        assert torch.equal(lab, d["labels"])


def test_class_k_is_column_k_in_torchvision_loss():
    """One box of class 3: the focal loss pushes up column 3 (negative gradient) at the box's
    positive points and no other column anywhere, so kdlab's labels need no shift."""
    m = _model("tv_fcos")
    lay = m.layout(64, 64)
    out = torch.zeros(1, lay.anchors.shape[0], 10 + 5, requires_grad=True)
    y = torch.tensor([[[3, 16, 16, 40, 40]]], dtype=torch.float32)
    lay.tv_loss(out, to_torchvision_targets(y))["classification"].backward()
    g = out.grad[0, :, :10]
    assert (g[:, 3] < 0).sum() > 0
    others = torch.cat([g[:, :3], g[:, 4:]], 1)
    assert (others < 0).sum() == 0
    # the positive points lie inside the box, near its centre (28, 28): FCOS's centre sampling
    pos = torch.nonzero(g[:, 3] < 0).squeeze(1)
    c = (lay.anchors[pos, :2] + lay.anchors[pos, 2:]) / 2
    assert ((c > 16) & (c < 40)).all()


def test_fpn_taps_layout_and_refusals():
    from kdlab.distill.losses.tv_detection import check_detector_terms
    from kdlab.models import create_model
    from kdlab.models.taps import Taps

    m = _model("tv_retinanet")
    x = torch.randn(3, 1, 64, 96)
    with Taps(m, m.stage_names) as taps:
        out = m(x)
        shapes = [tuple(taps[n].shape) for n in ("p3", "p4", "p5")]
    # 64x96 at strides 8, 16, 32 with 9 anchors per location; FPN 8 channels
    assert shapes == [(3, 8, 8, 12), (3, 8, 4, 6), (3, 8, 2, 3)]
    n = 9 * (8 * 12 + 4 * 6 + 2 * 3)
    assert tuple(out.shape) == (3, n, 10 + 4) and m.layout(64, 96).anchors.shape == (n, 4)
    with pytest.raises(ValueError, match="multiples of 32"):
        m(torch.randn(1, 1, 48, 64))
    gfl = create_model("gfl_det", num_classes=10, in_channels=1, width=2, fpn_channels=8, head_convs=1)
    for term in ("gfl", "ld", "det_kd"):
        with pytest.raises(ValueError, match=f"loss term {term} is not available with a torchvision detector"):
            check_detector_terms(m, None, ["tv_det", term])
    with pytest.raises(ValueError, match="as teacher"):
        check_detector_terms(gfl, m, ["gfl", "ld"])
    with pytest.raises(ValueError, match="tv_det trains a torchvision detector"):
        check_detector_terms(gfl, None, ["tv_det"])
    check_detector_terms(m, gfl, ["tv_det", "fgd", "det_fitnets"])  # feature terms: fine either way
    # ... and they run on the maps of a gfl_det teacher and a torchvision student (same strides)
    from kdlab.distill.losses import BatchRecord
    from kdlab.distill.losses.detection import FGD, DetFitNets

    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad(), Taps(gfl.eval(), ["p3", "p4", "p5"], detach=True) as tt:
        gfl(x)
        t_feats = {n: tt[n] for n in ("p3", "p4", "p5")}
    with Taps(m.train(), ["p3", "p4", "p5"]) as st:
        out = m(x)
        s_feats = {n: st[n] for n in ("p3", "p4", "p5")}
    rec = BatchRecord(x=x, y=Y, s_logits=out, s_feats=s_feats, t_feats=t_feats)
    for term in (FGD(), DetFitNets()):
        term.setup(rec)
        v = term(rec)
        assert math.isfinite(float(v.detach())) and float(v.detach()) > 0


RECIPE = """
name: tv-{model}-tiny
task: detection
data:
  name: mnist-canvas
  image_size: [64, 64]
  kwargs: {{objects: [1, 3], scale: [12, 28], scenes: [16, 8, 8]}}
student:
  model: {model}
  kwargs: {kwargs}
train: {{epochs: 2, batch_size: 8, eval_batch_size: 8, optimizer: adamw, lr: 0.003, patience: null}}
loss:
  - term: tv_det
"""


def _recipe(tmp_path, model, name="r.yaml", kwargs=None, extra=""):
    p = tmp_path / name
    p.write_text(RECIPE.format(model=model, kwargs=json.dumps(kwargs or TINY[model])) + extra)
    return p


def test_tv_fcos_trains_resumes_and_reports_map_through_kdlab_distill(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from kdlab.cli.main import main
    from kdlab.train.recipe import load_recipe
    from kdlab.tasks import get_task

    torch.set_num_threads(1)
    rpath = _recipe(tmp_path, "tv_fcos")
    assert main(["distill", str(rpath), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    res_a = json.loads((tmp_path / "a" / "result.json").read_text())
    for k in ("val_map", "val_map50", "test_map", "test_map50", "test_map_s"):
        assert math.isfinite(res_a[k]) and 0.0 <= res_a[k] <= 1.0, k
    assert res_a["epochs_run"] == 2
    # interrupted after epoch 1, resumed by the CLI: the same weights and numbers
    part = get_task("detection").train(load_recipe(rpath), tmp_path / "b", progress=False, stop_after=1)
    assert part == {"interrupted": True, "epoch": 1}
    assert main(["distill", str(rpath), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["models"]["student"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["models"]["student"]
    assert a.keys() == b.keys() and any(k.startswith("net.backbone.fpn") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    res_b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert (res_b["test_map"], res_b["test_map50"]) == (res_a["test_map"], res_a["test_map50"])
    # a term that needs a GFL head: one line, exit 2, no run folder
    capsys.readouterr()
    bad = _recipe(tmp_path, "tv_fcos", "bad.yaml",
                  extra="  - {term: ld, weight: 0.25}\nteacher: {model: tv_fcos, checkpoint: nowhere.pt}\n")
    assert main(["distill", str(bad), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error: loss term ld is not available") and "fgd" in err[0]
    assert not (tmp_path / "c").exists()


def test_fgd_and_fitnets_between_two_torchvision_detectors(tmp_path):
    """A tiny FCOS teacher trained for one epoch, then a RetinaNet student with tv_det + fgd +
    det_fitnets built by the task: the teacher's and student's FPN maps are tapped at p3..p5 with the
    expected shapes, every term is finite, and one step's gradient reaches the student's backbone."""
    pytest.importorskip("torchvision")
    from kdlab.cli.main import main
    from kdlab.train.recipe import load_recipe
    from kdlab.tasks.detection import build_detection_run

    torch.set_num_threads(1)
    tpath = _recipe(tmp_path, "tv_fcos", "t.yaml", kwargs={"width": 2, "fpn_channels": 16, "head_convs": 1})
    assert main(["distill", str(tpath), "--out", str(tmp_path / "t"), "--quiet", "--set", "train.epochs=1"]) == 0
    ck = tmp_path / "t" / "best.pt"
    spath = _recipe(tmp_path, "tv_retinanet", "s.yaml", extra=(
        "  - {term: fgd, weight: 1.0}\n  - {term: det_fitnets, weight: 1.0}\n"
        f"teacher: {{model: tv_fcos, checkpoint: {ck}}}\n"))
    objective, tr, *_ = build_detection_run(load_recipe(spath))
    batch = next(iter(tr.epoch(0)))
    rec = objective.record(batch, 0, 0)
    B = batch[0].shape[0]
    assert [tuple(rec.t_feats[n].shape) for n in ("p3", "p4", "p5")] == [(B, 16, 8, 8), (B, 16, 4, 4), (B, 16, 2, 2)]
    assert [tuple(rec.s_feats[n].shape) for n in ("p3", "p4", "p5")] == [(B, 8, 8, 8), (B, 8, 4, 4), (B, 8, 2, 2)]
    total, parts = objective.losses(rec)
    assert set(parts) == {"tv_det", "fgd", "det_fitnets"}
    assert all(math.isfinite(float(v.detach())) for v in parts.values()) and float(parts["det_fitnets"].detach()) > 0
    total.backward()
    g = objective.student.net.backbone.body["c3"][0][0].weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    # FGD and FitNets vanish when the student's maps are the teacher's (same detector, same input)
    from kdlab.distill.losses import BatchRecord
    from kdlab.distill.losses.detection import FGD, DetFitNets

    same = BatchRecord(x=rec.x, y=rec.y, s_logits=rec.s_logits, s_feats=dict(rec.t_feats), t_feats=dict(rec.t_feats))
    for term in (FGD(), DetFitNets()):
        term.setup(same)
        assert float(term(same).detach()) == pytest.approx(0.0, abs=1e-9)


def test_tv_retinanet_on_a_coco_folder_with_rgb_images(tmp_path):
    """``data.name: coco`` (a user's images folder + COCO JSON, 3-channel, 32 px images resized to
    64x64): a RetinaNet with in_channels 3 trains one epoch through `kdlab distill` and reports mAP."""
    pytest.importorskip("torchvision")
    PIL = pytest.importorskip("PIL.Image")
    from kdlab.cli.main import main

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    (tmp_path / "images").mkdir()
    images, anns = [], []
    for i in range(12):
        a = torch.zeros(32, 32, 3)
        x0, y0 = (int(v) for v in torch.randint(0, 14, (2,), generator=g))
        a[y0:y0 + 10, x0:x0 + 10] = torch.tensor([1.0, 0.5, 0.0])
        PIL.fromarray((a.numpy() * 255).astype("uint8")).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 7, "bbox": [x0, y0, 10, 10], "area": 100,
                     "iscrowd": 0})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 7, "name": "square"}, {"id": 9, "name": "unused"}]}))
    rpath = tmp_path / "coco.yaml"
    rpath.write_text(f"""
name: coco-tv
task: detection
data:
  name: coco
  root: {tmp_path / "images"}
  image_size: [64, 64]
  val_fraction: 0.25
  kwargs: {{ann: {tmp_path / "ann.json"}, max_objects: 2, channels: 3}}
student:
  model: tv_retinanet
  kwargs: {{width: 2, fpn_channels: 8, anchor_scale: 2.0}}
train: {{epochs: 1, batch_size: 4, eval_batch_size: 8, optimizer: adamw, lr: 0.003, patience: null}}
loss:
  - term: tv_det
""")
    assert main(["distill", str(rpath), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert all(math.isfinite(res[k]) and 0.0 <= res[k] <= 1.0 for k in ("val_map", "test_map", "test_map50"))
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ck["in_channels"] == 3 and ck["model"]["net.backbone.body.stem.0.weight"].shape[1] == 3
