"""Tests of kdlab.evaluate.robustness and the `kdlab robustness` command.

Every metric is checked against numbers worked out by hand from Hendrycks & Dietterich's
definitions (errors E = 1 - accuracy; CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c};
relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^ref_{s,c} - E^ref_clean)).
"""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.data.splits import DatasetInfo, TensorSet
from kdlab.evaluate import robustness as R

# ------------------------------------------------------------------ hand-worked metrics
# errors of the reference model A and of model B on two corruptions x two severities
ERR_A = {"noise": {1: 0.20, 2: 0.40}, "blur": {1: 0.30, 2: 0.50}}
CLEAN_ERR_A = 0.10
ERR_B = {"noise": {1: 0.10, 2: 0.30}, "blur": {1: 0.30, 2: 0.60}}
CLEAN_ERR_B = 0.05


def _acc(err):
    return {c: {s: 1 - e for s, e in per.items()} for c, per in err.items()}


def test_corruption_error_by_hand():
    ce = R.corruption_errors(ERR_B, ERR_A)
    assert ce["noise"] == pytest.approx((0.10 + 0.30) / (0.20 + 0.40))  # 0.4/0.6 = 0.6667
    assert ce["blur"] == pytest.approx((0.30 + 0.60) / (0.30 + 0.50))   # 0.9/0.8 = 1.125
    assert R.mean_corruption_error(ERR_B, ERR_A) == pytest.approx((2 / 3 + 1.125) / 2)  # 0.8958
    assert R.mean_corruption_error(ERR_A, ERR_A) == pytest.approx(1.0)


def test_relative_corruption_error_by_hand():
    rce = R.relative_corruption_errors(ERR_B, CLEAN_ERR_B, ERR_A, CLEAN_ERR_A)
    # noise: ((0.10-0.05) + (0.30-0.05)) / ((0.20-0.10) + (0.40-0.10)) = 0.30 / 0.40
    assert rce["noise"] == pytest.approx(0.75)
    # blur: ((0.30-0.05) + (0.60-0.05)) / ((0.30-0.10) + (0.50-0.10)) = 0.80 / 0.60
    assert rce["blur"] == pytest.approx(4 / 3)
    assert R.relative_mean_corruption_error(ERR_B, CLEAN_ERR_B, ERR_A, CLEAN_ERR_A) == \
        pytest.approx((0.75 + 4 / 3) / 2)  # 1.0417


def test_mean_corruption_accuracy_by_hand():
    assert R.mean_corruption_accuracy(_acc(ERR_B)) == pytest.approx((0.9 + 0.7 + 0.7 + 0.4) / 4)
    assert R.mean_corruption_accuracy(_acc(ERR_A)) == pytest.approx((0.8 + 0.6 + 0.7 + 0.5) / 4)


def test_robustness_metrics_table():
    met = R.robustness_metrics({"A": 0.90, "B": 0.95}, {"A": _acc(ERR_A), "B": _acc(ERR_B)}, "A")
    a, b = met["A"], met["B"]
    assert a["mCE"] == pytest.approx(1.0) and a["rel_mCE"] == pytest.approx(1.0)
    assert b["clean_acc"] == 0.95
    assert b["mCA"] == pytest.approx(0.675)
    assert b["mCE"] == pytest.approx(0.8958333, abs=1e-6)
    assert b["rel_mCE"] == pytest.approx(1.0416667, abs=1e-6)
    assert b["acc_by_corruption"] == pytest.approx({"noise": 0.8, "blur": 0.55})
    assert b["CE"]["blur"] == pytest.approx(1.125)
    with pytest.raises(KeyError, match="reference"):
        R.robustness_metrics({"A": 0.9}, {"A": _acc(ERR_A)}, "baseline")


def test_zero_denominator_is_nan():
    perfect = {"noise": {1: 0.0}}
    assert math.isnan(R.corruption_errors({"noise": {1: 0.2}}, perfect)["noise"])
    # reference error equal to its clean error: relative CE undefined
    assert math.isnan(R.relative_corruption_errors({"noise": {1: 0.3}}, 0.1,
                                                   {"noise": {1: 0.2}}, 0.2)["noise"])


