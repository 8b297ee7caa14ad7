"""kdlab tune: search spaces, workers sharing one journal, pruning, killed trials, outputs."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

import kdlab
from kdlab.experiments.tune import (ParamSpec, make_spec, parse_param, set_path, tune,
                                    with_values)
from kdlab.train.build import train
from kdlab.train.recipe import load_recipe

RECIPE = """
name: tune-test
data: {{name: digits, label_fraction: {frac}}}
student: {{model: cnn_tiny}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, device: cpu, patience: null}}
loss: [{{term: ce}}]
"""


def _recipe(tmp_path, epochs=2, frac=1.0, extra=""):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(epochs=epochs, frac=frac) + extra)
    return str(p)


def _trials(out, name="tune-test-tune"):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(Path(out) / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


quiet = dict(log=lambda *a: None)


def test_parse_param_forms():
    assert parse_param("loss.align.weight=log:0.01:10") == ParamSpec("loss.align.weight", "float", 0.01, 10.0, True)
    assert parse_param("loss.kd.T=2:8") == ParamSpec("loss.kd.T", "float", 2.0, 8.0)
    assert parse_param("loss.kd.T=2:8:0.5") == ParamSpec("loss.kd.T", "float", 2.0, 8.0, step=0.5)
    assert parse_param("train.batch_size=int:log:16:256") == ParamSpec("train.batch_size", "int", 16, 256, True)
    assert parse_param("loss.align.form=contrastive|cosine").choices == ("contrastive", "cosine")
    assert parse_param("train.lr=0.1|0.01").choices == (0.1, 0.01)  # values read as YAML
    for bad, msg in [("loss.kd.T", "path=range"), ("loss.kd.T=8:2", "must be below"),
                     ("loss.kd.T=log:0:1", "low > 0"), ("x.y=int:1.5:3", "whole numbers"),
                     ("x.y=a:b", "not a range"), ("x.y=1:2:3:4", "low:high")]:
        with pytest.raises(ValueError, match=msg):
            parse_param(bad)


def test_values_go_to_the_named_loss_term():
    base = load_recipe("digits/full")
    r = with_values(base, {"loss.align.weight": 2.5, "loss.kd.T": 3.0, "loss.0.weight": 0.2, "train.lr": 0.01})
    by = {t.term: t for t in r.loss}
    assert by["align"].weight == 2.5 and by["kd"].params["T"] == 3.0 and by["ce"].weight == 0.2
    assert r.train.lr == 0.01 and by["attn"].weight == base.loss[3].weight
    raw = base.to_dict()
    with pytest.raises(KeyError, match="no 'dkd' loss term"):
        set_path(raw, "loss.dkd.weight", 1.0)
    with pytest.raises(KeyError, match="loss.<term>.<key>"):
        set_path(raw, "loss.kd", 1.0)


def test_spec_errors(tmp_path):
    r = _recipe(tmp_path)
    with pytest.raises(ValueError, match="nothing to search"):
        make_spec(r)
    with pytest.raises(ValueError, match="test split is kept out"):
        make_spec(r, params=["train.lr=0.01:0.1"], metric="test_acc")
    with pytest.raises(KeyError, match="no 'kd' loss term"):
        make_spec(r, params=["loss.kd.T=2:8"])


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(kdlab.__file__).parents[1]), "OMP_NUM_THREADS": "1"}


def test_two_workers_share_one_journal_then_paired_study(tmp_path):
    r = _recipe(tmp_path, epochs=4, extra="tune: {params: {train.lr: 'log:0.001:0.3'}, pruner: none}\n")
    out = tmp_path / "search"
    kw = dict(params=["train.momentum=0.5|0.9"], trials=4, out_dir=str(out), startup_trials=2)
    # worker 1: `kdlab tune ... --worker` in another process; worker 2: this process, once 1 has a trial
    code = f"from kdlab.experiments.tune import tune; tune({r!r}, worker=True, **{kw!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env())
    t0 = time.time()
    while time.time() - t0 < 180 and proc.poll() is None:
        try:
            if any(t.state.name == "RUNNING" for t in _trials(out)):
                break
        except (KeyError, FileNotFoundError):
            pass  # the study is not there yet
        time.sleep(0.1)
    s = tune(r, then_study=2, **kw, **quiet)
    assert proc.wait(timeout=300) == 0
    trials = _trials(out)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # 4 distinct trials
    assert {t.user_attrs["pid"] for t in trials} == {proc.pid, os.getpid()}  # ...run by both workers
    assert s["best_value"] == max(t.value for t in trials)
    for f in ("best.yaml", "trials.csv", "importances.csv", "tune.json", "history.png", "parallel.png"):
        assert (out / f).stat().st_size > 0
    assert len((out / "trials.csv").read_text().splitlines()) == 5
    # no trial evaluated the test split
    for t in trials:
        res = json.loads((Path(t.user_attrs["run_dir"]) / "result.json").read_text())
        assert "val_acc" in res and not any(k.startswith("test_") for k in res)
    best = load_recipe(out / "best.yaml")  # a ready recipe...
    assert best.name == "tune-test-tuned" and best.train.lr == pytest.approx(s["best_params"]["train.lr"])
    res = train(best.derive(train={**best.train.model_dump(), "epochs": 1}), tmp_path / "best", progress=False)
    assert 0.0 <= res["test_acc"] <= 1.0  # ...that trains
    # then the paired study on the test split: tuned vs untuned over seeds 0 and 1
    rows = {m["method"]: m for m in s["study_report"]["methods"]}
    acc = {m: [json.loads((out / "study" / m / f"seed{k}" / "result.json").read_text())["test_acc"]
               for k in (0, 1)] for m in ("untuned", "tuned")}
    want = ((acc["tuned"][0] - acc["untuned"][0]) + (acc["tuned"][1] - acc["untuned"][1])) / 2
    d = [acc["tuned"][k] - acc["untuned"][k] for k in (0, 1)]
    assert rows["tuned"]["diff_vs_untuned"] == pytest.approx(want)
    # 95% paired t interval, 1 degree of freedom (t = 12.706): t * sd(d) / sqrt(2), sd(d) = |d0-d1|/sqrt(2)
    assert rows["tuned"]["diff_vs_untuned_ci95"] == pytest.approx(12.7062 * abs(d[0] - d[1]) / 2, rel=1e-4, abs=1e-12)
    # the same settings resume (nothing left to do); other settings are refused
    assert tune(r, params=["train.momentum=0.5|0.9"], trials=4, out_dir=str(out), startup_trials=2,
                **quiet)["trials"] == {"COMPLETE": 4}
    with pytest.raises(ValueError, match="created with other settings"):
        tune(r, params=["train.momentum=0.5|0.8"], trials=4, out_dir=str(out), startup_trials=2, **quiet)


def test_pruned_trial_stops_early_and_the_study_goes_on(tmp_path):
    r = _recipe(tmp_path, epochs=4)
    kw = dict(params=["train.lr=0.05|0.000001"], out_dir=str(tmp_path / "s"), startup_trials=1,
              warmup_epochs=1, pruner="median", **quiet)
    tune(r, trials=1, **kw)  # trial 0: the recipe's own lr 0.05
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "s" / "study.journal")))
    optuna.load_study(study_name="tune-test-tune", storage=storage).enqueue_trial({"train.lr": 0.000001})
    tune(r, trials=3, **kw)  # resumes: trial 1 (lr 1e-6 learns nothing) is pruned, trial 2 still runs
    t = _trials(tmp_path / "s")
    assert [x.state.name for x in t[:2]] == ["COMPLETE", "PRUNED"] and len(t) == 3
    assert t[0].params == {"train.lr": 0.05}  # the recipe's own value is trial 0
    assert t[2].state.name in ("COMPLETE", "PRUNED")
    metrics = (Path(t[1].user_attrs["run_dir"]) / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 2  # header + epoch 1: stopped after its first (prunable) epoch
    assert not (Path(t[1].user_attrs["run_dir"]) / "result.json").exists()


def test_killed_worker_trial_fails_and_the_study_resumes(tmp_path):
    r = _recipe(tmp_path, epochs=60, frac=0.1)
    out = tmp_path / "k"
    env = _env()
    code = (f"from kdlab.experiments.tune import tune; tune({r!r}, params=['train.lr=log:0.01:0.1'], "
            f"trials=1, out_dir={str(out)!r}, worker=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    last = out / "trials" / "trial_0000" / "last.pt"
    t0 = time.time()
    while not last.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (last.parent / "result.json").exists()  # killed mid-trial
    assert _trials(out)[0].state.name == "RUNNING"
    tune(r, params=["train.lr=log:0.01:0.1"], trials=1, out_dir=str(out), **quiet)
    t = _trials(out)
    assert t[0].state.name == "FAIL" and t[0].user_attrs["failed_because"] == "its worker process is gone"
    assert t[1].state.name == "COMPLETE" and t[1].user_attrs["retry_of"] == 0
    assert t[1].params == t[0].params and t[1].user_attrs["run_dir"] == t[0].user_attrs["run_dir"]
    rows = (last.parent / "metrics.csv").read_text().splitlines()[1:]
    assert [int(x.split(",")[0]) for x in rows] == list(range(1, 61))  # resumed, not restarted twice
    assert len(t[1].intermediate_values) == 60  # the retry re-reported the dead trial's epochs


def test_sqlite_storage_and_cli(tmp_path, capsys):
    from kdlab.cli.tune import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())  # the lead adds `tune` to kdlab.cli.main.COMMANDS
    r = _recipe(tmp_path, epochs=1, frac=0.1)
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    args = p.parse_args(["tune", r, "--param", "train.lr=log:0.01:0.1", "--trials", "2", "--storage", url,
                         "--out", str(tmp_path / "cli"), "--quiet"])
    assert args.func(args) == 0
    assert "best trial" in capsys.readouterr().out
    study = optuna.load_study(study_name="tune-test-tune", storage=url)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
    assert load_recipe(tmp_path / "cli" / "best.yaml").train.lr in [t.params["train.lr"] for t in study.get_trials()]
