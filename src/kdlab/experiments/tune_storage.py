"""Where a ``kdlab tune`` study lives and how its workers share it: the Optuna storage (journal
file or RDB), sampler and pruner, the study's recorded settings and budget, and the liveness of
running trials (pid checks, heartbeats, failing and re-queueing a dead worker's trial). The file
lock the workers ask trials under is :func:`kdlab.core.lock.file_lock`."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Optional


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise ImportError("kdlab tune needs Optuna: pip install 'kdlab[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_storage(storage: Optional[str], out_dir):
    """Optuna storage: None -> the journal file ``<out_dir>/study.journal``; an RDB URL
    (``sqlite:///``, ``postgresql://``, ``mysql://``) -> ``RDBStorage``; any other string -> a
    journal file at that path."""
    optuna = optuna_module()
    from optuna.storages.journal import JournalFileBackend

    if storage and "://" in storage:
        return _rdb_storage(optuna, storage)
    path = Path(storage) if storage else Path(out_dir) / "study.journal"
    if storage and not path.parent.is_dir():  # a typo would start a second, separate study
        raise FileNotFoundError(f"--storage {storage}: the folder {path.parent} does not exist; create it "
                                f"(every worker must name the same journal file) or fix the path")
    if path.is_dir():
        raise ValueError(f"--storage {path} is a folder; give a journal file path (e.g. {path / 'study.journal'})")
    if path.exists():
        check_journal(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    class NamedJournal(JournalFileBackend):  # a failed append (a full disk) names the journal
        def append_logs(self, logs):
            try:
                return super().append_logs(logs)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from None

    return optuna.storages.JournalStorage(NamedJournal(str(path)))


#: RDB URL schemes SQLAlchemy can open (with a driver installed): ``scheme[+driver]://...``.
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql", "cockroachdb")


def _rdb_storage(optuna, url: str):
    """``optuna.storages.RDBStorage(url)``; an unknown scheme, a missing folder of a SQLite file or a
    database that cannot be opened raise one line naming ``--storage`` and the fix."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in RDB_SCHEMES:
        raise ValueError(f"--storage {url}: unknown scheme '{scheme}'; give sqlite:///FILE.db, postgresql://..., "
                         f"mysql://... or a journal file path")
    if scheme == "sqlite":
        file = url.split("://", 1)[1][1:]
        if file and file != ":memory:" and not Path(file).parent.is_dir():
            raise FileNotFoundError(f"--storage {url}: the folder {Path(file).parent} does not exist; create it "
                                    f"or fix the path (sqlite:///relative.db, sqlite:////absolute.db)")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # SQLAlchemy: no driver, server down, bad credentials, not a database
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--storage {url}: cannot open it ({first}); check the URL, the server and that "
                         f"its driver is installed") from None


def check_journal(path: Path, settle_s: float = 0.5) -> None:
    """Refuse (one line, before anything is written to it) a journal file that is not Optuna's
    JSON-lines journal: garbage, a line that is not a JSON record, a torn last line. A last line
    being appended by a live worker is given ``settle_s`` to complete."""
    for attempt in (0, 1):
        data = path.read_bytes()
        if not data or data.endswith(b"\n") or attempt:
            break
        time.sleep(settle_s)
    lines = data.split(b"\n")
    why = ""
    if data and not data.endswith(b"\n"):
        why = f"its last line ({len(lines)}) is cut off"
    for i, line in enumerate(lines[:-1], 1):
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or "op_code" not in rec:
            why = f"line {i} is not an Optuna journal record"
            break
    if why:
        raise ValueError(f"tune journal {path} is damaged ({why}); kdlab did not write to it: restore it from a "
                         f"copy, or start a new search with another --storage or --out")


def make_sampler(spec, seed: Optional[int]):
    optuna = optuna_module()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: running trials of other workers count as bad, so workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True)


def make_pruner(spec):
    optuna = optuna_module()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                           n_warmup_steps=spec.warmup_epochs)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec.warmup_epochs))
    return optuna.pruners.NopPruner()


def open_study(spec, storage, name: str, seed: Optional[int], set_budget: bool = True):
    """Create or join the study ``name``; a study created with other settings is refused.
    ``set_budget``: make ``spec.trials`` the study's budget (a ``--worker`` joining an existing
    study follows the budget its main process set)."""
    optuna = optuna_module()
    study = optuna.create_study(storage=storage, study_name=name, direction=spec.direction,
                                sampler=make_sampler(spec, seed), pruner=make_pruner(spec),
                                load_if_exists=True)
    ident = spec.identity()
    stored = study.user_attrs.get("kdlab_spec")
    if stored is None:
        study.set_user_attr("kdlab_spec", ident)
        study.set_user_attr("kdlab_source", spec.source)
    elif stored != ident:
        diff = sorted(k for k in ident if stored.get(k) != ident[k])
        raise ValueError(f"study '{name}' was created with other settings ({', '.join(diff)} differ); "
                         f"use the same recipe and options, or another --study-name / --out")
    if set_budget or "kdlab_trials" not in study.user_attrs:
        study.set_user_attr("kdlab_trials", spec.trials)
    return study


def study_budget(study) -> int:
    """The number of trials the study runs to (``kdlab_trials``, set by its main process)."""
    if "kdlab_trials" not in study.user_attrs:
        raise ValueError(f"study '{study.study_name}' has no trial budget; run `kdlab tune <recipe> --trials N` once")
    return int(study.user_attrs["kdlab_trials"])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (``kill(pid, 0)``)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def counted(trial) -> bool:
    """Whether a finished trial counts toward the budget: complete, pruned, or failed with an
    error of its own (a killed trial does not: it is retried)."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def fail_stale(study, storage, grace_s: float, log=print) -> list[int]:
    """Mark FAIL the running trials whose worker died (same host, pid gone) or whose heartbeat is
    older than ``grace_s``, and enqueue their parameters again (the retry resumes the dead
    trial's run folder). Returns the failed trial numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host, now, failed = socket.gethostname(), time.time(), []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        start = t.datetime_start.timestamp() if t.datetime_start else now
        beat = max(float(ua.get("heartbeat", 0.0)), start)
        dead = ua.get("host") == host and "pid" in ua and not pid_alive(ua["pid"])
        if not dead and now - beat <= grace_s:
            continue
        tid = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        why = "its worker process is gone" if dead else f"no heartbeat for {now - beat:.0f}s"
        try:
            storage.set_trial_user_attr(tid, "failed_because", why)  # a finished trial takes no attrs
            if not storage.set_trial_state_values(tid, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # it finished, or another worker got there first
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "run_dir": ua.get("run_dir")})
        log(f"trial {t.number} marked failed ({why}); its parameters are queued again")
        failed.append(t.number)
    return failed


class Heartbeat:
    """Refreshes a running trial's ``heartbeat`` user attribute every ``interval`` seconds."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception:  # a finished trial or a storage hiccup: the next beat retries
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