# ------------------------------------------------------------------ end to end
class Probe(nn.Module):
    """Predicts 1 if the normalised top-left pixel is > 0, else 0."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), (x[:, 0, 0, 0] > 0).float()], dim=1)


class Zero(nn.Module):
    def forward(self, x):
        return torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)


def _probe_data(ch=1, size=8):
    # 4 flat images of 0.4 (label 0) and 4 of 0.6 (label 1)
    v = torch.tensor([0.4, 0.6] * 4)
    x = v.reshape(8, 1, 1, 1).repeat(1, ch, size, size)
    y = torch.tensor([0, 1] * 4)
    info = DatasetInfo("probe", 2, ch, size, (0.5,) * ch, (0.25,) * ch, ("a", "b"))
    return TensorSet(x, y), info


def test_evaluate_robustness_end_to_end(tmp_path):
    tset, info = _probe_data()
    # Probe, normalised with mean 0.5 / std 0.25: clean 0.4 -> -0.4 (class 0), 0.6 -> 0.4 (1):
    #   clean acc 1. brightness 1 adds 0.05 (0.45, 0.65: still right) -> 1.0;
    #   brightness 5 adds 0.3 (0.7 -> class 1, wrong; 0.9 right) -> 0.5.
    #   contrast keeps a flat image -> 1.0 at both severities.
    # Zero predicts class 0: 0.5 everywhere.
    res = R.evaluate_robustness({"zero": Zero(), "probe": Probe()}, tset, info,
                                ["brightness", "contrast"], [1, 5], seed=0, batch_size=3,
                                out_dir=tmp_path)
    assert res.reference == "zero"  # default: the first model
    assert res.clean_acc == {"zero": 0.5, "probe": 1.0}
    assert res.acc["probe"] == {"brightness": {1: 1.0, 5: 0.5}, "contrast": {1: 1.0, 5: 1.0}}
    assert res.acc["zero"] == {"brightness": {1: 0.5, 5: 0.5}, "contrast": {1: 0.5, 5: 0.5}}
    met = res.metrics["probe"]
    # CE: brightness (0 + 0.5) / (0.5 + 0.5) = 0.5, contrast 0 / 1 = 0 -> mCE 0.25
    assert met["CE"] == {"brightness": 0.5, "contrast": 0.0} and met["mCE"] == 0.25
    assert met["mCA"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    # relative: the reference's errors never move from its clean error -> undefined
    assert math.isnan(met["rel_mCE"])
    assert res.column("mCA") == {"zero": 0.5, "probe": 0.875}

    rows = list(csv.DictReader(open(tmp_path / "robustness.csv")))
    assert list(rows[0]) == ["model", "corruption", "severity", "acc"]
    assert len(rows) == 2 * (1 + 2 * 2)
    assert {"model": "probe", "corruption": "brightness", "severity": "5",
            "acc": "0.500000"} in rows
    js = json.loads((tmp_path / "robustness.json").read_text())
    assert js["models"]["probe"]["mCE"] == 0.25 and js["models"]["probe"]["rel_mCE"] is None
    assert js["models"]["probe"]["acc"]["brightness"]["5"] == 0.5
    assert js["reference"] == "zero" and js["severities"] == [1, 5]
    md = (tmp_path / "robustness.md").read_text()
    assert "| probe | 100.00 | 87.50 | 25.0 | n/a |" in md
    assert (tmp_path / "robustness_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_size_does_not_change_results():
    tset, info = _probe_data()
    kw = dict(corruptions=["gaussian_noise", "fog"], severities=[3], seed=4)
    a = R.evaluate_robustness({"p": Probe()}, tset, info, batch_size=3, **kw)
    b = R.evaluate_robustness({"p": Probe()}, tset, info, batch_size=8, **kw)
    assert a.acc == b.acc


def test_evaluate_with_published_files(tmp_path):
    tset, info = _probe_data(ch=3, size=32)
    n = 8
    data = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
    clean = np.array([102, 153] * 4, dtype=np.uint8)        # 0.4 / 0.6
    data[:n] = clean[:, None, None, None]                     # severity 1: as clean -> 1.0
    data[n:2 * n] = 230                                       # severity 2: all bright -> 0.5
    np.save(tmp_path / "snow.npy", data)
    np.save(tmp_path / "labels.npy", np.tile(np.array([0, 1] * 4, dtype=np.uint8), 5))
    res = R.evaluate_robustness({"p": Probe()}, tset, info, ["snow"], [1, 2],
                                cifar_c_dir=tmp_path)
    assert res.acc["p"]["snow"] == {1: 1.0, 2: 0.5}
    assert res.source == "CIFAR-10-C files"
    # the first 6 test images use the first 6 corrupted images
    first6 = TensorSet(tset.x[:6], tset.y[:6])
    res = R.evaluate_robustness({"p": Probe()}, first6, info, ["snow"], [2], cifar_c_dir=tmp_path)
    assert res.acc["p"]["snow"] == {2: 0.5} and res.n_images == 6
    shuffled = TensorSet(tset.x, 1 - tset.y)
    with pytest.raises(ValueError, match="labels"):
        R.evaluate_robustness({"p": Probe()}, shuffled, info, ["snow"], [1], cifar_c_dir=tmp_path)


def test_evaluate_errors():
    tset, info = _probe_data()
    with pytest.raises(KeyError, match="reference"):
        R.evaluate_robustness({"p": Probe()}, tset, info, ["fog"], [1], reference="nope")
    with pytest.raises(ValueError, match="severity"):
        R.evaluate_robustness({"p": Probe()}, tset, info, ["fog"], [7])
    with pytest.raises(ValueError, match="channels"):
        R.evaluate_robustness({"p": Probe()}, tset, _probe_data(ch=3)[1], ["fog"], [1])


def test_heatmap_for_a_study_report(tmp_path):
    path = R.robustness_heatmap({"baseline": {"fog": 0.5, "snow": 0.6},
                                 "kd": {"fog": 0.55, "snow": 0.7}}, tmp_path / "h.png",
                                clean={"baseline": 0.9, "kd": 0.92}, title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ CLI
def test_default_names():
    from kdlab.experiments.robustness import default_names

    # the folder of best.pt, with more of the path where folders repeat
    assert default_names(["runs/s/baseline/seed0/best.pt", "runs/s/kd/seed0/best.pt"]) == [
        "baseline/seed0", "kd/seed0"]
    assert default_names(["a/base/best.pt", "a/kd/best.pt"]) == ["base", "kd"]
    assert default_names(["x/s0/best.pt", "y/s0/best.pt"]) == ["x/s0", "y/s0"]
    assert default_names(["m1.pt", "m2.pt"]) == ["m1", "m2"]


def test_command_module_registered():
    from kdlab.cli import main as cli
    from kdlab.cli import robustness

    assert robustness in cli.COMMANDS


def _parser():
    from kdlab.cli.robustness import register

    p = argparse.ArgumentParser(prog="kdlab")
    register(p.add_subparsers(dest="command"))
    return p


def test_cli_end_to_end(tmp_path, capsys):
    from kdlab.core.checkpoint import atomic_save, model_checkpoint
    from kdlab.models import create_model

    torch.manual_seed(0)
    paths = []
    for name in ("baseline", "kd"):
        m = create_model("cnn_tiny", num_classes=10, in_channels=1)
        paths.append(atomic_save(model_checkpoint(m, model_name="cnn_tiny", model_kwargs={},
                                                  num_classes=10, in_channels=1,
                                                  dataset="digits"),
                                 tmp_path / name / "best.pt"))
    out = tmp_path / "rob"
    args = _parser().parse_args(
        ["robustness", *map(str, paths), "--limit", "24", "--corruptions", "contrast,jpeg",
         "--severities", "1", "5", "--out", str(out), "--no-progress", "--batch-size", "10"])
    assert args.func(args) == 0
    js = json.loads((out / "robustness.json").read_text())
    assert js["reference"] == "baseline" and js["n_images"] == 24
    assert js["corruptions"] == ["contrast", "jpeg_compression"]
    assert js["models"]["baseline"]["mCE"] == pytest.approx(1.0)  # an untrained net errs
    assert len(list(csv.DictReader(open(out / "robustness.csv")))) == 2 * (1 + 2 * 2)
    assert (out / "robustness_heatmap.png").exists() and (out / "robustness.md").exists()
    assert "| baseline (ref) |" in capsys.readouterr().out

    bad = _parser().parse_args(["robustness", *map(str, paths), "--names", "one"])
    with pytest.raises(ValueError, match="--names"):
        bad.func(bad)
    bad = _parser().parse_args(["robustness", *map(str, paths), "--reference", "x",
                                "--limit", "4", "--no-progress"])
    with pytest.raises(ValueError, match="--reference"):
        bad.func(bad)
