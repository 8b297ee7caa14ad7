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


def _standard(err):
    """The hand tables under two of the 15 standard corruptions' names (mCE averages those)."""
    names = {"noise": "gaussian_noise", "blur": "defocus_blur"}
    return {names[c]: per for c, per in err.items()}


def test_robustness_metrics_table():
    met = R.robustness_metrics({"A": 0.90, "B": 0.95},
                               {"A": _acc(_standard(ERR_A)), "B": _acc(_standard(ERR_B))}, "A")
    a, b = met["A"], met["B"]
    assert a["mCE"] == pytest.approx(1.0) and a["rel_mCE"] == pytest.approx(1.0)
    assert b["clean_acc"] == 0.95
    assert b["mCA"] == pytest.approx(0.675)
    assert b["mCE"] == pytest.approx(0.8958333, abs=1e-6)
    assert b["rel_mCE"] == pytest.approx(1.0416667, abs=1e-6)
    assert b["acc_by_corruption"] == pytest.approx({"gaussian_noise": 0.8, "defocus_blur": 0.55})
    assert b["CE"]["defocus_blur"] == pytest.approx(1.125)
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


# ------------------------------------------------------------------ 15 standard vs 4 extra (issue 17)
def _table19():
    """A hand-made error table over all 19 corruptions, one severity each.

    Reference A: error 0.40 under every corruption. Model B: 0.20 under each standard one
    (CE = 0.5) and 0.80 under each extra one (CE = 2). Clean errors 0.10 (A) and 0.05 (B).
    """
    from kdlab.data.corruptions import EXTRA_CORRUPTIONS, STANDARD_CORRUPTIONS

    err_a = {c: {1: 0.40} for c in STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS}
    err_b = {**{c: {1: 0.20} for c in STANDARD_CORRUPTIONS},
             **{c: {1: 0.80} for c in EXTRA_CORRUPTIONS}}
    return err_a, err_b


def test_mce_averages_the_15_standard_corruptions():
    err_a, err_b = _table19()
    met = R.robustness_metrics({"A": 0.90, "B": 0.95}, {"A": _acc(err_a), "B": _acc(err_b)}, "A")
    b = met["B"]
    assert (b["n_standard"], b["n_extra"]) == (15, 4)
    # standard: CE = 0.2 / 0.4 = 0.5 each -> mCE 0.5; mCA = 0.8
    assert b["mCE"] == pytest.approx(0.5) and b["mCA"] == pytest.approx(0.8)
    # relCE = (0.20 - 0.05) / (0.40 - 0.10) = 0.5 on the standard ones
    assert b["rel_mCE"] == pytest.approx(0.5)
    # extras, reported apart: CE = 0.8 / 0.4 = 2; relCE = 0.75 / 0.3 = 2.5; accuracy 0.2
    assert b["mCE_extra"] == pytest.approx(2.0) and b["mCA_extra"] == pytest.approx(0.2)
    assert b["rel_mCE_extra"] == pytest.approx(2.5)
    # all 19 together (kdlab's old number): (15 * 0.5 + 4 * 2) / 19
    assert b["mCE_all"] == pytest.approx((15 * 0.5 + 4 * 2.0) / 19)  # 0.8158
    assert b["mCA_all"] == pytest.approx((15 * 0.8 + 4 * 0.2) / 19)


def test_extras_are_excluded_from_mce():
    err_a, err_b = _table19()
    from kdlab.data.corruptions import EXTRA_CORRUPTIONS

    # making the extras arbitrarily worse (or better) leaves mCE / mCA / rel. mCE unchanged
    for e in (0.0, 0.4, 1.0):
        worse = {**err_b, **{c: {1: e} for c in EXTRA_CORRUPTIONS}}
        b = R.robustness_metrics({"A": 0.9, "B": 0.95}, {"A": _acc(err_a), "B": _acc(worse)},
                                 "A")["B"]
        assert (b["mCE"], b["mCA"], b["rel_mCE"]) == pytest.approx((0.5, 0.8, 0.5))
        assert b["mCE_extra"] == pytest.approx(e / 0.4)
    # only extras evaluated: no standard corruption, so mCE is undefined (not the extras' mean)
    only = {c: {1: 0.8} for c in EXTRA_CORRUPTIONS}
    ref = {c: {1: 0.4} for c in EXTRA_CORRUPTIONS}
    b = R.robustness_metrics({"A": 0.9, "B": 0.9}, {"A": _acc(ref), "B": _acc(only)}, "A")["B"]
    assert math.isnan(b["mCE"]) and b["mCE_extra"] == pytest.approx(2.0)


