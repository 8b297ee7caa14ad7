"""End-to-end runs through the CLI: a digits study and an ablation on CIFAR-format files."""

import json
import math

import pytest

from cifar_fixtures import write_fake_cifar10
from kdlab.cli.main import main

TEACHER = """
name: {name}-teacher
data: {{name: {data}, val_fraction: 0.2{extra}}}
student: {{model: cnn_small}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, patience: null, seed: 0}}
loss: [{{term: ce}}]
"""

STUDY = """
extends: {base}
name: {name}
data: {{val_fraction: 0.2{extra}}}
teacher: {{model: cnn_small, kwargs: {{}}, checkpoint: {ckpt}, recipe: teacher.yaml}}
student: {{model: cnn_tiny}}
train: {{epochs: {epochs}, batch_size: 32, patience: null}}
loss:
  - {{term: ce, weight: 0.1}}
  - {{term: kd, weight: 0.9, T: 4.0}}
  - {{term: align, weight: 0.5, layers: [[stage2, stage2]]}}
  - {{term: attn, weight: 10.0, layers: [[stage2, stage2]]}}
mask: {{method: ig, steps: 4, q: 0.5}}
"""


def _write(tmp_path, data, base, epochs, extra=""):
    (tmp_path / "teacher.yaml").write_text(TEACHER.format(name="e2e", data=data, epochs=epochs, extra=extra))
    ckpt = tmp_path / "teacher" / "best.pt"
    (tmp_path / "study.yaml").write_text(STUDY.format(base=base, name="e2e", ckpt=ckpt, epochs=epochs, extra=extra))
    return tmp_path / "study.yaml", ckpt


def test_digits_study_end_to_end(tmp_path, capsys):
    recipe, ckpt = _write(tmp_path, "digits", "digits/full", epochs=3)
    out = tmp_path / "study"
    assert main(["ablate", str(recipe), "--seeds", "0", "1", "--out", str(out), "--quiet"]) == 0
    assert ckpt.is_file()  # the teacher was trained first from teacher.recipe
    printed = capsys.readouterr().out
    for method in ("baseline", "kd", "kd+align", "kd+attn", "full"):
        assert f"| {method} " in printed
        for seed in (0, 1):
            res = json.loads((out / method / f"seed{seed}" / "result.json").read_text())
            assert 0.0 <= res["test_acc"] <= 1.0 and res["epochs_run"] == 3
    table = json.loads((out / "report" / "table.json").read_text())
    rows = {r["method"]: r for r in table["methods"]}
    # the table's statistics are those of the per-run results (recomputed here)
    kd = [json.loads((out / "kd" / f"seed{s}" / "result.json").read_text())["test_acc"] for s in (0, 1)]
    base = [json.loads((out / "baseline" / f"seed{s}" / "result.json").read_text())["test_acc"] for s in (0, 1)]
    assert rows["kd"]["test_acc_mean"] == pytest.approx(sum(kd) / 2)
    assert rows["kd"]["test_acc_sd"] == pytest.approx(abs(kd[0] - kd[1]) / math.sqrt(2))
    # 95% t interval with 1 degree of freedom: t = 12.706
    assert rows["kd"]["test_acc_ci95"] == pytest.approx(12.7062 * abs(kd[0] - kd[1]) / math.sqrt(2) / math.sqrt(2), rel=1e-4)
    assert rows["kd"]["diff_vs_baseline"] == pytest.approx(((kd[0] - base[0]) + (kd[1] - base[1])) / 2)
    assert rows["kd"]["params"] == 6274  # cnn_tiny on 1-channel digits
    for f in ("results.csv", "table.csv", "table.md"):
        assert (out / "report" / f).stat().st_size > 0
    # robustness of every method and seed joins the study table
    assert main(["robustness", "--study", str(out), "--corruptions", "gaussian_noise", "contrast",
                 "--severities", "1", "5", "--limit", "40", "--no-progress"]) == 0
    rob = {r["method"]: r for r in json.loads((out / "report" / "table.json").read_text())["methods"]}
    assert rob["baseline"]["mCE"] == pytest.approx(1.0)  # the reference relative to itself
    assert all(0.0 <= r["mCA"] <= 1.0 for r in rob.values())
    assert (out / "report" / "robustness_heatmap.png").stat().st_size > 0
    assert "mCA %" in (out / "report" / "table.md").read_text()
    capsys.readouterr()
    # a second invocation skips every finished run
    assert main(["ablate", str(recipe), "--seeds", "0", "1", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.count("done earlier") == 10


def test_ablate_on_cifar_format_files(tmp_path, capsys):
    data = tmp_path / "cifar"
    write_fake_cifar10(data, n_per_batch=20, n_test=30)
    recipe, _ = _write(tmp_path, "cifar10", "cifar10/full", epochs=1)
    out = tmp_path / "study"
    rc = main(["ablate", str(recipe), "--data-dir", str(data), "--seeds", "0", "--mode", "loo",
               "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    for method in ("full", "full-kd", "full-align", "full-attn"):
        assert f"| {method} " in printed
    res = json.loads((out / "full" / "seed0" / "result.json").read_text())
    assert res["dataset"] == "cifar10" and res["n_test"] == 30


def test_missing_cifar_folder_is_a_one_line_error(tmp_path, capsys):
    rc = main(["train-teacher", "cifar10/teacher", "--data-dir", str(tmp_path / "nowhere"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "cifar-10-python.tar.gz" in err


def test_bad_recipe_key_is_a_one_line_error(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("extends: digits/kd\ntrain: {epoch: 3}\n")
    assert main(["distill", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.epoch: unknown key" in err and len(err.splitlines()) == 1
