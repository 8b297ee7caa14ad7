"""findings: component contrasts and their tests, from fabricated study reports."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from kdlab.experiments.findings import component_contrasts, study_findings, write_findings
from kdlab.report.tables import study_report

ACC = {"baseline": [0.60, 0.58, 0.63, 0.66, 0.62, 0.61],
       "kd": [0.66, 0.65, 0.69, 0.71, 0.68, 0.66],        # kd over baseline: about +5.5 pp, clear
       "full": [0.67, 0.645, 0.70, 0.70, 0.69, 0.66]}  # = kd+attn (2 components): noise over kd


def test_component_contrasts_by_name():
    ladder = component_contrasts(["baseline", "kd", "kd+align", "kd+attn", "full"], ["kd", "align", "attn"])
    assert [(a, b) for _, a, b in ladder] == [("kd", "baseline"), ("kd+align", "kd"), ("kd+attn", "kd"),
                                               ("full", "kd")]
    two = component_contrasts(["baseline", "kd", "full"], ["kd", "attn"])  # full is kd+attn
    assert [(lbl, a, b) for lbl, a, b in two] == [("kd (over CE only)", "kd", "baseline"),
                                                  ("attn on top of kd", "full", "kd")]
    loo = component_contrasts(["full", "full-kd", "full-align", "full-attn"], ["kd", "align", "attn"],
                              baseline="full")
    assert [(a, b) for _, a, b in loo] == [("full", "full-kd"), ("full", "full-align"), ("full", "full-attn")]
    other = component_contrasts(["base", "x", "y"], [], baseline="base")
    assert [(a, b) for _, a, b in other] == [("x", "base"), ("y", "base")]


def _study(tmp_path):
    study = tmp_path / "study"
    runs = [{"method": m, "seed": s, "test_acc": a, "best_epoch": 5, "train_time_s": 1.0,
             "images_per_s": 10.0, "model": "cnn_tiny"} for m, v in ACC.items() for s, a in enumerate(v)]
    study_report(runs, {}, study / "report", profile=False, figures=False, log=lambda *a: None)
    recipe = {"name": "toy", "data": {"name": "digits", "label_fraction": 0.1},
              "teacher": {"model": "resnet18"}, "student": {"model": "cnn_tiny"},
              "loss": [{"term": "ce"}, {"term": "kd"}, {"term": "attn"}]}
    (study / "report" / "study.json").write_text(json.dumps({"recipe": recipe, "seeds": list(range(6))}))
    rng = np.random.default_rng(0)
    for s in range(6):  # robustness: mCA = clean accuracy − 20 pp, mCE made up
        d = study / "report" / "robustness" / f"seed{s}"
        d.mkdir(parents=True)
        models = {m: {"mCA": ACC[m][s] - 0.2, "mCE": 1.0 if m == "baseline" else 0.9 + 0.01 * rng.standard_normal()}
                  for m in ACC}
        (d / "robustness.json").write_text(json.dumps({"models": models}))
    return study


def test_findings_tests_match_scipy(tmp_path):
    study = _study(tmp_path)
    f = study_findings(study)
    acc = {r["with"]: r for r in f["results"] if r["measure"] == "test_acc"}
    assert set(acc) == {"kd", "full"}  # kd vs baseline, full (= kd+attn here) vs kd
    p_kd = stats.ttest_rel(ACC["kd"], ACC["baseline"]).pvalue
    p_full = stats.ttest_rel(ACC["full"], ACC["kd"]).pvalue
    assert acc["kd"]["p_ttest"] == pytest.approx(p_kd)
    assert acc["kd"]["p_wilcoxon"] == pytest.approx(stats.wilcoxon(ACC["kd"], ACC["baseline"]).pvalue)
    lo, hi = sorted([p_kd, p_full])  # Holm for two: 2·min, then max(2·min, max)
    expect = {lo: 2 * lo, hi: max(2 * lo, min(1.0, hi))}
    assert acc["kd"]["p_holm"] == pytest.approx(expect[p_kd])
    assert acc["full"]["p_holm"] == pytest.approx(expect[p_full])
    assert f["robustness"] and any(r["measure"] == "mCE" for r in f["results"])
    mca = next(r for r in f["results"] if r["measure"] == "mCA" and r["with"] == "kd")
    assert mca["mean"] == pytest.approx(np.mean(np.subtract(ACC["kd"], ACC["baseline"])))
    md = write_findings([study], out=tmp_path / "findings.md", command="kdlab findings STUDY",
                        log=lambda *a: None)
    assert (tmp_path / "findings.md").read_text() == md
    kd_line = next(line for line in md.splitlines() if line.startswith("- *kd (over CE only)*"))
    attn_line = next(line for line in md.splitlines() if line.startswith("- *attn on top of kd*"))
    assert "test top-1 +" in kd_line and "better" in kd_line
    assert "test top-1: no detectable effect" in attn_line
    assert "explanation alignment" in md  # not measured: says how to get it
    assert "`kdlab findings STUDY`" in md


def test_findings_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        study_findings(tmp_path)
    with pytest.raises(ValueError):
        write_findings([])


def test_findings_of_a_compare_study(tmp_path):
    # a `kdlab compare` study: independent methods, each against the baseline 'kd' — not a ladder
    # named after whichever run folder comes first (the first run's recipe has the single term 'at')
    acc = {"kd": [0.88, 0.89, 0.90, 0.87, 0.88, 0.89],
           "at": [0.83, 0.85, 0.84, 0.82, 0.83, 0.86],
           "cc": [0.885, 0.89, 0.905, 0.875, 0.89, 0.885]}
    study = tmp_path / "cmp"
    runs = [{"method": m, "seed": s, "test_acc": a, "best_epoch": 5, "train_time_s": 1.0,
             "images_per_s": 10.0, "model": "cnn_tiny"} for m, v in acc.items() for s, a in enumerate(v)]
    study_report(runs, {}, study / "report", baseline="kd", profile=False, figures=False, log=lambda *a: None)
    (study / "at" / "seed0").mkdir(parents=True)
    (study / "at" / "seed0" / "run.json").write_text(json.dumps({"recipe": {
        "name": "method-at", "data": {"name": "mnist5k"}, "loss": [{"term": "ce"}, {"term": "at"}]}}))
    (study / "report" / "compare.json").write_text(json.dumps({"recipes": {
        m: f"/x/src/kdlab/recipes/methods/mnist5k/{m}.yaml" for m in acc}, "seeds": list(range(6)),
        "baseline": "kd"}))
    f = study_findings(study)
    assert [(a, b) for _, a, b in f["contrasts"]] == [("at", "kd"), ("cc", "kd")]
    res = {r["with"]: r for r in f["results"] if r["measure"] == "test_acc"}
    assert res["at"]["mean"] == pytest.approx(np.mean(np.subtract(acc["at"], acc["kd"])))
    p_at, p_cc = stats.ttest_rel(acc["at"], acc["kd"]).pvalue, stats.ttest_rel(acc["cc"], acc["kd"]).pvalue
    assert p_at < p_cc  # Holm over the two: 2·p_at, then max(2·p_at, p_cc)
    assert res["at"]["p_holm"] == pytest.approx(2 * p_at)
    assert res["cc"]["p_holm"] == pytest.approx(max(2 * p_at, p_cc))
    assert f["name"] == "cmp (kdlab compare)"
    assert f["made_by"] == ("kdlab compare methods/mnist5k/kd methods/mnist5k/at methods/mnist5k/cc "
                            f"--seeds 0 1 2 3 4 5 --baseline kd --out {study}")
