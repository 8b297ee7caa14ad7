"""Faults around the commands (issue 23): a second Ctrl-C, a real ``python -m kdlab`` process (its
own stdout, stderr and exit status), read-only folders and a full disk for every command that
writes, concurrent runs and kill -9 in the middle of a write.

Read-only folders are a read-only tmpfs when this runs as root (root ignores permission bits),
else folders without write permission; the full disk is a small tmpfs (root only: skipped
otherwise). Every refusal must be one line ``kdlab: error: ...`` with exit status 2, and leave every
file that was there byte-identical (and no half-written ``*.tmp`` file).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliab_fixtures import python_env, snapshot, spawn, wait_line, write_recipes  # noqa: E402
from test_bad_inputs import shared_bases  # noqa: E402

ROOT = os.geteuid() == 0


def kdlab(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m kdlab ARGS`` in a real process."""
    return subprocess.run([sys.executable, "-m", "kdlab", *map(str, args)], cwd=cwd, env=python_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_line(p: subprocess.CompletedProcess) -> str:
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("kdlab: error:"), \
        f"rc={p.returncode}, stderr: {p.stderr[-2000:]}"
    return lines[0]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return shared_bases(tmp_path_factory)


# --------------------------------------------------------------------------------- Ctrl-C twice
def test_second_ctrl_c_exits_without_a_traceback(tmp_path):
    """Ctrl-C stops a run with one line; a second Ctrl-C while kdlab finishes (here: a slow exit
    handler, like the mask store's save) ends the process at once, with no atexit traceback."""
    t, _ = write_recipes(tmp_path)
    code = f"""
import atexit, sys, time
from kdlab.train import trainer
def slow_epoch(self, epoch):
    print('training', flush=True)
    time.sleep(600)
trainer.Trainer.train_epoch = slow_epoch
def slow_exit():
    print('saving', flush=True)
    time.sleep(600)
atexit.register(slow_exit)
from kdlab.cli.main import main
sys.exit(main(['train-teacher', {str(t)!r}, '--out', {str(tmp_path / 'run')!r}, '--quiet']))
"""
    child = spawn(code, tmp_path)
    try:
        assert wait_line(child, b"training")
        child.send_signal(signal.SIGINT)
        assert wait_line(child, b"saving")
        child.send_signal(signal.SIGINT)
        rc = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = child.stderr.read().decode()
    assert rc == 130
    assert [l for l in err.splitlines() if l.strip()] == ["kdlab: interrupted; re-run the same command to resume"]


@pytest.mark.parametrize("made_of_it", [RuntimeError, OSError, ValueError])
def test_an_error_made_of_a_ctrl_c_is_reported_as_the_interrupt(monkeypatch, capsys, made_of_it):
    """Ctrl-C inside torch's checkpoint writer comes out as 'RuntimeError: [enforce fail at
    inline_container.cc:672] ...' (the KeyboardInterrupt raised in the writer): after a SIGINT, any
    error is the interrupt (status 130, the one interrupt line), not 'kdlab: error: ...' status 2."""
    from kdlab.cli import methods
    from kdlab.cli.main import main

    def writer_hit_by_ctrl_c(args):
        try:
            signal.raise_signal(signal.SIGINT)  # Python's handler runs before raise_signal returns
        except KeyboardInterrupt:
            raise made_of_it("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from None
        raise AssertionError("SIGINT did not raise KeyboardInterrupt")

    monkeypatch.setattr(methods, "cmd_methods", writer_hit_by_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    try:
        rc = main(["methods"])
    finally:
        signal.signal(signal.SIGINT, before)  # the interrupt armed 'a second Ctrl-C exits at once'
    err = capsys.readouterr().err
    assert rc == 130
    assert [l for l in err.splitlines() if l.strip()] == ["kdlab: interrupted; re-run the same command to resume"]


@pytest.mark.parametrize("mode,slow,advice", [
    (["--study", "digits/kd"], "bench_study", "a timed study does not resume: give a new --out (or delete {o} if it was made)"),
    (["--accuracy", "--synthetic-cifar", "10"], "accuracy_check",
     "the accuracy check does not resume: delete {o}/runs or give a new --out"),
])
def test_interrupted_bench_says_what_a_rerun_needs(monkeypatch, capsys, tmp_path, mode, slow, advice):
    """`kdlab bench --study/--accuracy` never resumes (a re-run refuses the folder its runs are in):
    the interrupt line says to delete the folder or give a new --out, not 're-run the same command'."""
    import importlib

    from kdlab.cli.main import main

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    module = "kdlab.experiments.bench" if slow == "bench_study" else "kdlab.experiments.bench_accuracy"
    monkeypatch.setattr(importlib.import_module(module), slow, ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    try:
        rc = main(["bench", *mode, "--out", str(tmp_path / "o")])
    finally:
        signal.signal(signal.SIGINT, before)
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert rc == 130
    assert err == [f"kdlab: interrupted; {advice.format(o=tmp_path / 'o')}"]


def test_errors_without_a_ctrl_c_stay_errors(monkeypatch, capsys):
    """The same error with no SIGINT before it is an error line (status 2), and the SIGINT handler
    is Python's default again after the command."""
    from kdlab.cli import methods
    from kdlab.cli.main import main

    def fails(args):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(methods, "cmd_methods", fails)
    assert main(["methods"]) == 2
    assert capsys.readouterr().err.startswith("kdlab: error: [enforce fail")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------- real processes
def test_header_is_not_printed_before_a_refused_input(tmp_path):
    """An input refused after the recipe loaded (no training images left) prints only its one
    error line: no 'training ...' header on stdout before it."""
    t, _ = write_recipes(tmp_path)
    p = kdlab("train-teacher", t, "--out", tmp_path / "o", "--set", "data.val_fraction=0.9999", "--quiet",
              cwd=tmp_path)
    assert "data.val_fraction" in one_line(p)
    assert p.stdout == ""


@pytest.mark.parametrize("args,fragment", [
    (["losss"], "did you mean `kdlab losses`"),
    (["profile", "cnn_tiny", "--threads", "-1"], "argument --threads"),
    (["distill", "digits/kd", "--set", "loss[7].weight=1"], "loss has 2 entries"),
])
def test_real_process_gives_one_line(tmp_path, args, fragment):
    p = kdlab(*args, cwd=tmp_path)
    assert fragment in one_line(p)
    assert p.stdout == "" and list(tmp_path.iterdir()) == []


def test_profile_of_an_empty_onnx_file_in_a_real_process(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    p = kdlab("profile", tmp_path / "m.onnx", "--out", tmp_path / "o", cwd=tmp_path)
    assert "m.onnx is not a valid ONNX model" in one_line(p)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["recipes"], ["models"]])
def test_closed_stdout_pipe_stops_quietly(tmp_path, command):
    """`kdlab recipes | head -3`: the reader closes the pipe; kdlab stops without an error line
    (before: 'kdlab: error: cannot use: Broken pipe', exit 2) and with exit status 141 (128 +
    SIGPIPE, as a shell reports a command stopped by a closed pipe)."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before kdlab writes a byte: its first flush meets EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "kdlab", *command], cwd=tmp_path, env=python_env(),
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert p.stderr == ""
    assert p.returncode == 141


# ------------------------------------------------------------------------------ read-only folders
@contextlib.contextmanager
def read_only(folder: Path, content: dict | None = None):
    """``folder`` filled with ``content`` (name -> source folder) and then made read-only: a tmpfs
    remounted read-only when root, else permission bits."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = False
    if ROOT:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted = True
    try:
        for name, src in (content or {}).items():
            shutil.copytree(src, folder / name)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            for p in [folder, *folder.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            for p in [folder, *folder.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)


#: Every command that writes, aimed at a read-only place. ``{ro}`` is the read-only folder (holding
#: a copy of the finished study as ``{ro}/study``); the other names are the bad-input bases.
WRITERS = {
    "train-teacher": "train-teacher {b}/teacher.yaml --out {ro}/o --quiet",
    "distill": "distill {b}/student.yaml --out {ro}/o --quiet",
    "ablate": "ablate {b}/student.yaml --out {ro}/o --seeds 0 --quiet",
    "sweep": "sweep {b}/student.yaml --out {ro}/o --seeds 0 --students cnn_tiny --alphas 0.5 --quiet",
    "compare": "compare {b}/student.yaml --out {ro}/o --seeds 0 --baseline student --quiet",
    "paradigm": "paradigm ban {b}/student.yaml --out {ro}/o --quiet",
    "explain": "explain --teacher {b}/teacher/best.pt --student {b}/student/best.pt --out {ro}/o --n-images 8",
    "explain-study": "explain-study {ro}/study --n-images 8",
    "findings": "findings {study} --out {ro}/o",
    "report": "report {ro}/study",
    "robustness": "robustness {b}/student/best.pt --out {ro}/o --limit 8 --corruptions gaussian_noise --severities 1 --quiet",
    "robustness --study": "robustness --study {ro}/study --limit 8 --corruptions gaussian_noise --severities 1 --quiet",
    "profile": "profile {b}/student/best.pt --out {ro}/o --no-latency",
    "prune": "prune {b}/student/best.pt --sparsity 0.5 --out {ro}/o --quiet",
    "quantize": "quantize {b}/student/best.pt --out {ro}/o --calib-batches 1 --quiet",
    "export": "export {b}/student/best.pt --out {ro}/o",
    "deploy": "deploy --student {b}/student/best.pt --teacher {b}/teacher/best.pt --out {ro}/o --finetune-epochs 0 --quiet",
    "bench --json": "bench --teacher cnn_tiny --student cnn_tiny --steps 1 --repeats 1 --variants baseline "
                    "--batch-size 8 --image-size 8 --channels 1 --json {ro}/x.json",
    "bench --study": "bench --study {b}/student.yaml --out {ro}/o --seeds 0",
    "lm train-teacher": "lm train-teacher {lm}/lm.yaml --out {ro}/o --quiet",
    "lm distill": "lm distill {lm}/lm.yaml --out {ro}/o --quiet",
    "lm ablate": "lm ablate {lm}/lm.yaml --out {ro}/o --quiet",
    "tune": "tune {b}/student.yaml --param train.lr=0.01:0.1 --trials 1 --out {ro}/o --quiet",
    "demo": "demo --out {ro}/o --quiet",
}


def _argv(template: str, bases, **more) -> list[str]:
    import shlex

    class F(dict):
        def __missing__(self, k):
            return more[k] if k in more else bases[k]
    return shlex.split(template.format_map(F()))


def _in_process(argv, cwd: Path) -> tuple[int, list[str], str]:
    """``kdlab ARGV`` in this process: (exit status, stderr lines, stdout)."""
    import io

    from kdlab.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return rc, [l for l in err.getvalue().splitlines() if l.strip()], out.getvalue()


@pytest.mark.parametrize("command", list(WRITERS))
def test_read_only_folder_is_one_line_and_changes_nothing(command, bases, tmp_path):
    if command.startswith("lm "):
        pytest.importorskip("tokenizers")
    if command == "tune":
        pytest.importorskip("optuna")
    if command in ("export", "deploy", "quantize"):
        pytest.importorskip("onnxruntime")
    study = bases["study"]
    with read_only(tmp_path / "ro", {"study": study}) as ro:
        argv = _argv(WRITERS[command], bases, ro=str(ro))
        before = snapshot(ro)
        rc, lines, _ = _in_process(argv, tmp_path)
        after = snapshot(ro)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("kdlab: error:"), (rc, lines[-3:])
    assert str(ro) in lines[0]
    assert before == after
    assert not list(tmp_path.glob("runs")), "it trained (a teacher) before finding it could not write"


# ------------------------------------------------------------------------------------ disk full
@contextlib.contextmanager
def full_disk(folder: Path, free_kb: int, content: dict | None = None):
    """A tmpfs at ``folder`` holding ``content`` (name -> source folder) with about ``free_kb``
    KiB left (root only)."""
    if not ROOT:
        pytest.skip("a full disk needs a tmpfs mount (root)")
    folder.mkdir(parents=True, exist_ok=True)
    size_kb = 64 * 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for name, src in (content or {}).items():
            shutil.copytree(src, folder / name)
        st = os.statvfs(folder)
        avail = st.f_bavail * st.f_frsize
        with open(folder / ".filler", "wb") as f:
            f.truncate(0)
            left = max(0, avail - free_kb * 1024)
            chunk = b"\0" * (1 << 20)
            while left > 0:
                n = f.write(chunk[: min(left, len(chunk))])
                left -= n
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


#: Commands that write files of some size; each runs into a disk with ``free_kb`` left. (``export``
#: writes its ONNX file through onnx.save, made atomic and path-naming by the checkpoint-safety work.)
FULL = {
    "train-teacher": ("train-teacher {b}/teacher.yaml --out {full}/o --quiet", 8),
    "distill": ("distill {b}/student.yaml --out {full}/o --quiet", 8),
    "profile": ("profile {b}/student/best.pt --out {full}/o --no-latency --per-layer", 0),
    "report": ("report {full}/study", 0),
    "lm train-teacher": ("lm train-teacher {lm}/lm.yaml --out {full}/o --quiet", 8),
    "tune": ("tune {b}/student.yaml --param train.lr=0.01:0.1 --trials 1 --out {full}/o --quiet", 0),
}


@pytest.mark.parametrize("command", list(FULL))
def test_full_disk_is_one_line_and_keeps_every_file(command, bases, tmp_path):
    if command.startswith("lm "):
        pytest.importorskip("tokenizers")
    if command == "tune":
        pytest.importorskip("optuna")
    template, free_kb = FULL[command]
    with full_disk(tmp_path / "full", free_kb, {"study": bases["study"]}) as full:
        argv = _argv(template, bases, full=str(full))
        before = snapshot(full)
        rc, lines, _ = _in_process(argv, tmp_path)
        after = snapshot(full)
        torn = [p for p in full.rglob("*.tmp")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("kdlab: error:"), (rc, lines[-3:])
    assert "space" in lines[0] and str(full) in lines[0], lines[0]
    assert {k: v for k, v in after.items() if k in before} == before
    assert torn == []


# ---------------------------------------------------------------------------------- concurrent runs
CONCURRENT = {
    "export": "export {b}/student/best.pt --out {out}",
    "report": "report {out} --no-figures",
    "train-teacher": "train-teacher {b}/teacher.yaml --out {out} --quiet --set train.epochs=1",
}


@pytest.mark.parametrize("command", list(CONCURRENT))
def test_two_processes_at_once_leave_valid_files(command, bases, tmp_path):
    """Two processes writing the same folder at once: each either finishes or is refused with one
    line (the run lock), and every file left is whole (JSON parses, checkpoints load)."""
    if command == "export":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    if command == "report":
        shutil.copytree(bases["study"], out)
    argv = _argv(CONCURRENT[command], bases, out=str(out))
    procs = [subprocess.Popen([sys.executable, "-m", "kdlab", *argv], cwd=tmp_path, env=python_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for rc, err in results:
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 0 or (rc == 2 and len(lines) == 1 and "in use" in lines[0]), (rc, err[-1500:])
    assert any(rc == 0 for rc, _ in results)
    for f in out.rglob("*"):
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".pt":
            torch.load(f, weights_only=False)
        assert not f.name.endswith(".tmp"), f
    if command == "export":
        import onnxruntime as ort

        ort.InferenceSession(str(out / "model.onnx"))


# ------------------------------------------------------------------------------------- kill -9
KILLED = {
    "report": ("report {out} --no-figures", "table.json"),
    "profile": ("profile {b}/student/best.pt --out {out} --no-latency", "profile.json"),
    "robustness": ("robustness {b}/student/best.pt --out {out} --limit 8 --corruptions gaussian_noise "
                   "--severities 1 --quiet", "robustness.json"),
    "findings": ("findings {study} --out {out}", "findings.md"),
}


@pytest.mark.parametrize("command", list(KILLED))
def test_kill_9_during_a_write_keeps_the_old_file(command, bases, tmp_path):
    """kill -9 while a command replaces a file: the old file stays whole, the re-run cleans up and
    finishes."""
    template, target = KILLED[command]
    out = tmp_path / "out"
    if command == "report":
        shutil.copytree(bases["study"], out)
    argv = _argv(template, bases, out=str(out))
    assert _in_process(argv, tmp_path)[0] == 0  # a first, complete run
    files = sorted(out.rglob(target))
    assert files, f"{command} wrote no {target}"
    old = {f: f.read_bytes() for f in files}
    code = f"""
import os, time
real = os.replace
def slow(src, dst, *a, **k):
    if str(dst).endswith({target!r}):
        with open(src, 'rb') as f:
            f.read()
        print('writing', flush=True)
        time.sleep(600)
    return real(src, dst, *a, **k)
os.replace = slow
from kdlab.cli.main import main
main({argv!r})
"""
    child = spawn(code, tmp_path)
    try:
        assert wait_line(child, b"writing")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert {f: f.read_bytes() for f in files} == old
    assert _in_process(argv, tmp_path)[0] == 0
    assert {f: f.read_bytes() for f in files}.keys() == old.keys()
    for f in files:
        if f.suffix == ".json":
            json.loads(f.read_text())


# ------------------------------------------------------------------------------- damaged caches
@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04 torn zip", "truncate"])
def test_damaged_lm_cache_file_is_named(tmp_path, garbage):
    """A damaged epoch file of the LM sparse teacher cache names itself and the fix (torch's own
    message names neither)."""
    from kdlab.lm.cache import SparseTeacherCache

    cache = SparseTeacherCache(tmp_path, "t", {"s": 1}, 4, 258)
    cache.dir.mkdir(parents=True)
    good = {"idx": torch.zeros(2, 3, 4, dtype=torch.int32), "logp": torch.zeros(2, 3, 4), "log_tail": torch.zeros(2, 3)}
    torch.save(good, cache.path(0))
    data = cache.path(0).read_bytes()
    cache.path(0).write_bytes(data[: len(data) // 2] if garbage == "truncate" else garbage)
    with pytest.raises(ValueError) as e:
        cache.get(0, 0)
    msg = str(e.value)
    assert str(cache.path(0)) in msg and "delete it" in msg and len(msg.splitlines()) == 1
