"""The everyday commands on detection runs: `kdlab robustness --study` and on checkpoints (mAP under
corruption, mPC / rPC / mCE, paired Δ with Holm), `kdlab evaluate` (COCO mAP on the recipe's own
test scenes), `kdlab profile` (at the recipe's image size) and COCOeval's −1 shown as n/a.

One tiny study (2 seeds x 5 methods, 16 training scenes, 1 epoch, a 1-epoch teacher) is shared by
the tests of this file."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from kdlab.cli.main import main

torch.set_num_threads(1)
TINY = ["--set", "data.kwargs.scenes=[16,8,8]", "--set", "train.epochs=1"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    assert main(["distill", "detection/baseline", "--out", str(root / "teacher"), *TINY]) == 0
    assert main(["ablate", "detection/fgd_ld", "--seeds", "0", "1", "--out", str(root / "study"), *TINY,
                 "--set", f"teacher.checkpoint={root / 'teacher' / 'best.pt'}"]) == 0
    return root


def _json(p):
    return json.loads(p.read_text())


def test_study_robustness_has_teacher_students_and_paired_tests(study, capsys):
    s = study / "study"
    assert main(["robustness", "--study", str(s), "--corruptions", "gaussian_noise", "contrast", "speckle_noise",
                 "--severities", "1", "3"]) == 0
    seeds = [_json(s / "report" / "robustness" / f"seed{k}" / "robustness.json") for k in (0, 1)]
    methods = ["baseline", "kd", "fgd", "ld", "fgd+ld"]
    for res in seeds:
        assert res["task"] == "detection" and res["reference"] == "baseline"
        assert set(res["models"]) == set(methods) | {"teacher"}
        for m, v in res["models"].items():
            # mPC recomputed from the long-form per corruption x severity values (the 2 standard corruptions)
            std = [v["map"][c][str(sev)] for c in ("gaussian_noise", "contrast") for sev in (1, 3)]
            assert v["mPC"] == pytest.approx(float(np.mean(std)))
            extra = [v["map"]["speckle_noise"][str(sev)] for sev in (1, 3)]
            assert v["mPC_extra"] == pytest.approx(float(np.mean(extra)))
            if v["clean_map"] > 0:
                assert v["rPC"] == pytest.approx(v["mPC"] / v["clean_map"])
        # mCE is relative to the same seed's baseline
        assert res["models"]["baseline"]["mCE"] == pytest.approx(1.0)
    # the teacher is one run: the same numbers in every seed's file
    assert seeds[0]["models"]["teacher"] == seeds[1]["models"]["teacher"]
    # the clean mAP of each student is its run's own test mAP (scored by the trainer, another code path)
    for k, res in enumerate(seeds):
        for m in methods:
            run = _json(s / m / f"seed{k}" / "result.json")
            assert res["models"][m]["clean_map"] == pytest.approx(run["test_map"], abs=1e-9)
    table = _json(s / "report" / "table.json")
    for row in table["methods"]:
        per = [res["models"][row["method"]]["mPC"] for res in seeds]
        assert row["mPC"] == pytest.approx(float(np.mean(per)))
        assert row["n_robust_seeds"] == 2
    md = (s / "report" / "robustness.md").read_text()
    assert "teacher (1 run)" in md and "Holm p" in md and "Δ mPC" in md and "1 − mAP" in md
    assert "mPC %" in (s / "report" / "table.md").read_text()
    assert (s / "report" / "robustness_heatmap.png").is_file()
    # findings pick the measures up (paired tests with Holm, as for classification's mCA / mCE)
    assert main(["findings", str(s)]) == 0
    f = (s / "report" / "findings.md").read_text()
    assert "mPC" in f and "mCE" in f


def test_single_checkpoint_robustness_same_model_twice(study, tmp_path):
    ck = study / "study" / "fgd" / "seed0" / "best.pt"
    out = tmp_path / "rob"
    assert main(["robustness", str(ck), str(ck), "--names", "a", "b", "--corruptions", "contrast", "--severities", "2",
                 "--out", str(out)]) == 0
    res = _json(out / "robustness.json")
    assert res["task"] == "detection" and res["reference"] == "a"
    a, b = res["models"]["a"], res["models"]["b"]
    assert a["mPC"] == b["mPC"] and b["mCE"] == pytest.approx(1.0)
    run = _json(study / "study" / "fgd" / "seed0" / "result.json")
    assert a["clean_map"] == pytest.approx(run["test_map"], abs=1e-9)
    with open(out / "robustness.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["corruption"] for r in rows] == ["clean", "contrast"] * 2
    assert float(rows[1]["map"]) == pytest.approx(a["mPC"])


def test_evaluate_a_detection_checkpoint_gives_its_test_map(study, capsys):
    run = study / "study" / "kd" / "seed1"
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.pt")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = _json(run / "result.json")
    assert out["dataset"] == "mnist-canvas" and out["split"] == "test" and out["n"] == 8
    assert out["map"] == pytest.approx(res["test_map"], abs=1e-9)
    assert out["map50"] == pytest.approx(res["test_map50"], abs=1e-9)
    # 64x64 canvases hold only small objects: AP medium / large are undefined, not −1
    assert res["test_map_m"] == -1 and out["map_m"] == "n/a" and out["map_l"] == "n/a" and "n/a" in out["note"]
    assert main(["evaluate", str(run / "best.pt"), "--dataset", "digits"]) == 2
    assert "drop --dataset" in capsys.readouterr().err


def test_profile_uses_the_recipes_image_size(study, tmp_path):
    from kdlab.compress import input_shape_of
    from kdlab.core.checkpoint import load_checkpoint

    ck = load_checkpoint(study / "study" / "baseline" / "seed0" / "best.pt")
    assert input_shape_of(ck) == (1, 64, 64)
    assert input_shape_of({"in_channels": 1, "dataset": "mnist-identities",
                           "recipe": {"data": {"name": "mnist-identities", "image_size": None}}}) == (1, 28, 28)
    assert input_shape_of({"in_channels": 1, "recipe": {"data": {"name": "mnist-canvas",
                                                                  "image_size": [48, 80]}}}) == (1, 48, 80)
    assert input_shape_of({"in_channels": 3, "dataset": "cifar10"}) == (3, 32, 32)
    out = tmp_path / "prof"
    assert main(["profile", str(study / "study" / "baseline" / "seed0" / "best.pt"), "--out", str(out),
                 "--repeats", "2", "--warmup", "1", "--latency-batch", "2"]) == 0
    prof = _json(out / "profile.json")
    assert prof["input_shape"] == [1, 64, 64]


def test_undefined_ap_is_na_with_a_footnote(study):
    from kdlab.train.callbacks import format_row

    md = (study / "study" / "report" / "table.md").read_text()
    assert "n/a ¹" in md and "-100.00" not in md and "¹ n/a (AP medium, AP large)" in md
    line = format_row({"epoch": 1, "val_map": 0.25, "val_map_m": -1.0, "loss": -1.0}, 3,
                      undefined={"map_m": -1.0})
    assert "val_map_m n/a" in line and "val_map 0.25" in line and "loss -1" in line


def test_a_table_of_the_example_script_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "table.json").write_text('{"rows": [], "recipe": "detection/fgd_ld"}')
    assert main(["robustness", "--study", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error:") and "kdlab ablate detection/fgd_ld" in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["report", "table.json"]
