"""The study table's test columns against scipy.stats on the per-seed results."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from kdlab.report.tables import method_stats, power_line, render_table, study_report

ACC = {  # method -> per-seed test accuracy (seeds 0..5)
    "baseline": [0.601, 0.582, 0.634, 0.657, 0.628, 0.611],
    "kd": [0.652, 0.640, 0.671, 0.690, 0.668, 0.659],  # clearly better
    "kd+attn": [0.612, 0.570, 0.650, 0.649, 0.640, 0.615],  # within noise
    "full": [0.601, 0.582, 0.634, 0.657, 0.628, 0.611],  # identical to the baseline
}


def _runs():
    return [{"method": m, "seed": s, "test_acc": a, "best_epoch": 10, "train_time_s": 1.0,
             "images_per_s": 100.0, "model": "cnn_tiny"}
            for m, accs in ACC.items() for s, a in enumerate(accs)]


def _holm_by_hand(p: dict) -> dict:
    """Holm for a small family, written out: sort, multiply by m, m−1, ..., running max, cap 1."""
    items = sorted((v, k) for k, v in p.items() if math.isfinite(v))
    m, out, run = len(items), {}, 0.0
    for i, (v, k) in enumerate(items):
        run = max(run, min(1.0, (m - i) * v))
        out[k] = run
    return out


def test_table_columns_match_scipy():
    rows = {r["method"]: r for r in method_stats(_runs(), "baseline")}
    base = np.asarray(ACC["baseline"])
    p_t = {}
    for m in ("kd", "kd+attn"):
        a = np.asarray(ACC[m])
        t = stats.ttest_rel(a, base)
        w = stats.wilcoxon(a, base)
        d = a - base
        assert rows[m]["p_ttest"] == pytest.approx(t.pvalue, rel=1e-9)
        assert rows[m]["p_wilcoxon"] == pytest.approx(w.pvalue, rel=1e-9)
        assert rows[m]["d_z"] == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-9)
        assert rows[m]["diff_vs_baseline"] == pytest.approx(d.mean())
        lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        assert rows[m]["diff_vs_baseline_ci95"] == pytest.approx((hi - lo) / 2)
        p_t[m] = t.pvalue
    # 'full' equals the baseline on every seed: the tests are undefined (NaN), not p = 1
    assert math.isnan(rows["full"]["p_ttest"]) and math.isnan(rows["full"]["p_wilcoxon"])
    expect = _holm_by_hand(p_t)
    for m in ("kd", "kd+attn"):
        assert rows[m]["p_holm"] == pytest.approx(expect[m])
    assert math.isnan(rows["full"]["p_holm"])
    assert rows["kd"]["holm_reject"] and not rows["kd+attn"]["holm_reject"]
    assert not rows["full"]["holm_reject"] and not rows["baseline"]["holm_reject"]
    assert math.isnan(rows["baseline"]["p_ttest"])
    # mean ± t-interval of the accuracies themselves
    m, s = base.mean(), base.std(ddof=1)
    assert rows["baseline"]["test_acc_ci95"] == pytest.approx(stats.t.ppf(0.975, 5) * s / math.sqrt(6))


def test_markdown_marks_survivors_and_power_line(tmp_path):
    stats_ = method_stats(_runs(), "baseline")
    md, note = render_table(stats_, "baseline")
    header = md.splitlines()[0]
    for col in ("p (t)", "p (Wilcoxon)", "p Holm", "d_z"):
        assert col in header
    kd_line = next(line for line in md.splitlines() if line.startswith("| kd "))
    attn_line = next(line for line in md.splitlines() if line.startswith("| kd+attn "))
    assert " *" in kd_line and " *" not in attn_line
    line = power_line(stats_, "baseline")
    assert line.startswith("Power: seeds needed to detect a 1 pp") and "This study has 6;" in line
    assert line in note
    # n for kd+attn follows from the sd of its differences (G*Power-checked in test_statistics)
    from kdlab.report.statistics import seeds_needed

    d = np.asarray(ACC["kd+attn"]) - np.asarray(ACC["baseline"])
    assert f"kd+attn {seeds_needed(d.std(ddof=1), 0.01)} (sd" in line


def test_study_report_writes_tables_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    study = tmp_path / "study"
    for m, accs in ACC.items():
        for s in range(len(accs)):
            run = study / m / f"seed{s}"
            run.mkdir(parents=True)
            rows = ["epoch,val_acc"] + [f"{e},{min(0.95, accs[s] * e / 5):.4f}" for e in range(1, 6)]
            (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    rep = study_report(_runs(), {}, study / "report", profile=False, log=lambda *a: None)
    table = json.loads((study / "report" / "table.json").read_text())
    kd = next(r for r in table["methods"] if r["method"] == "kd")
    assert kd["test_acc_by_seed"]["3"] == ACC["kd"][3] and "p_holm" in kd
    assert "p Holm" in (study / "report" / "table.md").read_text()
    csv_head = (study / "report" / "table.csv").read_text().splitlines()[0]
    assert "p_wilcoxon" in csv_head and "test_acc_by_seed" not in csv_head
    for name in ("forest", "val_curves"):
        png = study / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (study / "report" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
        assert rep["figures"][name] == str(png)


def test_rebuild_report_from_runs(tmp_path):
    from kdlab.report.tables import rebuild_report

    study = tmp_path / "s"
    for r in _runs():
        run = study / r["method"] / f"seed{r['seed']}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(r))
    (study / "report").mkdir()
    (study / "report" / "table.json").write_text(json.dumps(  # an old table: order + profile kept
        {"baseline": "baseline", "methods": [{"method": m, "params": 123} for m in ("baseline", "kd", "kd+attn", "full")]}))
    rep = rebuild_report(study, figures=False, log=lambda *a: None)
    rows = {r["method"]: r for r in rep["methods"]}
    assert [r["method"] for r in rep["methods"]] == ["baseline", "kd", "kd+attn", "full"]
    assert rows["kd"]["params"] == 123 and rows["kd"]["n_seeds"] == 6
    assert rows["kd"]["p_ttest"] == pytest.approx(stats.ttest_rel(ACC["kd"], ACC["baseline"]).pvalue)
    with pytest.raises(KeyError):
        rebuild_report(study, baseline="nope", figures=False, log=lambda *a: None)
    with pytest.raises(FileNotFoundError):
        rebuild_report(tmp_path / "empty", figures=False, log=lambda *a: None)


def test_rebuild_report_takes_the_method_from_the_folder(tmp_path):
    """A run trained by hand into a study folder (`kdlab distill <recipe> --out <study>/baseline/seed0`)
    records its recipe's name as its method; the rebuilt table files it under its folder, as
    `kdlab ablate` does, not as an extra one-seed method."""
    from kdlab.report.tables import rebuild_report

    study = tmp_path / "s"
    for r in _runs():
        if r["method"] not in ("baseline", "kd"):
            continue
        run = study / r["method"] / f"seed{r['seed']}"
        run.mkdir(parents=True)
        if r["method"] == "baseline" and r["seed"] < 2:
            r = {**r, "method": "detection-fgd-ld-baseline"}
        (run / "result.json").write_text(json.dumps(r))
    rep = rebuild_report(study, figures=False, log=lambda *a: None)
    rows = {r["method"]: r for r in rep["methods"]}
    assert sorted(rows) == ["baseline", "kd"] and rows["baseline"]["n_seeds"] == 6
    assert rows["kd"]["p_ttest"] == pytest.approx(stats.ttest_rel(ACC["kd"], ACC["baseline"]).pvalue)


def test_one_seed_table_says_what_is_missing():
    runs = [r for r in _runs() if r["seed"] == 0]
    md, note = render_table(method_stats(runs, "baseline"), "baseline")
    assert "need at least 2 seeds per method; this study has 1." in note
    assert "Wilcoxon test cannot" not in note


def test_fmt_p():
    from kdlab.report.tables import fmt_p

    assert fmt_p(0.0502) == "0.0502" and fmt_p(0.0498) == "0.0498" and fmt_p(0.12345) == "0.123"
    assert fmt_p(0.0004) == "<0.001" and fmt_p(float("nan")) == "—" and fmt_p(None) == "—"


def test_gap_closed_column_by_hand(tmp_path):
    # teacher 0.95; baseline 0.80 / 0.85; kd 0.92 / 0.90 -> gaps 0.12/0.15 = 0.8 and 0.05/0.10 = 0.5
    from kdlab.report.tables import method_stats, render_table

    runs = [{"method": m, "seed": s, "test_acc": a, "best_epoch": 1, "train_time_s": 1.0, "images_per_s": 1.0}
            for m, s, a in (("baseline", 0, 0.80), ("baseline", 1, 0.85), ("kd", 0, 0.92), ("kd", 1, 0.90))]
    stats = method_stats(runs, "baseline", teacher_acc=0.95)
    kd = next(r for r in stats if r["method"] == "kd")
    from scipy import stats as st

    assert kd["gap_closed_mean"] == pytest.approx(0.65)
    sd = (0.3 / 2 ** 0.5)  # sample sd of (0.8, 0.5)
    assert kd["gap_closed_ci95"] == pytest.approx(st.t.ppf(0.975, 1) * sd / 2 ** 0.5)
    md, note = render_table(stats, "baseline")
    assert "gap closed (95% CI)" in md and "0.65 ±" in md and "Gap closed" in note


def test_rebuilt_report_is_byte_identical_with_gap_closed(tmp_path):
    """`kdlab report` on a finished study writes exactly the files the study wrote: same methods in
    the same order, the gap-closed column (the teacher's accuracy is kept in table.json), the same
    p-values; a method folder of another study in the same place does not join the table."""
    from kdlab.report.tables import rebuild_reports

    study = tmp_path / "s"
    runs = _runs()
    for r in runs:
        run = study / r["method"] / f"seed{r['seed']}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(r))
    extra = study / "full-kd" / "seed0"  # a leave-one-out run of an earlier study in this folder
    extra.mkdir(parents=True)
    (extra / "result.json").write_text(json.dumps({**runs[0], "method": "full-kd"}))
    study_report(runs, {m: None for m in ACC}, study / "report", profile=False, figures=False,
                 teacher_value=0.70, log=lambda *a: None)
    files = ("table.md", "table.csv", "table.json", "results.csv")
    before = {f: (study / "report" / f).read_bytes() for f in files}
    md = before["table.md"].decode()
    assert "gap closed (95% CI)" in md.splitlines()[0] and "Gap closed:" in md
    kd = [(a - b) / (0.70 - b) for a, b in zip(ACC["kd"], ACC["baseline"])]
    table = json.loads(before["table.json"])
    assert table["methods"][1]["gap_closed_mean"] == pytest.approx(np.mean(kd))
    rebuild_reports(study, figures=False, log=lambda *a: None)
    assert {f: (study / "report" / f).read_bytes() for f in files} == before


def test_rebuild_report_of_an_interrupted_study_names_its_unfinished_runs(tmp_path, capsys):
    """`kdlab report` on an interrupted study: one stderr line names the runs of the recorded plan
    (report/study.json: methods x seeds) that have no result, table.md says it too, and the table
    uses only the finished runs (kd's unfinished seed 3, holding only a last.pt, is not used)."""
    from kdlab.report.tables import rebuild_report

    study = tmp_path / "s"
    for r in _runs():
        if r["method"] not in ("baseline", "kd") or (r["method"] == "kd" and r["seed"] >= 3):
            continue
        run = study / r["method"] / f"seed{r['seed']}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(r))
    (study / "kd" / "seed3").mkdir()
    (study / "kd" / "seed3" / "last.pt").write_bytes(b"x")
    (study / "report").mkdir()
    (study / "report" / "study.json").write_text(json.dumps(
        {"task": "classification", "seeds": [0, 1, 2, 3, 4, 5], "methods": ["baseline", "kd", "full"], "aliases": {}}))
    rep = rebuild_report(study, figures=False, log=lambda *a: None)
    rows = {r["method"]: r for r in rep["methods"]}
    assert sorted(rows) == ["baseline", "kd"] and rows["kd"]["n_seeds"] == 3
    # kd over seeds 0-2 only: paired with the baseline's seeds 0-2
    assert rows["kd"]["p_ttest"] == pytest.approx(stats.ttest_rel(ACC["kd"][:3], ACC["baseline"][:3]).pvalue)
    gaps = ("9 run(s) of the study have no result: kd/seed3 (unfinished), kd/seed4 (missing), kd/seed5 (missing), "
            "full/seed0 (missing), full/seed1 (missing), full/seed2 (missing), full/seed3 (missing), "
            "full/seed4 (missing) and 1 more; the table uses only the finished runs")
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err == [f"kdlab: warning: {gaps} (re-run the study's `kdlab ablate ... --out {study}` to finish them)"]
    assert f"**Unfinished study:** {gaps}." in (study / "report" / "table.md").read_text()
    # once every run of the plan is there, nothing is said
    for m, seeds in (("kd", (3, 4, 5)), ("full", range(6))):
        for r in _runs():
            if r["method"] == m and r["seed"] in seeds:
                (study / m / f"seed{r['seed']}").mkdir(parents=True, exist_ok=True)
                (study / m / f"seed{r['seed']}" / "result.json").write_text(json.dumps(r))
    rebuild_report(study, figures=False, log=lambda *a: None)
    assert capsys.readouterr().err == ""
    assert "Unfinished" not in (study / "report" / "table.md").read_text()
