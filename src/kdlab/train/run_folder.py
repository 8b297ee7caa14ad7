"""The files of one run folder and their checks: identity, finished runs, thread counts.

A run folder holds ``best.pt`` (primary model; other models ``<name>/best.pt``), ``last.pt``
(everything needed to resume, including a copy of every model's best checkpoint),
``metrics.csv`` (one row per epoch), ``run.json`` (identity, versions, threads), ``result.json``
(written last: its presence means the run finished) and ``.kdlab.lock`` (:mod:`kdlab.core.lock`).

Rules (issue 11): a run counts as finished only when ``result.json``, ``run.json``,
``metrics.csv`` and every ``best.pt`` are present and readable and agree (same recipe, as many
metric rows as epochs run). A *missing* ``best.pt`` or ``metrics.csv`` is rebuilt from ``last.pt``
(with a note); a *corrupt* file is refused with one line naming it and the fix, which works as
written. ``run.json`` / ``result.json`` record ``threads``; resuming (or reusing) a run trained
with another thread count prints a warning, since the same seed then gives slightly different
numbers.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from kdlab.core.checkpoint import atomic_save, load_checkpoint
from kdlab.core.io import RunFileError, read_csv, read_json, write_csv, write_json


def note(msg: str) -> None:
    """A one-line notice on stderr (``kdlab: note: ...``)."""
    print(f"kdlab: {msg}", file=sys.stderr)


def thread_warning(run_dir, recorded, current: Optional[int] = None) -> Optional[str]:
    """The warning for a run trained with ``recorded`` threads now used with ``current``
    (default: ``torch.get_num_threads()``), or None when they agree or nothing was recorded."""
    current = torch.get_num_threads() if current is None else current
    if recorded is None or int(recorded) == int(current):
        return None
    return (f"warning: {run_dir} was trained with {recorded} thread(s), this process uses {current}; "
            f"the same seed gives slightly different numbers at another thread count "
            f"(set train.deterministic: true to fix it)")


def mixed_threads(results: Sequence[dict]) -> Optional[str]:
    """A warning when the compared ``results`` (result.json dicts) were trained with different
    thread counts, or None. For study and comparison tables."""
    counts = sorted({int(r["threads"]) for r in results if r.get("threads") is not None})
    if len(counts) <= 1:
        return None
    return (f"warning: the compared runs used different thread counts ({', '.join(map(str, counts))}); "
            f"their numbers differ slightly for that reason alone (train.deterministic: true fixes it)")


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The git commit of kdlab's source tree, when it is a checkout (else None). Asked once per
    process (the code this process runs was imported at its start): a study's runs do not each
    start a ``git`` process."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_record(identity, seed, method, runtime) -> dict:
    """``run.json``: what ran, with what, where (versions, threads, git commit, teacher hash)."""
    import platform

    import numpy

    from kdlab.core.checkpoint import file_hash
    from kdlab.version import __version__

    teacher_hash = None
    t = identity.get("teacher") if isinstance(identity, dict) else None
    ck = t.get("checkpoint") if isinstance(t, dict) else None
    if ck and Path(ck).is_file():
        teacher_hash = file_hash(ck)
    return {"recipe": identity, "seed": seed, "method": method, "command": " ".join(sys.argv),
            "kdlab": __version__, "git_commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "device": str(runtime.device),
            "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "world_size": runtime.world_size, "teacher_checkpoint_sha256": teacher_hash}


class RunFolder:
    """One run folder: where its files are, the run's identity, and the checks of a finished or
    interrupted run (see the module doc). ``best_ck`` holds every model's best checkpoint dict
    (also kept in ``last.pt``), from which a missing ``best.pt`` is rebuilt."""

    def __init__(self, path, *, identity, seed, method: str, primary: str, runtime):
        self.path = Path(path)
        self.identity, self.seed, self.method = identity, seed, method
        self.primary = primary
        self.runtime = runtime
        self.best_ck: dict = {}

    def best_path(self, name: str) -> Path:
        return self.path / "best.pt" if name == self.primary else self.path / name / "best.pt"

    def check_identity(self, recorded, what: str) -> None:
        """Refuse a folder holding ``what`` (a run, a finished run) of another identity."""
        if recorded != self.identity:
            raise ValueError(f"{self.path} holds {what} of a different recipe; "
                             f"use another output folder or delete it to {'re-run' if 'finished' in what else 'start over'}")

    def write_record(self) -> None:
        """``run.json`` of this process's run."""
        write_json(self.path / "run.json", run_record(self.identity, self.seed, self.method, self.runtime))

    def recorded_threads(self) -> Optional[int]:
        """The thread count ``run.json`` records (None when it is missing or unreadable)."""
        if not (self.path / "run.json").exists():
            return None
        try:
            return read_json(self.path / "run.json", "run record").get("threads")
        except (RunFileError, AttributeError):
            return None  # rewritten when the run starts

    def warn_threads(self, recorded) -> None:
        warn = thread_warning(self.path, recorded)
        if warn and self.runtime.is_main:
            note(warn)

    def rebuild(self, name: str, what: str) -> bool:
        """Write model ``name``'s ``best.pt`` from the copy in ``last.pt`` (False when none)."""
        if name not in self.best_ck:
            last = self.path / "last.pt"
            if not last.is_file():
                return False
            ck = load_checkpoint(last, fix="delete the run folder and re-run to train it again")
            self.best_ck = dict(ck.get("best") or {})
            if name not in self.best_ck:
                return False
        if self.runtime.is_main:
            atomic_save(self.best_ck[name], self.best_path(name))
            note(f"note: {self.best_path(name)} was {what}; rebuilt it from last.pt")
        return True

    def finished_result(self, names) -> dict:
        """The result of the finished run, after checking that every file of it (models ``names``)
        is present, readable and consistent; one line naming the file and the fix otherwise."""
        d = self.path
        again = f"delete the folder {d} and re-run to train it again (same seed, same numbers)"
        result = read_json(d / "result.json", "run result")
        if not isinstance(result, dict):
            raise RunFileError(f"run result {d / 'result.json'} is not a result; delete it and re-run "
                               f"(it is recomputed from last.pt)")
        ran = d / "run.json"
        recorded = None
        if ran.exists():
            rec = read_json(ran, "run record")
            if not isinstance(rec, dict):
                raise RunFileError(f"run record {ran} is corrupt; delete it and re-run")
            self.check_identity(rec.get("recipe"), "a finished run")
            recorded = rec.get("threads")
        for n in names:
            path = self.best_path(n)
            if not path.exists() and not self.rebuild(n, "missing"):
                raise RunFileError(f"{path} of the finished run is missing and {d / 'last.pt'} holds no "
                                   f"copy of it; {again}")
            ck = load_checkpoint(path, fix=("delete it and re-run (it is rebuilt from last.pt)"
                                            if (d / "last.pt").is_file() else again))
            if ck.get("recipe", self.identity) != self.identity:
                raise ValueError(f"{path} belongs to a run of a different recipe; use another output "
                                 f"folder or delete it to re-run")
        self.check_metrics(int(result.get("epochs_run", -1)), again)
        if not ran.exists() and self.runtime.is_main:  # the run is otherwise complete
            write_json(ran, {**run_record(self.identity, self.seed, self.method, self.runtime),
                             "threads": result.get("threads"), "rebuilt": True})
        self.warn_threads(recorded if recorded is not None else result.get("threads"))
        return result

    def check_metrics(self, epochs_run: int, again: str) -> None:
        """``metrics.csv`` has one row per epoch run (rebuilt from last.pt when missing)."""
        path = self.path / "metrics.csv"
        if not path.exists():
            last = self.path / "last.pt"
            if last.is_file():
                ck = load_checkpoint(last, fix="delete it and re-run (the result is kept)")
                hist = (ck.get("state") or {}).get("history")
                if hist and len(hist) == epochs_run:
                    if self.runtime.is_main:
                        write_csv(path, hist)
                        note(f"note: {path} was missing; rebuilt it from last.pt")
                    return
            raise RunFileError(f"{path} of the finished run is missing; {again}")
        rows = read_csv(path)
        ok = len(rows) == epochs_run and all(
            r.get("epoch") == str(i + 1) and "train_time_s" in r and None not in r
            and all(_is_number(v) for v in r.values()) for i, r in enumerate(rows))
        if not ok:
            fix = ("delete it and re-run (it is rebuilt from last.pt)" if (self.path / "last.pt").is_file()
                   else again)
            raise RunFileError(f"metrics file {path} is corrupt (expected {epochs_run} epoch rows); {fix}")
