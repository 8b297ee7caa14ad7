"""The ``coco`` data set (a user's images folder + COCO JSON) and `kdlab distill` on a detection
recipe: bad annotations are skipped with one counted line, training resumes with identical weights
and reports mAP."""

import json

import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("PIL")


def _write_folder(root, n=16, size=32, bad=False):
    """``n`` grey ``size``x``size`` PNGs, each with a bright square (category 7) and a bright
    horizontal bar (category 9) at places drawn from a fixed generator; returns the JSON path."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        a = torch.zeros(size, size)
        x0, y0 = (int(v) for v in torch.randint(0, size // 2 - 8, (2,), generator=g))
        a[y0:y0 + 8, x0:x0 + 8] = 1.0
        x1, y1 = (int(v) for v in torch.randint(size // 2, size - 12, (2,), generator=g))
        a[y1:y1 + 3, x1:x1 + 12] = 1.0
        Image.fromarray((a.numpy() * 255).astype("uint8")).save(img_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
        anns.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 7, "bbox": [x0, y0, 8, 8], "area": 64,
                     "iscrowd": 0})
        anns.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 9, "bbox": [x1, y1, 12, 3], "area": 36,
                     "iscrowd": 0})
    if bad:
        nid = 1000
        for extra in ({"image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4]},      # unknown category
                      {"image_id": 1, "category_id": 7, "bbox": [3, 3, 0, 5]},      # zero area
                      {"image_id": 2, "category_id": 7, "bbox": [40, 40, 5, 5]},    # wholly outside
                      {"image_id": 2, "category_id": 9, "bbox": [28, 2, 10, 4]}):   # partly outside: clipped
            nid += 1
            anns.append({"id": nid, "area": 1, "iscrowd": 0, **extra})
        images.append({"id": 999, "file_name": "missing.png", "width": size, "height": size})
    cats = [{"id": 7, "name": "square"}, {"id": 9, "name": "bar"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_coco_loader_reads_boxes_and_counts_bad_input(tmp_path, capsys):
    from kdlab.data import load_dataset

    ann = _write_folder(tmp_path, n=10, bad=True)
    s = load_dataset("coco", root=str(tmp_path / "images"), image_size=[64, 64],
                     ann=str(ann), max_objects=4, channels=1, val_fraction=0.2)
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("kdlab: coco:")]
    assert len(line) == 1, err
    for part in ("1 unknown category", "1 zero area", "1 outside", "1 clipped", "1 missing image"):
        assert part in line[0]
    assert s.info.num_classes == 2 and s.info.classes == ("square", "bar")
    assert len(s.train) + len(s.val) + len(s.test) == 10  # the missing image is not there
    # boxes are scaled with the image (32 -> 64: x2) and labels mapped 7 -> 0, 9 -> 1
    allsets = [s.train, s.val, s.test]
    for ds in allsets:
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (1, 64, 64)
            valid = y[y[:, 0] >= 0]
            assert set(valid[:, 0].tolist()) <= {0.0, 1.0}
            assert (valid[:, 3] <= 64).all() and (valid[:, 4] <= 64).all()
    first = [ds for ds in allsets if any(r["file"] == "0.png" for r in ds.records)][0]
    k = [r["file"] for r in first.records].index("0.png")
    _, y = first[k]
    sq = y[y[:, 0] == 0][0]
    assert (sq[3] - sq[1]).item() == 16 and (sq[4] - sq[2]).item() == 16  # 8 px square -> 16 px


def test_coco_refuses_garbage_with_one_line(tmp_path):
    from kdlab.data import load_dataset

    (tmp_path / "images").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_dataset("coco", root=str(tmp_path / "images"), ann=str(bad))
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        load_dataset("coco", root=str(tmp_path / "images"), ann=str(bad))
    # every box unusable (all images missing): nothing is trained on
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}],
                               "annotations": [], "categories": [{"id": 1}, {"id": 2}]}))
    with pytest.raises(ValueError, match="no usable box"):
        load_dataset("coco", root=str(tmp_path / "images"), ann=str(bad))


RECIPE = """
name: coco-tiny
task: detection
data:
  name: coco
  root: {root}
  image_size: [32, 32]
  val_fraction: 0.2
  kwargs: {{ann: {ann}, max_objects: 3, channels: 1}}
student:
  model: gfl_det
  kwargs: {{width: 2, fpn_channels: 8, head_convs: 1, reg_max: 4}}
train: {{epochs: 3, batch_size: 4, eval_batch_size: 8, optimizer: adamw, lr: 0.003, patience: null}}
loss:
  - term: gfl
"""


def test_kdlab_distill_on_a_coco_recipe_trains_resumes_and_reports_map(tmp_path, capsys):
    from kdlab.cli.main import main
    from kdlab.train.recipe import load_recipe
    from kdlab.tasks import get_task

    torch.set_num_threads(1)
    ann = _write_folder(tmp_path, n=16)
    rpath = tmp_path / "coco.yaml"
    rpath.write_text(RECIPE.format(root=tmp_path / "images", ann=ann))
    # an uninterrupted run through the CLI
    assert main(["distill", str(rpath), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    out = capsys.readouterr().out
    res_a = json.loads((tmp_path / "a" / "result.json").read_text())
    assert 0.0 <= res_a["test_map"] <= 1.0 and 0.0 <= res_a["test_map50"] <= 1.0
    assert res_a["epochs_run"] == 3 and '"test_map"' in out
    # the same recipe interrupted after epoch 1, then resumed by the CLI: identical weights
    task = get_task("detection")
    part = task.train(load_recipe(rpath), tmp_path / "b", progress=False, stop_after=1)
    assert part == {"interrupted": True, "epoch": 1}
    assert not (tmp_path / "b" / "result.json").exists()
    assert main(["distill", str(rpath), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["models"]["student"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["models"]["student"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res_b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert res_b["test_map"] == res_a["test_map"] and res_b["test_map50"] == res_a["test_map50"]


def test_detection_recipe_errors_are_one_line(tmp_path, capsys):
    from kdlab.cli.main import main

    ann = _write_folder(tmp_path, n=4)
    rpath = tmp_path / "coco.yaml"
    rpath.write_text(RECIPE.format(root=tmp_path / "nowhere", ann=ann))
    assert main(["distill", str(rpath), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error: coco: images folder") and "data.root" in err[0]
    assert not (tmp_path / "c").exists()
