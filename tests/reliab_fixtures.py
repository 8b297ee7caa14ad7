"""Tiny digits recipes and finished runs shared by test_reliability.py and test_bad_inputs.py.

The teacher is a cnn_tiny trained 2 epochs, the student a cnn_tiny distilled 1 epoch (KD): every
run takes a second or two in-process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kdlab.cli.main import main

SRC = Path(__file__).resolve().parent.parent / "src"

TEACHER = """\
name: tiny-teacher
data: {{name: digits}}
student: {{model: cnn_tiny}}
train: {{epochs: {epochs}, patience: null, batch_size: 64, lr: 0.05}}
"""

STUDENT = """\
extends: digits/kd
name: tiny-kd
teacher: {{model: cnn_tiny, checkpoint: {ckpt}, recipe: teacher.yaml}}
train: {{epochs: {epochs}, patience: null}}
"""


def write_recipes(folder: Path, *, teacher_epochs: int = 2, student_epochs: int = 1,
                  ckpt: str | None = None) -> tuple[Path, Path]:
    """``teacher.yaml`` and ``student.yaml`` in ``folder``; the student's teacher checkpoint is
    ``folder/teacher/best.pt`` unless ``ckpt`` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    t = folder / "teacher.yaml"
    s = folder / "student.yaml"
    t.write_text(TEACHER.format(epochs=teacher_epochs))
    s.write_text(STUDENT.format(epochs=student_epochs, ckpt=ckpt or (folder / "teacher" / "best.pt")))
    return t, s


def run_cli(args, capsys) -> tuple[int, str, str]:
    """``kdlab ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed(before: dict, after: dict) -> list[str]:
    """Files present before that are gone or differ after."""
    return [k for k, v in before.items() if after.get(k) != v]


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def python_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    return env


def spawn(code: str, cwd: Path, **kw) -> subprocess.Popen:
    """A Python child process running ``code`` with this checkout's kdlab."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_line(child: subprocess.Popen, word: bytes, limit: int = 200) -> bool:
    """Read the child's stdout until a line equal to ``word`` (False at EOF)."""
    for _ in range(limit):
        line = child.stdout.readline()
        if not line:
            return False
        if line.strip() == word:
            return True
    return False
