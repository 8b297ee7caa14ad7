"""explain_study on a tiny fabricated study, checked against scipy on the models' own outputs."""

import json
import math

import numpy as np
import pytest
import torch


def _study(tmp_path):
    from kdlab.core.checkpoint import atomic_save, model_checkpoint
    from kdlab.models import create_model

    def save(seed, path):
        torch.manual_seed(seed)
        m = create_model("cnn_tiny", num_classes=10, in_channels=1)
        atomic_save(model_checkpoint(m, model_name="cnn_tiny", model_kwargs={}, num_classes=10,
                                     in_channels=1, dataset="digits"), path)
        return path

    teacher = save(100, tmp_path / "teacher" / "best.pt")
    study = tmp_path / "study"
    recipe = {"data": {"name": "digits", "val_fraction": 0.1}, "student": {"model": "cnn_tiny"},
              "teacher": {"model": "cnn_tiny", "checkpoint": str(teacher)}}
    for i, m in enumerate(("baseline", "kd")):
        for s in range(3):
            run = study / m / f"seed{s}"
            save(10 * i + s, run / "best.pt")
            (run / "run.json").write_text(json.dumps({"recipe": recipe, "seed": s, "method": m}))
    return study, teacher


def test_explain_study_matches_scipy(tmp_path):
    pytest.importorskip("captum")
    from scipy import stats

    from kdlab.models.adapters import load_model
    from kdlab.data import load_dataset, normalize
    from kdlab.experiments.study_explain import explain_study, pick_test_images

    study, teacher = _study(tmp_path)
    res = explain_study(study, n_images=24, method="saliency", n_overlay=2, log=lambda *a: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"baseline", "kd"} and res["settings"]["grid"] == [4, 4]
    assert res["settings"]["k"] == 5
    # logit alignment and top-1 agreement of kd seed 1, recomputed with scipy / numpy
    sp = load_dataset("digits", val_fraction=0.1)
    idx = pick_test_images(len(sp.test.y), 24, 0)
    x = normalize(sp.test.x[idx].float(), sp.info.mean, sp.info.std)
    t, _ = load_model(teacher)
    s, _ = load_model(study / "kd" / "seed1" / "best.pt")
    with torch.no_grad():
        tl, sl = t(x).numpy(), s(x).numpy()
    rho = np.mean([stats.spearmanr(a, b).statistic for a, b in zip(sl, tl)])
    run = next(r for r in res["runs"] if r["method"] == "kd" and r["seed"] == 1)
    assert run["logit_alignment"] == pytest.approx(rho, rel=1e-9)
    assert run["top1_agreement"] == pytest.approx(np.mean(sl.argmax(1) == tl.argmax(1)))
    # over seeds: the paired tests of the per-seed values
    base = [r["rank_alignment"] for r in sorted(res["runs"], key=lambda r: r["seed"]) if r["method"] == "baseline"]
    kd = [r["rank_alignment"] for r in sorted(res["runs"], key=lambda r: r["seed"]) if r["method"] == "kd"]
    assert rows["kd"]["rank_alignment_p_ttest"] == pytest.approx(stats.ttest_rel(kd, base).pvalue)
    assert rows["kd"]["rank_alignment_p_holm"] == pytest.approx(rows["kd"]["rank_alignment_p_ttest"])
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(kd), scale=stats.sem(kd))
    assert rows["kd"]["rank_alignment_ci"] == pytest.approx((hi - lo) / 2)
    out = study / "report"
    for f in ("explain_study.md", "explain_study.csv", "explain_study.json", "explain_study.pdf",
              "explain_overlays.pdf"):
        assert (out / f).stat().st_size > 0
    assert (out / "explain_study.png").read_bytes()[:4] == b"\x89PNG"
    assert "rank alignment" in (out / "explain_study.md").read_text()


def test_explain_study_errors(tmp_path):
    from kdlab.experiments.study_explain import explain_study

    with pytest.raises(FileNotFoundError):
        explain_study(tmp_path, log=lambda *a: None)
    study, _ = _study(tmp_path)
    with pytest.raises(FileNotFoundError):
        explain_study(study, teacher=tmp_path / "nope.pt", log=lambda *a: None)
    with pytest.raises(KeyError):
        explain_study(study, methods=["full"], log=lambda *a: None)


def test_explain_study_uses_the_tables_seeds(tmp_path):
    pytest.importorskip("captum")
    from kdlab.experiments.study_explain import explain_study

    study, _ = _study(tmp_path)
    (study / "report").mkdir()
    (study / "report" / "table.json").write_text(json.dumps({"baseline": "baseline", "methods": [
        {"method": "baseline", "seeds": [0, 1]}, {"method": "kd", "seeds": [0, 1]}]}))
    res = explain_study(study, n_images=8, method="saliency", n_overlay=0, log=lambda *a: None)
    assert [r["n_seeds"] for r in res["rows"]] == [2, 2]  # seed2 lies in the folder, not in the table


def test_overlay_indices_cover_classes():
    from kdlab.experiments.study_explain import overlay_indices

    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    assert overlay_indices(y, 4).tolist() == [0, 3, 5, 1]
    assert overlay_indices(y, 2).tolist() == [0, 3]
