"""Issue 30, a study's overhead: work a study repeated without need is done once, with the same
results, and every part of a run's time outside its training loop is recorded."""

import json

import torch

from kdlab.models import create_model
from kdlab.train.recipe import recipe_from_dict

KD = [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0}]


def _recipe(epochs=3, fast=False, mode="cache-fp16"):
    return recipe_from_dict({
        "name": "overhead-test", "data": {"name": "digits", "val_fraction": 0.2, "label_fraction": 0.2},
        "student": {"model": "cnn_tiny"}, "teacher": {"model": "cnn_tiny"},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "device": "cpu", "teacher_mode": mode,
                  "fast_teacher": fast, "patience": None},
        "loss": KD,
    }, "test")


def _teacher():
    torch.manual_seed(7)
    return create_model("cnn_tiny", num_classes=10, in_channels=1).eval()


def test_final_validation_reuses_the_best_epochs_own(tmp_path):
    """The final evaluation validates best.pt's weights, which this process validated when it saved
    them: that validation is reused (one evaluation of the validation split per epoch, none more),
    and its numbers equal a fresh evaluation of best.pt exactly."""
    from kdlab.core.checkpoint import load_checkpoint
    from kdlab.train.build import build_run, trainer_for

    run = build_run(_recipe(), teacher=_teacher())
    tr = trainer_for(run, tmp_path / "r", progress=False)
    calls = []
    evaluate = run.objective.evaluate
    run.objective.evaluate = lambda n, loader: calls.append(loader) or evaluate(n, loader)
    res = tr.fit()
    assert sum(l is run.val_loader for l in calls) == 3  # the 3 epochs' validations only
    assert sum(l is run.test_loader for l in calls) == 1
    fresh = create_model("cnn_tiny", num_classes=10, in_channels=1)
    fresh.load_state_dict(load_checkpoint(tmp_path / "r" / "best.pt")["model"])
    from kdlab.evaluate.accuracy import evaluate as plain

    want = plain(fresh, run.val_loader)
    assert (res["val_acc"], res["val_loss"]) == (want["acc"], want["loss"])
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def test_best_validation_is_not_reused_for_another_epoch_or_device(tmp_path):
    from kdlab.train.build import build_run, trainer_for

    run = build_run(_recipe(epochs=1), teacher=_teacher())
    tr = trainer_for(run, tmp_path / "r", progress=False)
    tr.state.best = {"student": [0.5, 2]}
    tr._val_of_best = {"student": (1, {"acc": 0.5, "loss": 1.0, "n": 10})}
    assert tr._best_validation("student") is None  # best epoch 2, validated epoch 1: evaluate again
    tr._val_of_best = {"student": (2, {"acc": 0.5, "loss": 1.0, "n": 10})}
    assert tr._best_validation("student") == {"acc": 0.5, "loss": 1.0, "n": 10}
    tr.runtime.device = torch.device("meta")  # not the CPU: kernels may differ, evaluated again
    assert tr._best_validation("student") is None


def test_result_names_setup_probe_and_checkpoint_time(tmp_path):
    from kdlab.train.build import train

    res = train(_recipe(epochs=2), tmp_path / "r", teacher=_teacher(), progress=False)
    stored = json.loads((tmp_path / "r" / "result.json").read_text())
    for r in (res, stored):
        assert r["setup_time_s"] >= r["setup_teacher_time_s"] > 0  # the probe ran the teacher once
        assert r["setup_mask_time_s"] == 0  # KD computes no masks
        assert r["checkpoint_time_s"] > 0


def test_teacher_fingerprint_is_computed_once_while_the_weights_stay(monkeypatch):
    import kdlab.distill.teachers as T

    t = _teacher()
    calls = []
    real = T.tensor_fingerprint
    monkeypatch.setattr(T, "tensor_fingerprint", lambda *a: calls.append(1) or real(*a))
    a = T.module_fingerprint(t)
    assert T.module_fingerprint(t) == a and len(calls) == 1
    with torch.no_grad():
        next(t.parameters()).add_(1.0)  # changed in place: hashed again
    b = T.module_fingerprint(t)
    assert b != a and len(calls) == 2
    assert b == real(*[v for _, v in sorted(t.state_dict().items())])
    t.load_state_dict(_teacher().state_dict())  # back to the first weights
    assert T.module_fingerprint(t) == a and len(calls) == 3


def test_git_commit_is_asked_once_per_process():
    from kdlab.train.run_folder import git_commit

    git_commit.cache_clear()
    first = git_commit()
    assert git_commit() == first
    info = git_commit.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_fast_teacher_runs_a_channels_last_copy_on_the_cpu():
    """train.fast_teacher (opt-in) runs the folded copy in channels-last on the CPU too; with it off
    and channels_last off the teacher runs as loaded (a default run's numbers are unchanged)."""
    from kdlab.train.build import build_run

    t = _teacher()
    fast = build_run(_recipe(fast=True), teacher=t).objective.teacher.teacher
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert fast is not t and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # folded
    plain = build_run(_recipe(fast=False), teacher=t).objective.teacher.teacher
    assert plain is t


def test_last_checkpoint_keeps_the_best_epochs_weights(tmp_path):
    """last.pt keeps a copy of best.pt (to rebuild it when it is lost): on the CPU too it holds the
    weights of the best epoch, not the weights training moved on to."""
    from kdlab.train.build import build_run, trainer_for

    run = build_run(_recipe(epochs=1), teacher=_teacher())
    tr = trainer_for(run, tmp_path / "r", progress=False)
    tr.save_best("student", 1, {})
    saved = {k: v.clone() for k, v in run.objective.student.state_dict().items()}
    with torch.no_grad():
        for p in run.objective.student.parameters():
            p.add_(1.0)  # training moves on
    tr.save_last()
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=False)["best"]["student"]["model"]
    assert all(torch.equal(last[k], saved[k]) for k in saved)
    k = next(k for k, v in saved.items() if v.is_floating_point())
    assert not torch.equal(last[k], run.objective.student.state_dict()[k])  # the weights did move on
