"""The explanation sweep: alpha is the weight of the KD term ((1-alpha)*CE + alpha*KD)."""

import json

import pytest

from kdlab.experiments.sweep import run_sweep, seed_table, seed_table_markdown, sweep_recipes
from kdlab.train.recipe import load_recipe


def test_sweep_recipes_alpha_is_the_kd_weight():
    base = load_recipe("digits/kd")
    rs = sweep_recipes(base, [0.0, 0.5, 0.9], ["cnn_tiny", "cnn_small"], T=4.0)
    assert list(rs) == ["cnn_tiny@a=0", "cnn_tiny@a=0.5", "cnn_tiny@a=0.9",
                        "cnn_small@a=0", "cnn_small@a=0.5", "cnn_small@a=0.9"]
    assert [(t.term, t.weight) for t in rs["cnn_tiny@a=0"].loss] == [("ce", 1.0)]
    assert [(t.term, t.weight) for t in rs["cnn_small@a=0.9"].loss] == [("ce", pytest.approx(0.1)), ("kd", 0.9)]
    # the same meaning as the study's kd recipe: 0.1*CE + 0.9*KD is alpha = 0.9
    assert [(t.term, t.weight) for t in base.loss] == [("ce", 0.1), ("kd", 0.9)]
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
    rows = run_sweep(str(tmp_path / "kd.yaml"), alphas=[0.0, 0.5], students=["cnn_tiny"], seeds=[0],
                     out_dir=out, n_images=12, steps=4, progress=False, log=lambda *a: None)
    assert [r["alpha"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert -1.0 <= r["rank_alignment"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        assert r["n_images"] == 12
    for f in ("explain.md", "sweep.png", "overlays.png", "sweep_table.md", "sweep_table.csv"):
        assert (out / "explain" / f).stat().st_size > 0
    res = json.loads((out / "runs" / "cnn_tiny@a=0.5" / "seed0" / "result.json").read_text())
    assert res["epochs_run"] == 1


def test_seed_table_interval_is_over_seeds():
    from scipy import stats

    # two seeds of (cnn_tiny, 0.5), one of (cnn_tiny, 1.0); per-image half-widths 0.05 / 0.07
    rows = [
        {"student": "cnn_tiny a=0.5 s0", "size": "cnn_tiny", "alpha": 0.5, "seed": 0,
         "n_images": 64, "rank_alignment": 0.58, "rank_alignment_ci": 0.05},
        {"student": "cnn_tiny a=0.5 s1", "size": "cnn_tiny", "alpha": 0.5, "seed": 1,
         "n_images": 64, "rank_alignment": 0.47, "rank_alignment_ci": 0.07},
        {"student": "cnn_tiny a=1 s0", "size": "cnn_tiny", "alpha": 1.0, "seed": 0,
         "n_images": 64, "rank_alignment": 0.40, "rank_alignment_ci": 0.06},
    ]
    t = seed_table(rows)
    assert [(r["student"], r["alpha"], r["n_seeds"]) for r in t] == [
        ("cnn_tiny", 0.5, 2), ("cnn_tiny", 1.0, 1)]
    # mean 0.525; sd = |0.58 - 0.47| / sqrt(2) = 0.0778; half-width t_{.975,1} * sd / sqrt(2)
    sd = 0.11 / 2 ** 0.5
    assert t[0]["rank_alignment"] == pytest.approx(0.525)
    assert t[0]["rank_alignment_sd_seeds"] == pytest.approx(sd)
    assert t[0]["rank_alignment_ci_seeds"] == pytest.approx(stats.t.ppf(0.975, 1) * sd / 2 ** 0.5)
    assert t[0]["rank_alignment_ci_images"] == pytest.approx(0.06)
    md = seed_table_markdown(t)
    assert "0.525 ± 0.699" in md  # 12.706 * 0.055 = 0.699: two seeds give a wide interval
    assert "0.400 ± 0.060 (images)" in md and "interval over seeds" in md
