"""`kdlab bench --accuracy` (issue 30): default vs fast settings, paired over seeds."""

import json
import math

import pytest

from kdlab.cli.main import main
from kdlab.experiments.bench_accuracy import accuracy_check, paired_t_interval


def test_paired_t_interval_by_hand():
    # differences b - a: 0.01, 0.03, 0.02 -> mean 0.02, sd 0.01; t(0.975, 2) = 4.302652729911275
    got = paired_t_interval([0.50, 0.60, 0.70], [0.51, 0.63, 0.72])
    assert got["diffs"] == pytest.approx([0.01, 0.03, 0.02])
    assert got["mean"] == pytest.approx(0.02) and got["sd"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert (got["lo"], got["hi"]) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    one = paired_t_interval([0.5], [0.6])
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["lo"])


def test_accuracy_check_pairs_each_seeds_two_runs(tmp_path):
    lines = []
    res = accuracy_check(tmp_path, seeds=(0, 1), epochs=1, data="synthetic", n_train=40, n_test=20,
                         teacher="cnn_tiny", student="cnn_tiny", teacher_epochs=1, log=lines.append)
    stored = json.loads((tmp_path / "accuracy.json").read_text())
    assert stored["paired"]["diffs"] == pytest.approx(res["paired"]["diffs"])
    want = []
    for seed in (0, 1):
        acc = {}
        for name in ("default", "fast"):
            r = json.loads((tmp_path / "runs" / name / f"seed{seed}" / "result.json").read_text())
            rec = json.loads((tmp_path / "runs" / name / f"seed{seed}" / "run.json").read_text())["recipe"]["train"]
            assert (rec.get("amp", "none"), rec.get("channels_last", False), rec.get("fast_teacher", False)) == \
                (("none", False, False) if name == "default" else ("bf16", True, True))
            assert rec["teacher_mode"] == "live" and rec["seed"] == seed and rec["epochs"] == 1
            acc[name] = r["test_acc"]
        want.append(acc["fast"] - acc["default"])
    assert res["paired"]["diffs"] == pytest.approx(want)
    assert any(l.startswith("paired difference fast − default") for l in lines)
    with pytest.raises(ValueError, match="not empty"):  # finished runs would be reused, not trained
        accuracy_check(tmp_path, seeds=(0,), epochs=1, data="synthetic", n_train=40, n_test=20,
                       teacher="cnn_tiny", student="cnn_tiny", log=lambda *a: None)


def test_accuracy_option_conflicts_are_one_line(capsys):
    assert main(["bench", "--accuracy", "--study", "digits/full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error:") and "--accuracy" in err[0]
    assert main(["bench", "--epochs", "4"]) == 2
    assert "--epochs applies to --accuracy" in capsys.readouterr().err


@pytest.mark.parametrize("n_train,n_test,warned", [(10, 10, True), (499, 99, True), (500, 100, False)])
def test_few_synthetic_test_images_warn_in_one_line(tmp_path, capsys, monkeypatch, n_train, n_test, warned):
    """`--accuracy --synthetic-cifar 10` tests on 10 images (one image = 10 points of accuracy): one
    warning line on stderr, after the inputs are checked and before the data is generated."""
    import kdlab.data.cifar_synthetic as cs

    class Generated(Exception):
        pass

    def stop(*a, **k):
        raise Generated

    monkeypatch.setattr(cs, "write_synthetic_cifar", stop)
    with pytest.raises(Generated):
        accuracy_check(tmp_path, seeds=(0,), epochs=1, data="synthetic", n_train=n_train, n_test=n_test,
                       teacher="cnn_tiny", student="cnn_tiny", log=lambda *a: None)
    err = capsys.readouterr().err.splitlines()
    if warned:
        assert err == [f"kdlab: warning: only {n_test} test images (from --synthetic-cifar {n_train}): one image "
                       f"moves a test accuracy by {100 / n_test:.1f} points, so the interval says little; give "
                       f"--synthetic-cifar 500 or more"]
    else:
        assert err == []
