"""End-to-end tiny runs through the `kdlab lm` commands (a tiny argparse app with lm.register)."""

import argparse
import json
from pathlib import Path

import pytest

from kdlab.cli import lm as lm_cli


def _trainer_takes_objectives() -> bool:
    try:
        from kdlab.train.trainer import Trainer
    except ImportError:
        return False
    import inspect

    return "objective" in inspect.signature(Trainer.__init__).parameters


@pytest.fixture
def loop(monkeypatch):
    """The core Trainer when this kdlab has it; else the tests' tiny loop."""
    if not _trainer_takes_objectives():
        from test_lm_loop import tiny_fit

        import kdlab.lm.study as st
        monkeypatch.setattr(st, "fit", lambda obj, tr, va, te, t, run, **kw: tiny_fit(obj, tr, va, te, t, run, **kw))


def app():
    p = argparse.ArgumentParser(prog="kdlab")
    sub = p.add_subparsers(dest="command")
    lm_cli.register(sub)
    return p


TINY = """
name: tiny
corpus: {{name: {corpus}, seq_len: 16, val_tokens: 512, test_tokens: 512}}
teacher:
  kwargs: {{d_model: 32, n_layer: 1, n_head: 2, max_len: 48}}
  train: {{epochs: 2, steps_per_epoch: 6, batch_size: 8, device: cpu}}
student: {{kwargs: {{d_model: 16, n_layer: 1, n_head: 2, max_len: 48}}}}
train: {{epochs: 2, steps_per_epoch: 4, batch_size: 8, device: cpu}}
distill: {{top_k: 4, prompt_len: 6, gen_len: 8, seqkd_pool: 16}}
study:
  seeds: [0, 1]
  exposure_prompts: 4
  methods:
    ce: {{loss: [{{term: ce}}]}}
    fkl: {{loss: [{{term: ce, weight: 0.5}}, {{term: fkl, weight: 0.5}}]}}
    fkl_dense: {{loss: [{{term: ce, weight: 0.5}}, {{term: fkl, weight: 0.5}}], teacher_source: live}}
    seqkd: {{loss: [{{term: ce}}], seqkd: 0.5}}
    gkd: {{loss: [{{term: jsd}}], on_policy: 1.0}}
"""


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(30):
        (d / f"f{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog. " * 6)
    return d


def test_ablate_distill_generate_end_to_end(tmp_path, loop, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.format(corpus=_corpus(tmp_path)))
    out = tmp_path / "out"
    a = app().parse_args(["lm", "ablate", str(recipe), "--out", str(out), "--quiet"])
    assert a.func(a) == 0
    table = json.loads((out / "report" / "table.json").read_text())
    names = [m["method"] for m in table["methods"]]
    assert names == ["ce", "fkl", "fkl_dense", "seqkd", "gkd"]
    assert all(m["n_seeds"] == 2 for m in table["methods"])
    assert table["task"] == "lm" and table["metric"]["name"] == "bpb" and table["baseline"] == "ce"
    assert table["extra"]["cache"]["k"] == 4 and table["extra"]["cache"]["ratio"] > 0
    assert (out / "report" / "table.md").read_text().startswith("| method")
    # every run went through the loop and wrote its checkpoint; the study reruns from results
    assert (out / "gkd" / "seed1" / "best.pt").is_file()
    # a single student, then generation from it with and without the KV cache
    a = app().parse_args(["lm", "distill", str(recipe), "--out", str(out), "--method", "fkl", "--seed", "3", "--quiet"])
    assert a.func(a) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "fkl" and row["teacher_source"] == "sparse" and "test_kl" in row
    ck = out / "fkl" / "seed3" / "best.pt"
    outs = []
    for extra in ([], ["--no-kv-cache"]):
        a = app().parse_args(["lm", "generate", str(ck), "--prompt", "document 3:", "--max-new", "12", *extra])
        assert a.func(a) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("document 3:")
    with pytest.raises(SystemExit):  # refused while parsing, naming the flag
        app().parse_args(["lm", "generate", str(ck), "--prompt", "doc", "--max-new", "4", "--temperature", "0.8",
                          "--top-k", "0"])
    assert "argument --top-k: must be a whole number >= 1, got '0'" in capsys.readouterr().err
    # a --methods subset re-trains nothing and its table still lists every finished method
    a = app().parse_args(["lm", "ablate", str(recipe), "--out", str(out), "--methods", "ce,fkl", "--quiet"])
    assert a.func(a) == 0
    again = json.loads((out / "report" / "table.json").read_text())
    assert [m["method"] for m in again["methods"]] == ["ce", "fkl", "fkl_dense", "seqkd", "gkd"]
    key = lambda m: (m["test_kl_to_teacher_mean"], m["test_bpb_mean"])  # noqa: E731
    assert [key(m) for m in again["methods"]] == [key(m) for m in table["methods"]]


