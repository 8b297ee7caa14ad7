"""Ablation modes: `--mode both` trains each distinct recipe once (the leave-one-out names that
equal a ladder method are aliases), Holm counts each comparison once, and every mode reports into
its own folder."""

from pathlib import Path

from kdlab.experiments.findings import component_contrasts
from kdlab.experiments.study import distinct_methods, report_folder
from kdlab.tasks import get_task
from kdlab.train.recipe import load_recipe


def test_mode_both_trains_each_distinct_recipe_once():
    full = load_recipe("digits/full")  # ce + kd + align + attn
    task = get_task("classification")
    both = task.ablation_methods(full, "both")
    assert list(both) == ["baseline", "kd", "kd+align", "kd+attn", "full", "full-kd", "full-align", "full-attn"]
    distinct, aliases = distinct_methods(task, both)
    # full-align = kd + attn and full-attn = kd + align (by hand: drop one of the three components)
    assert aliases == {"full-align": "kd+attn", "full-attn": "kd+align"}
    assert list(distinct) == ["baseline", "kd", "kd+align", "kd+attn", "full", "full-kd"]
    terms = lambda r: [t.term for t in r.loss]  # noqa: E731
    assert terms(distinct["full-kd"]) == ["ce", "align", "attn"]
    # the findings contrasts name the aliases by their runs; each comparison once
    cs = component_contrasts(list(distinct), ["kd", "align", "attn"], "baseline", aliases)
    pairs = [(a, b) for _, a, b in cs]
    assert len(pairs) == len(set(pairs))
    assert ("full", "kd+attn") in pairs and ("full", "kd+align") in pairs and ("full", "full-kd") in pairs
    assert ("full", "full-align") not in pairs


def test_each_mode_has_its_own_report_folder(tmp_path):
    assert report_folder(tmp_path, None) == Path(tmp_path) / "report"
    assert report_folder(tmp_path, "ladder") == Path(tmp_path) / "report"
    assert report_folder(tmp_path, "loo") == Path(tmp_path) / "report-loo"
    assert report_folder(tmp_path, "both") == Path(tmp_path) / "report-both"


def test_rerun_study_log_counts_only_the_runs_trained_now(tmp_path):
    """A re-run study reuses its finished runs: the closing line's teacher and training seconds are
    those of the runs trained by this call (none here), not the earlier runs' (which exceeded this
    call's wall time)."""
    from kdlab.train.recipe import load_recipe
    from kdlab.experiments.study import run_study

    r = load_recipe("digits/baseline", ["train.epochs=1"])
    lines = []
    run_study({"baseline": r}, tmp_path / "s", seeds=[0], progress=False, log=lines.append, profile=False)
    first = [l for l in lines if l.startswith("study wall time")][-1]
    assert "(1 of 1 runs trained now)" in first
    import json

    res = json.loads((tmp_path / "s" / "baseline" / "seed0" / "result.json").read_text())
    assert first.endswith(f"students' own training {res['train_time_s'] - res.get('teacher_time_s', 0.0):.1f}s")
    lines.clear()
    run_study({"baseline": r}, tmp_path / "s", seeds=[0], progress=False, log=lines.append, profile=False)
    again = [l for l in lines if l.startswith("study wall time")][-1]
    assert "(0 of 1 runs trained now)" in again and again.endswith("students' own training 0.0s")
