"""The explanation sweep: alpha is the weight of the hard-label term."""

import json

import pytest

from kdlab.core.config import load_recipe
from kdlab.experiments.sweep import run_sweep, sweep_recipes


def test_sweep_recipes_alpha_is_the_label_weight():
    base = load_recipe("digits/kd")
    rs = sweep_recipes(base, [1.0, 0.5, 0.1], ["cnn_tiny", "cnn_small"], T=4.0)
    assert list(rs) == ["cnn_tiny@a=1", "cnn_tiny@a=0.5", "cnn_tiny@a=0.1",
                        "cnn_small@a=1", "cnn_small@a=0.5", "cnn_small@a=0.1"]
    assert [(t.term, t.weight) for t in rs["cnn_tiny@a=1"].loss] == [("ce", 1.0)]
    assert [(t.term, t.weight) for t in rs["cnn_small@a=0.1"].loss] == [("ce", 0.1), ("kd", pytest.approx(0.9))]
    assert rs["cnn_small@a=0.5"].student.model == "cnn_small"
    with pytest.raises(ValueError, match="outside"):
        sweep_recipes(base, [1.5], ["cnn_tiny"])


def test_tiny_sweep_end_to_end(tmp_path):
    (tmp_path / "teacher.yaml").write_text(
        "name: sw-teacher\ndata: {name: digits}\nstudent: {model: cnn_small}\n"
        "train: {epochs: 2, lr: 0.05, patience: null}\nloss: [{term: ce}]\n")
    (tmp_path / "kd.yaml").write_text(
        f"extends: digits/kd\nname: sw\nteacher: {{model: cnn_small, kwargs: {{}}, "
        f"checkpoint: {tmp_path / 't' / 'best.pt'}, recipe: teacher.yaml}}\n"
        "train: {epochs: 1, patience: null}\n")
    out = tmp_path / "sweep"
    rows = run_sweep(str(tmp_path / "kd.yaml"), alphas=[1.0, 0.5], students=["cnn_tiny"], seeds=[0],
                     out_dir=out, n_images=12, steps=4, progress=False, log=lambda *a: None)
    assert [r["alpha"] for r in rows] == [1.0, 0.5]
    for r in rows:
        assert -1.0 <= r["rank_alignment"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        assert r["n_images"] == 12
    for f in ("explain.md", "sweep.png", "overlays.png"):
        assert (out / "explain" / f).stat().st_size > 0
    res = json.loads((out / "runs" / "cnn_tiny@a=0.5" / "seed0" / "result.json").read_text())
    assert res["epochs_run"] == 1