def test_relative_mce_guard_skips_a_near_zero_reference_degradation():
    # reference A: clean error 0.10; under jpeg its error is 0.099 and 0.103 (mean degradation
    # +0.001, below the 0.01 threshold); under fog 0.30 and 0.50 (mean +0.30)
    ref = {"fog": {1: 0.30, 2: 0.50}, "jpeg_compression": {1: 0.099, 2: 0.103}}
    b_err = {"fog": {1: 0.20, 2: 0.30}, "jpeg_compression": {1: 0.20, 2: 0.30}}
    # unguarded, jpeg's relCE = ((0.2 - 0.05) + (0.3 - 0.05)) / 0.002 = 200 dominates the mean
    raw = R.relative_corruption_errors(b_err, 0.05, ref, 0.10)
    assert raw["jpeg_compression"] == pytest.approx(200.0)
    assert R.relative_mean_corruption_error(b_err, 0.05, ref, 0.10, min_degradation=None) == \
        pytest.approx((0.4 / 0.6 + 200.0) / 2)
    # guarded: jpeg is skipped; relCE(fog) = ((0.2 - 0.05) + (0.3 - 0.05)) / (0.2 + 0.4) = 2/3
    assert R.REL_MCE_MIN_DEGRADATION == 0.01
    assert R.relative_mce_skipped(ref, 0.10) == ["jpeg_compression"]
    assert R.relative_mean_corruption_error(b_err, 0.05, ref, 0.10) == pytest.approx(2 / 3)
    met = R.robustness_metrics({"A": 0.90, "B": 0.95}, {"A": _acc(ref), "B": _acc(b_err)}, "A")
    b = met["B"]
    assert b["rel_mCE"] == pytest.approx(2 / 3) and math.isfinite(b["rel_mCE"])
    assert b["rel_mCE_skipped"] == ["jpeg_compression"]
    assert b["ref_degradation"]["jpeg_compression"] == pytest.approx(0.001)
    assert b["rel_CE"]["jpeg_compression"] == pytest.approx(200.0)  # still reported
    assert met["A"]["rel_mCE"] == pytest.approx(1.0)
    # a negative degradation is skipped too; every corruption skipped -> NaN, not a crash
    assert R.relative_mce_skipped({"fog": {1: 0.05}}, 0.10) == ["fog"]
    assert math.isnan(R.relative_mean_corruption_error({"fog": {1: 0.2}}, 0.1,
                                                       {"fog": {1: 0.105}}, 0.1))


def test_markdown_footer_names_the_split_and_the_guard(tmp_path):
    tset, info = _probe_data()
    res = R.evaluate_robustness({"zero": Zero(), "probe": Probe()}, tset, info,
                                ["brightness", "saturate"], [5], seed=0)
    md = res.markdown()
    assert "| model | clean acc | mCA | mCE | rel. mCE | mCA extra | mCE extra |" in md
    assert "average the 1 of the 15 standard corruptions that were evaluated" in md
    assert "The 1 extra corruption (saturate) is held out" in md
    # the reference (Zero) never changes its error, so both corruptions are skipped
    assert "brightness (+0.00 pp)" in md and "saturate (+0.00 pp)" in md
    full = R.metrics_footer("baseline", 15, [], {})
    assert full.startswith("mCA, mCE and rel. mCE average the 15 standard corruptions (Hendrycks")
    assert "(none here)" in full


def _fake_study(root, seeds=(0, 1)):
    """A finished 2-method study on digits with untrained cnn_tiny students."""
    from kdlab.core.checkpoint import atomic_save, model_checkpoint
    from kdlab.models import create_model

    recipe = {"data": {"name": "digits", "val_fraction": 0.1, "data_dir": None}}
    for m in ("baseline", "kd"):
        for s in seeds:
            torch.manual_seed(100 * s + len(m))
            net = create_model("cnn_tiny", num_classes=10, in_channels=1)
            atomic_save(model_checkpoint(net, model_name="cnn_tiny", model_kwargs={},
                                         num_classes=10, in_channels=1, dataset="digits",
                                         recipe=recipe), root / m / f"seed{s}" / "best.pt")
    (root / "report").mkdir(parents=True)
    stats = [{"method": m, "model": "cnn_tiny", "n_seeds": len(seeds), "test_acc_mean": 0.5,
              "test_acc_sd": 0.01, "test_acc_ci95": 0.1, "diff_vs_baseline": 0.0,
              "diff_vs_baseline_ci95": 0.0, "n_paired": len(seeds), "best_epoch_mean": 1.0,
              "train_time_s_mean": 1.0, "train_images_per_s": 1.0, "seeds": list(seeds)}
             for m in ("baseline", "kd")]
    (root / "report" / "table.json").write_text(json.dumps(
        {"methods": stats, "baseline": "baseline", "wall_time_s": 1.0}))


def test_study_robustness_columns(tmp_path):
    _fake_study(tmp_path)
    from kdlab.experiments.robustness import study_robustness

    out = study_robustness(tmp_path, corruptions=["contrast", "gaussian_noise", "saturate"],
                             severities=[5], limit=30, progress=False, log=lambda *a: None)
    rows = {r["method"]: r for r in out["methods"]}
    for m in ("baseline", "kd"):
        per = [json.loads((tmp_path / "report" / "robustness" / f"seed{s}" /
                           "robustness.json").read_text())["models"][m] for s in (0, 1)]
        # the columns are the mean and sd over seeds of the per-seed numbers
        for k in ("mCA", "mCA_extra", "mCE_all"):
            vals = [p[k] for p in per]
            assert rows[m][k] == pytest.approx(np.mean(vals))
            assert rows[m][k + "_sd"] == pytest.approx(np.std(vals, ddof=1))
        # mCA: the 2 standard corruptions only; the extra (saturate) apart
        for p in per:
            assert p["mCA"] == pytest.approx((p["acc_by_corruption"]["contrast"]
                                              + p["acc_by_corruption"]["gaussian_noise"]) / 2)
            assert p["mCA_extra"] == pytest.approx(p["acc_by_corruption"]["saturate"])
        assert rows[m]["n_robust_seeds"] == 2
    assert rows["baseline"]["mCE"] == pytest.approx(1.0)
    md = (tmp_path / "report" / "robustness.md").read_text()
    assert "average the 2 of the 15 standard corruptions" in md and "(saturate)" in md
    assert "mCA %" in (tmp_path / "report" / "table.md").read_text()
    assert (tmp_path / "report" / "robustness_heatmap.png").stat().st_size > 0
