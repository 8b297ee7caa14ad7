"""The diffusion task end to end at toy size: a teacher run and a progressive chain through the one
Trainer, scores with the feature network's hash, a chain that resumes where it stopped, and the bad
inputs (a step count that is not a power of two, an empty log-SNR range, a feature network of
another data set), each one line."""

import json
import math

import pytest
import torch

from kdlab.cli.main import main
from kdlab.core.checkpoint import file_hash

TINY = {"epochs": 1, "batch_size": 32, "lr": 1e-3, "optimizer": "adamw", "patience": None, "seed": 0,
        "device": "cpu", "eval_batch_size": 200}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A digits classifier file (cnn_tiny, untrained weights: any fixed network serves as the
    feature network of these tests)."""
    from kdlab.core.checkpoint import atomic_save, model_checkpoint
    from kdlab.models import create_model

    out = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    m = create_model("cnn_tiny", num_classes=10, in_channels=1)
    atomic_save(model_checkpoint(m, model_name="cnn_tiny", model_kwargs={}, num_classes=10, in_channels=1,
                                 dataset="digits"), out / "best.pt")
    return out / "best.pt"


def _recipes(tmp_path, classifier, **distill):
    teacher = {"name": "tiny-teacher", "task": "diffusion", "data": {"name": "digits"},
               "model": {"channels": 4, "channel_mults": [1], "blocks": 1}, "train": TINY, "steps_per_epoch": 2,
               "sampler": {"steps": 4}, "eval": {"samples": 40, "knn_k": 2,
                                                 "features": {"recipe": "digits/teacher", "checkpoint": str(classifier)}}}
    (tmp_path / "t.yaml").write_text(json.dumps(teacher))
    dist = {"extends": "t.yaml", "name": "tiny-progressive",
            "distill": {"teacher": "t.yaml", "start_steps": 4, "end_steps": 1, **distill}}
    (tmp_path / "d.yaml").write_text(json.dumps(dist))
    return tmp_path / "t.yaml", tmp_path / "d.yaml"


def test_chain_trains_scores_and_resumes(tmp_path, classifier):
    from kdlab.tasks.diffusion_runs import load_denoiser, load_diffusion_recipe
    from kdlab.tasks.diffusion_runs import run_chain

    torch.set_num_threads(1)
    _, d = _recipes(tmp_path, classifier)
    r = load_diffusion_recipe(d)
    assert r.distill.rounds() == [2, 1]
    out = tmp_path / "chain"
    s = run_chain(r, out, progress=False, log=lambda *a: None)
    assert [x["steps"] for x in s["rounds"]] == [2, 1]
    res = s["student"]
    for k in ("val_fd", "test_fd", "test_coverage", "test_precision", "test_recall", "val_loss", "test_loss"):
        assert k in res and res[k] == res[k]  # present and not NaN
    assert res["feature_net_sha256"] == file_hash(classifier) and res["n_test_samples"] == 40
    assert 0.0 <= res["test_coverage"] <= math.log2(10) + 1e-9  # bits
    # each round: its own Trainer run, the student's step count and teacher recorded in the identity
    ident = json.loads((out / "steps001" / "run.json").read_text())["recipe"]["round"]
    assert ident["steps"] == 1 and ident["teacher_checkpoint"].endswith("steps002/best.pt")
    assert ident["teacher_sha256"] == file_hash(out / "steps002" / "best.pt")
    den, ck = load_denoiser(out / "steps001" / "best.pt")
    assert ck["diffusion"]["steps"] == 1 and ck["dataset"] == "digits"
    # interrupted after the first round: the finished round is kept, the missing one trained again
    before = file_hash(out / "steps002" / "best.pt")
    last = json.loads((out / "steps001" / "result.json").read_text())
    import shutil

    shutil.rmtree(out / "steps001")
    (out / "chain.json").unlink()
    s2 = run_chain(r, out, progress=False, log=lambda *a: None)
    assert file_hash(out / "steps002" / "best.pt") == before
    assert s2["student"]["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6)  # same seed, same run
    assert s2["student"]["test_fd"] == pytest.approx(last["test_fd"], rel=1e-6)
    # the step-count evaluation: the teacher's DDIM at 4, 2, 1 steps and the students at 2, 1, timed
    from kdlab.evaluate.generative import FeatureNet
    from kdlab.experiments.paradigms.progressive import evaluate_chain, write_report

    from kdlab.tasks.diffusion_runs import load_data

    info = load_data(r).info
    fnet = FeatureNet(classifier, "digits", info.mean, info.std)
    ev0 = evaluate_chain(r, out, fnet, log=lambda *a: None)
    assert not ev0["timed"] and "s_per_image" not in ev0["rows"][0]
    ev = evaluate_chain(r, out, fnet, timing=True, log=lambda *a: None)  # timings added to the cached scores
    assert ev["timed"] and [x["fd"] for x in ev["rows"]] == [x["fd"] for x in ev0["rows"]]
    got = sorted((row["sampler"], row["steps"]) for row in ev["rows"])
    assert got == [("distilled", 1), ("distilled", 2), ("teacher-ddim", 1), ("teacher-ddim", 2), ("teacher-ddim", 4)]
    assert all(row["s_per_image"] > 0 for row in ev["rows"])
    # the distilled 1-step sampler's score equals its round's own test score (same noise, same network)
    d1 = next(row for row in ev["rows"] if row["sampler"] == "distilled" and row["steps"] == 1)
    assert d1["fd"] == pytest.approx(s2["student"]["test_fd"], rel=1e-9)
    rep = write_report(r, [ev], tmp_path / "rep", log=lambda *a: None)
    md = (tmp_path / "rep" / "fd_vs_steps.md").read_text()
    assert "| 4 |" in md and "s/image" in md and (tmp_path / "rep" / "fd_vs_steps.png").is_file()
    assert rep["table"][0]["steps"] == 4 and "distilled_fd_mean" not in rep["table"][0]


def test_distilled_student_starts_as_its_teacher(tmp_path, classifier):
    # a round of zero learning rate leaves the student equal to its teacher
    from kdlab.tasks.diffusion_runs import load_denoiser, load_diffusion_recipe, train_run

    t, d = _recipes(tmp_path, classifier)
    tr = load_diffusion_recipe(t)
    train_run(tr, tmp_path / "T", progress=False, log=lambda *a: None)
    # the recipe's model section does not change a round's architecture: the student is its teacher
    r = load_diffusion_recipe(d, ["train.lr=1e-12", "model.channels=8"])
    train_run(r, tmp_path / "S", teacher_checkpoint=tmp_path / "T" / "best.pt", steps=2,
              init_checkpoint=tmp_path / "T" / "best.pt", progress=False, log=lambda *a: None)
    # a distill recipe with another schedule than its teacher's is refused
    bad = load_diffusion_recipe(d, ["schedule.logsnr_min=-10"])
    with pytest.raises(ValueError, match="give the distill recipe the same schedule and prediction"):
        train_run(bad, tmp_path / "B", teacher_checkpoint=tmp_path / "T" / "best.pt", steps=2,
                  progress=False, log=lambda *a: None)
    a, _ = load_denoiser(tmp_path / "T" / "best.pt")
    b, _ = load_denoiser(tmp_path / "S" / "best.pt")
    for (n, p), (_, q) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), n


@pytest.mark.parametrize("override,needle", [
    ("distill.start_steps=48", "48 is not a power of two; progressive distillation halves the step count"),
    ("distill.end_steps=3", "3 is not a power of two"),
    ("schedule.logsnr_max=-20", "log-SNR range is zero or negative"),
    ("schedule.logsnr_min=20", "log-SNR range is zero or negative"),
])
def test_bad_recipe_values_are_one_line(tmp_path, classifier, capsys, override, needle):
    _, d = _recipes(tmp_path, classifier)
    out = tmp_path / "o"
    rc = main(["diffusion", "train", str(d), "--set", override, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("kdlab: error:") and needle in err
    assert not out.exists()  # nothing written


def test_feature_network_of_another_dataset_is_refused(classifier):
    from kdlab.evaluate.generative import FeatureNet

    with pytest.raises(ValueError, match=r"trained on 'digits', not 'mnist5k'; give a mnist5k classifier"):
        FeatureNet(classifier, "mnist5k", (0.5,), (0.5,))


def test_feature_network_mismatch_through_the_cli(tmp_path, classifier, capsys):
    _, d = _recipes(tmp_path, classifier)
    rc = main(["diffusion", "study", str(d), "--seeds", "0", "--set", "data.name=mnist5k", "--set",
               "data.val_fraction=0.5", "--out", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "trained on 'digits', not 'mnist5k'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()  # refused before anything is trained


def test_task_plugin_contract(tmp_path, classifier):
    from kdlab.tasks import get_task

    task = get_task("diffusion")
    assert task.primary == "fd" and task.metric("fd").direction == "min" and task.monitor() == ("loss", "min")
    _, d = _recipes(tmp_path, classifier)
    r = task.load_recipe(str(d))
    methods = task.ablation_methods(r)
    assert list(methods) == ["ddim-1", "progressive-1"]
    assert methods["ddim-1"].sampler.steps == 1 and methods["ddim-1"].distill is None


def test_diffusers_backend_runs_the_same_chain(tmp_path, classifier):
    pytest.importorskip("diffusers")
    from kdlab.tasks.diffusion_runs import load_denoiser, load_diffusion_recipe
    from kdlab.tasks.diffusion_runs import run_chain

    t, d = _recipes(tmp_path, classifier)
    for p in (t,):
        raw = json.loads(p.read_text())
        raw["model"] = {"backend": "diffusers", "channels": 8, "channel_mults": [1, 2], "blocks": 1}
        p.write_text(json.dumps(raw))
    r = load_diffusion_recipe(d, ["distill.end_steps=2", "eval.samples=20"])
    assert r.model.backend == "diffusers" and r.to_dict()["model"]["backend"] == "diffusers"
    s = run_chain(r, tmp_path / "c", progress=False, log=lambda *a: None)  # the teacher and one round
    den, ck = load_denoiser(tmp_path / "c" / "steps002" / "best.pt")
    assert ck["model_name"] == "diffusers" and type(den.net).__name__ == "DiffusersUNet"
    assert ck["model_kwargs"]["sample_size"] == 8
    assert s["student"]["test_fd"] == s["student"]["test_fd"]


def test_cli_trains_a_teacher_recipe(tmp_path, classifier, capsys):
    t, _ = _recipes(tmp_path, classifier)
    out = tmp_path / "teacher_run"
    assert main(["diffusion", "train", str(t), "--out", str(out), "--quiet", "--seed", "3"]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["seed"] == 3 and res["steps"] == 4 and res["task"] == "diffusion" and "test_fd" in res
    assert "test FD" in capsys.readouterr().out
    # run again: the finished run is reused, not trained again
    before = (out / "best.pt").stat().st_mtime_ns
    assert main(["diffusion", "train", str(t), "--out", str(out), "--quiet", "--seed", "3"]) == 0
    assert (out / "best.pt").stat().st_mtime_ns == before


def test_set_train_epochs_bounds_the_teacher_trained_on_the_way(tmp_path, classifier, capsys):
    """As for classification (`kdlab ablate --help`): `--set train.epochs=N` also bounds the epochs of
    the teacher that a distill recipe trains on the way; without it the teacher recipe's own count."""
    from kdlab.tasks.diffusion_runs import load_diffusion_recipe, teacher_recipe

    t, d = _recipes(tmp_path, classifier)
    raw = json.loads(t.read_text())
    raw["train"] = {**TINY, "epochs": 3}
    t.write_text(json.dumps(raw))
    assert teacher_recipe(load_diffusion_recipe(d)).train.epochs == 3
    assert teacher_recipe(load_diffusion_recipe(d, ["train.epochs=2"])).train.epochs == 2
    assert teacher_recipe(load_diffusion_recipe(d, ["train.epochs=5"])).train.epochs == 3  # a bound only
    assert teacher_recipe(load_diffusion_recipe(d, ["train.epochs=2", "distill.teacher_epochs=3"])).train.epochs == 3
    torch.set_num_threads(1)
    out = tmp_path / "o"
    assert main(["diffusion", "train", str(d), "--set", "train.epochs=1", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "teacher" / "result.json").read_text())["epochs_run"] == 1