def test_bad_inputs_name_the_fix(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\ndistill: {loss: [{term: kl}]}\n")
    a = app().parse_args(["lm", "ablate", str(recipe)])
    with pytest.raises(ValueError, match="unknown LM loss term"):
        a.func(a)
    recipe.write_text("name: bad\ncorpuz: {}\n")
    with pytest.raises(ValueError, match="unknown key 'corpuz'"):
        a.func(a)
    with pytest.raises(SystemExit):  # argparse names the fix: "'a' is not a seed: ..."
        app().parse_args(["lm", "ablate", "lm/docs", "--seeds", "a"])
    a = app().parse_args(["lm", "generate", str(tmp_path / "none.pt"), "--prompt", "x"])
    with pytest.raises(Exception, match="not found"):
        a.func(a)


def test_shipped_lm_recipes_load():
    from kdlab.lm.recipe import load_lm_recipe

    from kdlab.lm.recipe import list_lm_recipes

    assert list_lm_recipes() == ["lm/arithmetic", "lm/code", "lm/docs", "lm/docs_bpe"]
    for name in list_lm_recipes():
        r = load_lm_recipe(name)
        assert r.name == name
    r = load_lm_recipe("lm/docs", ["train.epochs=1"])
    assert r.train.epochs == 1 and "gkd" in r.study.methods and r.method("gkd").distill.on_policy == 0.5


def test_arithmetic_study_tiny(tmp_path, loop):
    from kdlab.lm.recipe import lm_recipe_from_dict
    from kdlab.lm.study import run_arithmetic

    r = lm_recipe_from_dict({
        "name": "arith-tiny", "task": "arithmetic",
        "arithmetic": {"ops": ["+"], "train_digits": [1, 2], "long_digits": 3, "n_train": 60, "n_val": 10,
                       "n_test": 10, "teacher_samples": 1},
        "teacher": {"kwargs": {"d_model": 16, "n_layer": 1, "n_head": 2, "max_len": 64},
                    "train": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 16, "device": "cpu"}},
        "student": {"kwargs": {"d_model": 16, "n_layer": 1, "n_head": 2, "max_len": 64}},
        "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "device": "cpu"},
        "study": {"seeds": [0]}})
    res = run_arithmetic(r, tmp_path / "arith", log=lambda *a: None)
    names = [m["method"] for m in res["methods"]]
    assert names[0] == "teacher (traces)" and "answers" in names and "traces" in names
    assert all(0.0 <= m["em_test_mean"] <= 1.0 for m in res["methods"])
    # an untrained teacher keeps no traces: the student on teacher traces is skipped, not faked
    assert res["rejection_sampling"]["kept"] == 0 or "teacher_traces" in names


def test_shared_cli_options():
    a = app().parse_args(["lm", "ablate", "lm/docs", "--set", "train.epochs=1", "--device", "cpu",
                          "--seeds", "0-2", "--quiet"])
    from kdlab.lm.recipe import load_lm_recipe

    r = load_lm_recipe(a.recipe, lm_cli._overrides(a))
    assert a.seeds == [0, 1, 2] and r.train.epochs == 1
    assert r.train.device == "cpu" and r.teacher.train.device == "cpu"


def test_a_teacher_of_other_settings_is_refused_with_the_reason(tmp_path, loop):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.format(corpus=_corpus(tmp_path)))
    out = tmp_path / "out"
    a = app().parse_args(["lm", "train-teacher", str(recipe), "--out", str(out), "--quiet"])
    assert a.func(a) == 0
    a = app().parse_args(["lm", "train-teacher", str(recipe), "--out", str(out), "--quiet",
                          "--set", "teacher.train.steps_per_epoch=5"])
    with pytest.raises(ValueError, match=r"teacher trained with other corpus or teacher\.\* settings"):
        a.func(a)


def test_tune_an_lm_divergence_weight_on_validation_bpb(tmp_path, loop):
    """`kdlab tune` on an LM recipe: the fkl weight searched, val_bpb minimised; each trial's value
    is the best epoch's validation bpb its run recorded (the test split is not evaluated)."""
    import csv

    from kdlab.cli.main import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("task: lm\n" + TINY.format(corpus=_corpus(tmp_path)).replace(
        "distill: {top_k: 4,", "distill: {loss: [{term: ce, weight: 0.5}, {term: fkl, weight: 0.5}], top_k: 4,"))
    out = tmp_path / "tune"
    assert main(["tune", str(recipe), "--param", "distill.loss.fkl.weight=log:0.1:2", "--trials", "2",
                 "--out", str(out), "--pruner", "none", "--quiet"]) == 0
    summary = json.loads((out / "tune.json").read_text())
    assert summary["metric"] == "val_bpb" and summary["direction"] == "minimize"
    with open(out / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert float(trials[0]["param:distill.loss.fkl.weight"]) == 0.5  # the recipe's own value first
    for t in trials:
        res = json.loads((Path(t["run_dir"]) / "result.json").read_text())
        assert float(t["value"]) == res["val_bpb"] and "test_bpb" not in res
        rec = json.loads((Path(t["run_dir"]) / "run.json").read_text())["recipe"]
        assert rec["distill"]["loss"][1] == {"term": "fkl", "weight": float(t["param:distill.loss.fkl.weight"])}
    assert summary["best_value"] == min(float(t["value"]) for t in trials)
