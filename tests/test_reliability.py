"""Issue 11: nothing lost, nothing half-done. One test (or more) per numbered reproduction, plus the
run lock, threads and deterministic mode. Runs are tiny (cnn_tiny on digits, 1-2 epochs)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from kdlab.core.checkpoint import load_checkpoint
from kdlab.core.lock import RunLock, RunLockedError, is_locked
from kdlab.train.build import train
from kdlab.train.recipe import load_recipe

from reliab_fixtures import clone, run_cli, snapshot, spawn, wait_line, write_recipes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-epoch teacher (``teacher/``) and a finished 1-epoch KD student (``student/``)."""
    root = tmp_path_factory.mktemp("reliab")
    t, s = write_recipes(root)
    rc = __import__("kdlab.cli.main", fromlist=["main"]).main(
        ["distill", str(s), "--out", str(root / "student"), "--quiet"])
    assert rc == 0
    return root


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _weights(path):
    return load_checkpoint(path)["model"]


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- 1. half-trained teacher
def test_killed_teacher_is_resumed_not_used(tmp_path, capsys):
    """kill -9 a teacher run after its first metrics row; distilling from it resumes the teacher to
    its last epoch, and the resumed teacher equals an uninterrupted one bit for bit."""
    t, s = write_recipes(tmp_path, teacher_epochs=2, ckpt=str(tmp_path / "X" / "best.pt"))
    # the child trains the teacher and stops (sleeps) after writing epoch 1, then gets SIGKILL
    code = f"""
import time
from kdlab.train import trainer
orig = trainer.Trainer.save_last
def slow(self):
    orig(self)
    from kdlab.core.io import write_csv
    write_csv(self.run_dir / 'metrics.csv', self.state.history)
    print('epoch', self.state.epoch, flush=True)
    time.sleep(600)
trainer.Trainer.save_last = slow
from kdlab.cli.main import main
main(['train-teacher', {str(t)!r}, '--out', {str(tmp_path / 'X')!r}, '--quiet'])
"""
    child = spawn(code, tmp_path)
    try:
        assert _wait_for(lambda: (tmp_path / "X" / "metrics.csv").exists())
        time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (tmp_path / "X" / "result.json").exists()
    assert len((tmp_path / "X" / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child trained epoch 1 with one thread: bit-identity needs the same
    try:
        rc, out, err = run_cli(["distill", s, "--out", tmp_path / "S", "--quiet",
                                "--set", f"teacher.checkpoint={tmp_path / 'X' / 'best.pt'}",
                                "--set", f"teacher.recipe={t}"], capsys)
        assert rc == 0, err
        assert "training teacher" in out and "unfinished" in out
        res = json.loads((tmp_path / "X" / "result.json").read_text())
        assert res["epochs_run"] == 2
        # reference: the same teacher recipe trained without interruption
        ref = train(load_recipe(t), tmp_path / "ref", progress=False, method="teacher")
    finally:
        torch.set_num_threads(threads)
    assert res["test_acc"] == ref["test_acc"] and res["val_loss"] == ref["val_loss"]
    assert _same_weights(tmp_path / "X" / "best.pt", tmp_path / "ref" / "best.pt")


def test_teacher_finished_rules(tmp_path):
    from kdlab.train.build import teacher_finished

    ck = tmp_path / "run" / "best.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    assert teacher_finished(ck)  # a lone file
    (tmp_path / "run" / "run.json").write_text("{}")
    assert not teacher_finished(ck)  # a run folder without result.json: unfinished
    (tmp_path / "run" / "result.json").write_text("{}")
    assert teacher_finished(ck)
    assert not teacher_finished(tmp_path / "run" / "nothing.pt")


# ---------------------------------------------------------------- 2. run lock
def test_second_process_is_refused_and_a_killed_holder_leaves_no_stuck_lock(base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    child = spawn(f"""
from kdlab.core.lock import RunLock
RunLock({str(out)!r}).acquire()
print('locked', flush=True)
import time; time.sleep(600)
""", tmp_path)
    try:
        assert wait_line(child, b"locked")
        assert is_locked(out)
        before = snapshot(out)
        rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet",
                              "--set", "train.lr=0.2"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1
        assert "in use by another kdlab process" in err and f"pid {child.pid}" in err
        assert snapshot(out) == before and not (out / "result.json").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not is_locked(out) and (out / ".kdlab.lock").exists()  # a stale file, not a stuck lock
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    assert not (out / ".kdlab.lock").exists()  # a clean release removes it


def test_two_runs_with_different_lr_never_share_a_folder(base, tmp_path, capsys):
    """The second run refuses while the first runs (lock), and refuses afterwards too (a finished run
    of another recipe), so neither result is overwritten."""
    out = clone(base / "student", tmp_path / "s")
    res = (out / "result.json").read_bytes()
    with RunLock(out):  # this process is "the first run" while it holds the folder
        with pytest.raises(RunLockedError):
            _other_process_lock(out)
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet",
                          "--set", "train.lr=0.2"], capsys)
    assert rc == 2 and "different recipe" in err and (out / "result.json").read_bytes() == res


def _other_process_lock(folder):
    """Raise RunLockedError as another process would see it (the lock is re-entrant in-process)."""
    import subprocess
    import sys

    from reliab_fixtures import python_env

    r = subprocess.run([sys.executable, "-c", f"from kdlab.core.lock import RunLock; RunLock({str(folder)!r}).acquire()"],
                       env=python_env(), capture_output=True, text=True)
    if "RunLockedError" in r.stderr:
        raise RunLockedError(r.stderr.strip().splitlines()[-1])


def test_lock_is_reentrant_in_process_and_released(tmp_path):
    a = RunLock(tmp_path / "r").acquire()
    b = RunLock(tmp_path / "r").acquire()
    b.release()
    assert (tmp_path / "r" / ".kdlab.lock").read_text() == str(os.getpid())
    a.release()
    assert not (tmp_path / "r" / ".kdlab.lock").exists()
    with RunLock(tmp_path / "r"):
        assert (tmp_path / "r" / ".kdlab.lock").exists()


# ---------------------------------------------------------------- 3. corrupt files of a finished run
@pytest.mark.parametrize("name,garbage", [("best.pt", b"not a zip"), ("metrics.csv", b"epoch,loss\n1,0.5\n2,"),
                                          ("result.json", b""), ("run.json", b"{\"recipe\": ")])
def test_corrupt_file_of_finished_run_is_named_and_the_fix_works(base, tmp_path, capsys, name, garbage):
    out = clone(base / "student", tmp_path / "s")
    ref = json.loads((out / "result.json").read_text())
    (out / name).write_bytes(garbage)
    before = snapshot(out)
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(out / name) in err and "delete it and re-run" in err
    assert snapshot(out) == before
    (out / name).unlink()  # the advice, as written
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    res = json.loads((out / "result.json").read_text())
    assert res["test_acc"] == ref["test_acc"] and res["val_loss"] == ref["val_loss"]
    assert _same_weights(out / "best.pt", base / "student" / "best.pt")
    assert (out / name).exists()


# ---------------------------------------------------------------- 4. deleted best.pt, stale result.json
def test_train_teacher_rebuilds_a_deleted_best_pt(base, tmp_path, capsys):
    out = clone(base / "teacher", tmp_path / "t")
    (out / "best.pt").unlink()
    rc, o, err = run_cli(["train-teacher", base / "teacher.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    assert "rebuilt it from last.pt" in err
    assert _same_weights(out / "best.pt", base / "teacher" / "best.pt")


def test_deleted_best_pt_without_last_pt_is_a_clear_error(base, tmp_path, capsys):
    out = clone(base / "teacher", tmp_path / "t")
    (out / "best.pt").unlink()
    (out / "last.pt").unlink()
    rc, o, err = run_cli(["train-teacher", base / "teacher.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 2 and "missing" in err and f"delete the folder {out}" in err
    assert "checkpoint:" not in o


# ---------------------------------------------------------------- 5. corrupt best.pt after the last epoch
def test_corrupt_best_pt_of_an_unfinished_run_advice_works(base, tmp_path, capsys):
    """The run was killed after its last epoch but before result.json, and best.pt got corrupted."""
    out = clone(base / "student", tmp_path / "s")
    (out / "result.json").unlink()
    (out / "best.pt").write_bytes(b"\0" * 100)
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 2 and "delete it and re-run" in err and str(out / "best.pt") in err
    (out / "best.pt").unlink()
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads((out / "result.json").read_text())["test_acc"] == \
        json.loads((base / "student" / "result.json").read_text())["test_acc"]


# ---------------------------------------------------------------- 6. kill -9 during a checkpoint write
def test_tmp_files_of_a_killed_write_are_cleaned(base, tmp_path, capsys):
    out = tmp_path / "s"
    code = f"""
import time, torch
from kdlab.core import checkpoint
real = torch.save
def torn(obj, f, *a, **k):
    f.write(b'PK partial')
    f.flush()
    print('writing', flush=True)
    time.sleep(600)
checkpoint.torch.save = torn
from kdlab.cli.main import main
main(['distill', {str(base / 'student.yaml')!r}, '--out', {str(out)!r}, '--quiet'])
"""
    child = spawn(code, tmp_path)
    try:
        assert wait_line(child, b"writing")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    tmps = list(out.glob("*.tmp"))
    assert tmps, "the killed writer left no temporary file"
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    assert not list(out.rglob("*.tmp"))
    assert _same_weights(out / "best.pt", base / "student" / "best.pt")


# ---------------------------------------------------------------- 7. non-finite validation loss
def test_nan_validation_stops_the_run(base, tmp_path, capsys):
    out = tmp_path / "s"
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet",
                          "--set", "train.lr=1e6"], capsys)
    assert rc == 2 and "non-finite" in err and len(err.strip().splitlines()) == 1
    assert not (out / "result.json").exists()


def test_nan_validation_alone_stops_the_run(tmp_path, monkeypatch):
    """A finite training loss with a NaN validation loss (evaluate patched) stops too."""
    from kdlab.train import objective, trainer

    t, _ = write_recipes(tmp_path)
    orig = objective.DistillObjective.evaluate

    def nan_eval(self, name, loader):
        out = orig(self, name, loader)
        return {**out, "loss": float("nan")}

    monkeypatch.setattr(objective.DistillObjective, "evaluate", nan_eval)
    with pytest.raises(trainer.TrainingError, match="validation loss became non-finite in epoch 1"):
        train(load_recipe(t), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "result.json").exists() and not (tmp_path / "r" / "best.pt").exists()


# ---------------------------------------------------------------- 8. CE-only recipe trains no teacher
def test_ce_only_recipe_trains_no_teacher(tmp_path, capsys):
    r = tmp_path / "b.yaml"
    r.write_text("extends: digits/baseline\nname: tiny-base\n"
                 f"teacher: {{checkpoint: {tmp_path / 'never' / 'best.pt'}}}\n"
                 "train: {epochs: 1, patience: null}\n")
    rc, o, err = run_cli(["distill", r, "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 0, err
    assert "training teacher" not in o and not (tmp_path / "never").exists()


# ---------------------------------------------------------------- 9. paths
def test_user_recipe_extending_a_shipped_one_finds_its_teacher_recipe(tmp_path):
    r = tmp_path / "my.yaml"
    r.write_text("extends: digits/kd\nname: mine\n")
    rec = load_recipe(r)
    assert rec.teacher.recipe == "digits/teacher"  # full.yaml's `recipe: teacher.yaml`, resolved there
    assert load_recipe(rec.teacher.recipe).name == "digits-teacher"
    rec = load_recipe("methods/digits/mtkd")
    assert rec.loss[1].params["recipes"] == ["methods/teachers/digits_b"]


def test_recipe_references_are_relative_to_their_file_and_overrides_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "t.yaml").write_text("name: t\nstudent: {model: cnn_tiny}\n")
    (tmp_path / "b" / "t.yaml").write_text("name: t2\nstudent: {model: cnn_tiny}\n")
    (tmp_path / "a" / "s.yaml").write_text("extends: digits/kd\nname: s\nteacher: {recipe: t.yaml}\n")
    monkeypatch.chdir(tmp_path / "b")
    assert load_recipe(tmp_path / "a" / "s.yaml").teacher.recipe == str(tmp_path / "a" / "t.yaml")
    over = load_recipe(tmp_path / "a" / "s.yaml", ["teacher.recipe=t.yaml"])
    assert over.teacher.recipe == str(tmp_path / "b" / "t.yaml")


def test_teacher_training_says_why_with_absolute_paths(base, tmp_path, monkeypatch, capsys):
    """Run from another folder, the relative teacher.checkpoint names a different file: the one line
    before the teacher is trained says so, with the absolute path and the current folder."""
    r = tmp_path / "s.yaml"
    r.write_text(f"extends: {base / 'student.yaml'}\nteacher: {{checkpoint: runs/t/best.pt}}\n")
    monkeypatch.chdir(tmp_path)
    rc, o, err = run_cli(["distill", r, "--out", "o", "--quiet"], capsys)
    assert rc == 0, err
    line = next(l for l in o.splitlines() if l.startswith("training teacher"))
    assert f"{tmp_path / 'runs' / 't' / 'best.pt'} does not exist" in line
    assert f"relative to the current folder {tmp_path}" in line


def test_teacher_checkpoint_folder_is_refused_before_training(base, tmp_path, capsys):
    rc, o, err = run_cli(["distill", base / "student.yaml", "--out", tmp_path / "o", "--quiet",
                          "--set", f"teacher.checkpoint={base / 'teacher'}"], capsys)
    assert rc == 2 and "is a folder" in err and "best.pt" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- threads and determinism
def test_resume_with_another_thread_count_warns(base, tmp_path, capsys):
    t = load_recipe(base / "teacher.yaml")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(t, tmp_path / "r", progress=False, stop_after=1)
        torch.set_num_threads(1)
        capsys.readouterr()
        res = train(t, tmp_path / "r", progress=False)
    finally:
        torch.set_num_threads(old)
    err = capsys.readouterr().err
    assert "trained with 2 thread(s), this process uses 1" in err
    assert res["threads"] == 1 and json.loads((tmp_path / "r" / "run.json").read_text())["threads"] == 1


def test_deterministic_mode_fixes_threads_and_numbers(base, tmp_path):
    t = load_recipe(base / "teacher.yaml", ["train.deterministic=true", "train.epochs=1"])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = train(t, tmp_path / "a", progress=False)
        torch.set_num_threads(1)
        b = train(t, tmp_path / "b", progress=False)
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(old)
    assert a["threads"] == b["threads"] == 1 and a["deterministic"] and b["deterministic"]
    assert a["test_acc"] == b["test_acc"] and a["val_loss"] == b["val_loss"]
    assert _same_weights(tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt")


def test_mixed_threads_warning():
    from kdlab.train.trainer import mixed_threads, thread_warning

    assert mixed_threads([{"threads": 1}, {"threads": 1}]) is None
    assert "(1, 2)" in mixed_threads([{"threads": 2}, {"threads": 1}])
    assert thread_warning("r", None, 1) is None and thread_warning("r", 4, 4) is None
    assert "4 thread(s), this process uses 1" in thread_warning("r", 4, 1)


# ---------------------------------------------------------------- teacher cache files
@pytest.mark.parametrize("garbage", [b"", b"\x00" * 64, "truncate"])
def test_corrupt_teacher_cache_file_is_named(tmp_path, garbage):
    from kdlab.distill.teachers import TeacherStore

    store = TeacherStore(tmp_path / "cache", memory_mb=0)
    idx = torch.arange(4)
    store.put("k", "logits", {"a": 1}, 0, 0, 1, idx, torch.ones(4, 3))
    files = list((tmp_path / "cache").rglob("e*.pt"))
    assert len(files) == 1
    f = files[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if garbage == "truncate" else garbage)
    fresh = TeacherStore(tmp_path / "cache", memory_mb=0)
    with pytest.raises(ValueError, match=r"teacher cache file .*e00000\.pt is corrupt.*delete the cache folder"):
        fresh.get("k", "logits", 0, 0, idx, True)


def test_teacher_cache_fill_time_is_counted(tmp_path):
    from torch import nn

    from kdlab.distill.teachers import CachedTeacher, LiveTeacher, TeacherStore

    store = TeacherStore()
    t = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    src = CachedTeacher(LiveTeacher(t, [], [], None, round_to=torch.float16), store, {"x": 1}, steps=1)
    x, y, idx = torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1])
    src(x, y, idx, 0, 0)
    spent = store.fill_time_s
    assert spent > 0 and store.misses == 1
    src(x, y, idx, 0, 0)
    assert store.fill_time_s == spent and store.hits == 1
