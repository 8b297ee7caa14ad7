"""Hyperparameter search of a recipe with Optuna: ``kdlab tune``.

**Search space.** Each searched value is a dotted recipe path and a range:

* ``loss.align.weight=log:0.01:10``: a float drawn on a log scale in [0.01, 10];
* ``loss.kd.T=2:8``: a float, uniform in [2, 8] (``2:8:0.5``: on a grid of step 0.5);
* ``train.batch_size=int:16:64`` (``int:log:16:256``): an integer;
* ``loss.align.form=contrastive|cosine``: one of the choices (values read as YAML).

``loss.<term>.<key>`` names the loss term by its ``term`` name (``loss.<i>.<key>`` by position, when
two terms share a name). The space comes from ``--param`` options and/or a ``tune:`` section of the
recipe file (``tune: {params: {loss.kd.weight: "log:0.1:10"}, trials: 30, pruner: median}``),
which is removed before the recipe is validated.

**Objective.** Trial k trains the recipe with its values into ``<out>/trials/trial_<k>`` and
returns the metric (default ``val_acc``) of the best epoch on the **validation** split. The trial
is built without a test loader, so the test split is never evaluated during the search.

**Pruning.** After every epoch the trial reports its validation metric to Optuna
(``Trial.report``); the pruner (``median``: Optuna's ``MedianPruner``, stop a trial whose value is
worse than the median of earlier trials at the same epoch; ``halving``: ``SuccessiveHalvingPruner``;
``none``) decides, and a pruned trial raises ``optuna.TrialPruned`` from a Trainer callback.

**Storage and workers.** By default the study lives in Optuna's journal file
``<out>/study.journal``; ``storage`` may be any Optuna RDB URL (``sqlite:///tune.db``,
``postgresql://...``) or another journal path. Any number of worker processes (``--jobs N`` here,
or ``kdlab tune ... --worker`` on other machines with the same storage) share one study: trials are
asked under a file lock so the study stops at exactly ``trials`` finished trials on one machine
(workers on several machines may overshoot by at most one trial each). The study records its
settings; a worker with other settings is refused.

**Killed trials.** Each running trial carries its worker's host and pid and a heartbeat (a user
attribute refreshed every ``heartbeat_s``; Optuna's own heartbeat exists only for RDB storages). A
worker starting a trial first marks FAIL every running trial whose process is gone (same host) or
whose heartbeat is older than ``grace_s``, and enqueues the same parameters again: the retry
resumes the dead trial's run folder from its last checkpoint. Re-running the command resumes the
study until ``trials`` trials are finished (complete, pruned, or failed with an error such as a
non-finite loss).

**Outputs** (``<out>/``): ``best.yaml`` (the recipe with the best values, ready for ``kdlab
distill``), ``trials.csv``, ``importances.csv`` (Optuna's default evaluator),
``history.png``, ``parallel.png`` and ``importances.png`` (``optuna.visualization.matplotlib``),
``tune.json`` (settings and best trial). ``then_study=N`` then trains the untuned and the tuned
recipe over seeds 0..N-1 as a paired study on the test split (``<out>/study``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kdlab.core.io import atomic_write_text
from kdlab.core.config import (Recipe, apply_overrides, read_recipe_yaml, recipe_from_dict,
                               resolve_recipe_path)
from kdlab.train.callbacks import Callback

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
TUNE_KEYS = {"params", "trials", "metric", "direction", "sampler", "pruner", "warmup_epochs", "startup_trials"}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("kdlab tune needs Optuna: pip install 'kdlab[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# -- search space -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One searched recipe value: ``kind`` float | int | categorical."""

    path: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()

    def suggest(self, trial):
        """The trial's value (``trial.suggest_float / suggest_int / suggest_categorical``)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)

    def contains(self, v) -> bool:
        """Whether ``v`` is a value of this space (used to enqueue the recipe's own values)."""
        if self.kind == "categorical":
            return v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind == "int" and int(v) != v:
            return False
        return self.low <= v <= self.high and (self.step is None or
                                               abs((v - self.low) / self.step - round((v - self.low) / self.step)) < 1e-9)


def parse_range(path: str, spec) -> ParamSpec:
    """A :class:`ParamSpec` from ``"log:0.01:10"``, ``"2:8"``, ``"2:8:0.5"``, ``"int:16:64"``,
    ``"int:log:16:256"``, ``"a|b|c"`` or a YAML list of choices."""
    how = f"give {path} a range like log:0.01:10, 2:8, int:1:5 or choices a|b|c"
    if isinstance(spec, (list, tuple)):
        if len(spec) < 2:
            raise ValueError(f"search space {path}: {list(spec)} has fewer than two choices; {how}")
        return ParamSpec(path, "categorical", choices=tuple(spec))
    s = str(spec).strip()
    if "|" in s:
        choices = tuple(yaml.safe_load(c.strip()) for c in s.split("|"))
        if len(choices) < 2 or any(c is None for c in choices):
            raise ValueError(f"search space {path}: '{s}' has an empty choice; {how}")
        return ParamSpec(path, "categorical", choices=choices)
    parts = s.split(":")
    flags = []
    while parts and parts[0] in ("log", "int"):
        flags.append(parts.pop(0))
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"search space {path}: '{s}' is not a range; {how}") from None
    if len(nums) not in (2, 3):
        raise ValueError(f"search space {path}: '{s}' needs low:high or low:high:step; {how}")
    low, high = nums[0], nums[1]
    step = nums[2] if len(nums) == 3 else None
    log = "log" in flags
    if not low < high:
        raise ValueError(f"search space {path}: low {low:g} must be below high {high:g}")
    if log and low <= 0:
        raise ValueError(f"search space {path}: a log range needs low > 0 (got {low:g})")
    if log and step is not None:
        raise ValueError(f"search space {path}: a log range takes no step; drop ':{step:g}' or 'log:'")
    if "int" in flags:
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise ValueError(f"search space {path}: an int range needs whole numbers (got '{s}')")
        return ParamSpec(path, "int", low, high, log, step)
    return ParamSpec(path, "float", low, high, log, step)


def parse_param(text: str) -> ParamSpec:
    """``"loss.kd.T=2:8"`` -> :class:`ParamSpec` (see :func:`parse_range`)."""
    if "=" not in text:
        raise ValueError(f"--param '{text}' must look like path=range (e.g. loss.kd.T=2:8)")
    path, spec = text.split("=", 1)
    return parse_range(path.strip(), spec)


def _loss_index(loss: list, key: str, path: str) -> int:
    if key.isdigit():
        i = int(key)
        if i >= len(loss):
            raise KeyError(f"{path}: the recipe has {len(loss)} loss terms; use an index below {len(loss)}")
        return i
    hits = [i for i, t in enumerate(loss) if t.get("term") == key]
    if not hits:
        raise KeyError(f"{path}: the recipe has no '{key}' loss term (terms: "
                       f"{', '.join(t.get('term', '?') for t in loss)})")
    if len(hits) > 1:
        raise KeyError(f"{path}: the recipe has {len(hits)} '{key}' terms; name one by position "
                       f"(loss.{hits[0]}.…)")
    return hits[0]


def set_path(raw: dict, path: str, value) -> None:
    """Set dotted ``path`` in a recipe dict, in place (``loss.<term|index>.<key>`` for loss terms)."""
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise KeyError(f"search path '{path}' must name a section and a key (e.g. loss.kd.T or train.lr)")
    if parts[0] == "loss":
        if len(parts) != 3:
            raise KeyError(f"search path '{path}': write loss.<term>.<key> (e.g. loss.kd.weight)")
        raw["loss"][_loss_index(raw["loss"], parts[1], path)][parts[2]] = value
        return
    apply_overrides(raw, [f"{path}={json.dumps(value)}"])


def get_path(raw: dict, path: str):
    """The value at dotted ``path`` of a recipe dict (None when unset)."""
    parts = path.split(".")
    if parts[0] == "loss":
        return raw["loss"][_loss_index(raw["loss"], parts[1], path)].get(parts[2])
    node: Any = raw
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def with_values(base: Recipe, values: dict) -> Recipe:
    """``base`` with the searched ``values`` (path -> value) set; validated like a recipe file."""
    raw = base.to_dict()
    for path, v in values.items():
        set_path(raw, path, v)
    r = recipe_from_dict(raw, base.source or base.name)
    r.source = base.source
    return r


# -- settings -----------------------------------------------------------------------------------
@dataclass
class TuneSpec:
    """What a study searches; stored in the study so that every worker runs the same search."""

    recipe: dict
    params: list = field(default_factory=list)  # ParamSpec as dicts
    trials: int = 30
    metric: str = "val_acc"
    direction: str = "maximize"
    sampler: str = "tpe"
    pruner: str = "median"
    warmup_epochs: int = 1
    startup_trials: int = 5
    source: Optional[str] = None

    def spaces(self) -> list[ParamSpec]:
        return [ParamSpec(**{**p, "choices": tuple(p.get("choices", ()))}) for p in self.params]

    def base(self) -> Recipe:
        r = recipe_from_dict(copy.deepcopy(self.recipe), self.source or "tuned recipe")
        r.source = self.source
        return r

    def identity(self) -> dict:
        """What must agree between the workers of a study (the budget ``trials`` may change)."""
        d = asdict(self)
        d.pop("source")
        d.pop("trials")
        return json.loads(json.dumps(d))


def load_tune_recipe(ref, overrides=None) -> tuple[Recipe, dict]:
    """A recipe and its ``tune:`` section (removed before validation); ``overrides`` as
    :func:`kdlab.core.config.load_recipe`'s."""
    path = resolve_recipe_path(ref)
    raw = read_recipe_yaml(path)
    section = raw.pop("tune", None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: tune: must be a mapping (params, trials, metric, ...)")
    bad = set(section) - TUNE_KEYS
    if bad:
        raise ValueError(f"{path}: tune.{sorted(bad)[0]}: unknown key (keys: {', '.join(sorted(TUNE_KEYS))})")
    apply_overrides(raw, overrides)
    recipe = recipe_from_dict(raw, str(path))
    recipe.source = str(path)
    if recipe.teacher is not None and recipe.teacher.recipe:
        recipe.teacher.recipe = str(resolve_recipe_path(recipe.teacher.recipe, path.parent))
    return recipe, section


def make_spec(recipe_ref, *, params=(), overrides=None, trials=None, metric=None, direction=None,
              sampler=None, pruner=None, warmup_epochs=None, startup_trials=None,
              data_dir=None) -> TuneSpec:
    """The :class:`TuneSpec` of a recipe: its ``tune:`` section, then the command-line values."""
    from kdlab.train.build import with_data_dir

    recipe, section = load_tune_recipe(recipe_ref, overrides)
    recipe = with_data_dir(recipe, data_dir)
    spaces = {p.path: p for p in (parse_range(k, v) for k, v in (section.get("params") or {}).items())}
    spaces.update({p.path: p for p in map(parse_param, params)})
    if not spaces:
        raise ValueError("nothing to search: give --param path=range (e.g. --param loss.kd.T=2:8) "
                         "or a tune.params section in the recipe")
    raw = recipe.to_dict()
    for p in spaces.values():
        set_path(copy.deepcopy(raw), p.path, p.choices[0] if p.choices else p.low)  # the path exists
    pick = lambda k, v, d: v if v is not None else section.get(k, d)  # noqa: E731
    spec = TuneSpec(recipe=raw, params=[{**asdict(p), "choices": list(p.choices)} for p in spaces.values()],
                    trials=int(pick("trials", trials, 30)), metric=pick("metric", metric, "val_acc"),
                    direction=pick("direction", direction, "maximize"), sampler=pick("sampler", sampler, "tpe"),
                    pruner=pick("pruner", pruner, "median"),
                    warmup_epochs=int(pick("warmup_epochs", warmup_epochs, 1)),
                    startup_trials=int(pick("startup_trials", startup_trials, 5)), source=recipe.source)
    if spec.trials < 1:
        raise ValueError(f"trials must be at least 1 (got {spec.trials})")
    if spec.sampler not in SAMPLERS:
        raise ValueError(f"sampler '{spec.sampler}' is not one of {', '.join(SAMPLERS)}")
    if spec.pruner not in PRUNERS:
        raise ValueError(f"pruner '{spec.pruner}' is not one of {', '.join(PRUNERS)}")
    if spec.direction not in ("maximize", "minimize"):
        raise ValueError(f"direction '{spec.direction}' must be maximize or minimize")
    if not spec.metric.startswith("val_"):
        raise ValueError(f"metric '{spec.metric}' must be a validation metric (val_acc, val_loss, ...); "
                         f"the test split is kept out of the search")
    return spec


# -- storage and study --------------------------------------------------------------------------
def make_storage(storage: Optional[str], out_dir):
    """Optuna storage: None -> the journal file ``<out_dir>/study.journal``; an RDB URL
    (``sqlite:///``, ``postgresql://``, ``mysql://``) -> ``RDBStorage``; any other string -> a
    journal file at that path."""
    optuna = _optuna()
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


def make_sampler(spec: TuneSpec, seed: Optional[int]):
    optuna = _optuna()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: running trials of other workers count as bad, so workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True)


def make_pruner(spec: TuneSpec):
    optuna = _optuna()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                           n_warmup_steps=spec.warmup_epochs)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec.warmup_epochs))
    return optuna.pruners.NopPruner()


def open_study(spec: TuneSpec, storage, name: str, seed: Optional[int], set_budget: bool = True):
    """Create or join the study ``name``; a study created with other settings is refused.
    ``set_budget``: make ``spec.trials`` the study's budget (a ``--worker`` joining an existing
    study follows the budget its main process set)."""
    optuna = _optuna()
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


def spec_of_study(storage, name: str) -> TuneSpec:
    """The settings stored in an existing study (a ``--worker`` started with no recipe)."""
    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise KeyError(f"no study '{name}' in this storage; start it with `kdlab tune <recipe>` first") from None
    d = study.user_attrs.get("kdlab_spec")
    if d is None:
        raise ValueError(f"study '{name}' was not made by kdlab tune; give the recipe")
    return TuneSpec(**d, trials=study_budget(study), source=study.user_attrs.get("kdlab_source"))


@contextmanager
def file_lock(path):
    """An exclusive ``flock`` on ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


class PruneCallback(Callback):
    """Reports the validation metric to the Optuna trial after every epoch and raises
    ``optuna.TrialPruned`` when the pruner says so. A resumed trial re-reports its earlier epochs."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def _report(self, row: dict) -> None:
        if self.metric not in row:
            raise KeyError(f"metric '{self.metric}' is not in the epoch's metrics "
                           f"({', '.join(k for k in row if k.startswith('val_'))}); pick one of those")
        v = float(row[self.metric])
        if math.isfinite(v):
            self.trial.report(v, int(row["epoch"]))

    def on_fit_start(self, trainer) -> None:
        for row in trainer.state.history:
            self._report(row)

    def on_epoch_end(self, trainer, row: dict) -> None:
        self._report(row)
        if int(row["epoch"]) < trainer.cfg.epochs and self.trial.should_prune():  # the last epoch costs nothing more
            raise _optuna().TrialPruned(f"pruned after epoch {row['epoch']}")


# -- the worker loop ----------------------------------------------------------------------------
@dataclass
class Context:
    """One worker's state: the study, its storage, the out folder and the shared teacher."""

    spec: TuneSpec
    study: Any
    storage: Any
    out_dir: Path
    teacher: Any = None
    store: Any = None
    heartbeat_s: float = 30.0
    grace_s: float = 120.0
    log: Any = print


def _budget_left(ctx: Context) -> int:
    from optuna.trial import TrialState

    trials = ctx.study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return study_budget(ctx.study) - sum(counted(t) for t in trials) - running


def _next_trial(ctx: Context):
    """Fail stale trials, then ask for a trial if the budget allows (under the study lock)."""
    with file_lock(ctx.out_dir / ".tune.lock"):
        fail_stale(ctx.study, ctx.storage, ctx.grace_s, ctx.log)
        if _budget_left(ctx) <= 0:
            return None
        trial = ctx.study.ask()
        run_dir = trial.user_attrs.get("run_dir") or str(ctx.out_dir / "trials" / f"trial_{trial.number:04d}")
        for k, v in {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                     "run_dir": run_dir}.items():
            trial.set_user_attr(k, v)
        return trial


def run_trial(ctx: Context, trial) -> Optional[float]:
    """Train one trial (validation only) and tell Optuna its outcome."""
    optuna = _optuna()
    from optuna.trial import TrialState

    from kdlab.train.build import build_run, trainer_for
    from kdlab.train.trainer import TrainingError

    spec = ctx.spec
    values = {p.path: p.suggest(trial) for p in spec.spaces()}
    recipe = with_values(spec.base(), values)
    run_dir = trial.user_attrs["run_dir"]
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    try:
        with Heartbeat(ctx.storage, _trial_id(ctx, trial), ctx.heartbeat_s):
            run = build_run(recipe, teacher=ctx.teacher, store=ctx.store)
            run.test_loader = None  # the search never sees the test split
            trainer = trainer_for(run, run_dir, progress=False, method=f"trial{trial.number}",
                                  callbacks=[PruneCallback(trial, spec.metric)])
            res = trainer.fit()
        value = float(res[spec.metric])
    except optuna.TrialPruned as e:
        ctx.study.tell(trial, state=TrialState.PRUNED)
        ctx.log(f"trial {trial.number:>3} pruned ({e}): {shown}")
        return None
    except TrainingError as e:  # e.g. a non-finite loss: a bad point of the space, not a crash
        trial.set_user_attr("error", str(e))
        ctx.study.tell(trial, state=TrialState.FAIL)
        ctx.log(f"trial {trial.number:>3} failed: {e}")
        return None
    except KeyboardInterrupt:
        trial.set_user_attr("failed_because", "interrupted")
        ctx.study.tell(trial, state=TrialState.FAIL)
        ctx.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "run_dir": run_dir})
        raise
    except BaseException as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        ctx.study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("epochs_run", res.get("epochs_run"))
    trial.set_user_attr("best_epoch", res.get("best_epoch"))
    ctx.study.tell(trial, value)
    ctx.log(f"trial {trial.number:>3} {spec.metric} {value:.4f} (best epoch {res.get('best_epoch')}): {shown}")
    return value


def _trial_id(ctx: Context, trial) -> int:
    study_id = ctx.storage.get_study_id_from_name(ctx.study.study_name)
    return ctx.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)


def work(ctx: Context) -> int:
    """Run trials until the study's budget is spent; returns how many this worker ran."""
    n = 0
    while True:
        trial = _next_trial(ctx)
        if trial is None:
            return n
        run_trial(ctx, trial)
        n += 1


def _teacher_and_store(spec: TuneSpec, out_dir: Path, *, prefill: bool, log=print):
    """The teacher (trained first when missing) and a teacher cache shared through files."""
    from kdlab.distill.teachers import TeacherStore
    from kdlab.experiments.parallel import prefill_job, shared_teacher, uses_cache
    from kdlab.train.build import ensure_teachers

    base = spec.base()
    if not base.needs_teacher():
        return None, None
    ensure_teachers(base, progress=False, log=log)
    root = out_dir / ".teacher_cache"
    if prefill and uses_cache(base):
        log(f"teacher cache: filling {base.train.epochs} epochs once -> {root}")
        prefill_job([base], base.train.seed, str(root))
    return shared_teacher(base), TeacherStore(root)


def worker_main(spec_dict: dict, source, out_dir: str, storage_url, name: str, seed: int,
                threads: Optional[int], heartbeat_s: float, grace_s: float) -> int:
    """Entry point of a spawned local worker process."""
    from kdlab.experiments.parallel import set_threads

    set_threads(threads)
    spec = TuneSpec(**spec_dict, trials=1, source=source)  # the budget is the study's
    out = Path(out_dir)
    storage = make_storage(storage_url, out)
    teacher, store = _teacher_and_store(spec, out, prefill=False, log=lambda *a: None)
    ctx = Context(spec, open_study(spec, storage, name, seed, set_budget=False), storage, out, teacher, store,
                  heartbeat_s, grace_s, log=print)
    return work(ctx)


def wait_for_others(ctx: Context, poll_s: float = 2.0) -> None:
    """Block until no trial of the study is running (failing stale ones meanwhile)."""
    from optuna.trial import TrialState

    while True:
        with file_lock(ctx.out_dir / ".tune.lock"):
            fail_stale(ctx.study, ctx.storage, ctx.grace_s, ctx.log)
        if not ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(poll_s)


# -- outputs ------------------------------------------------------------------------------------
def best_recipe(spec: TuneSpec, study) -> Recipe:
    """The base recipe with the best trial's values, named ``<name>-tuned``."""
    best = study.best_trial
    r = with_values(spec.base(), best.params)
    d = r.to_dict()
    d["name"] = f"{r.name}-tuned"
    vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    d["description"] = f"{r.name} tuned by kdlab tune (trial {best.number}, {spec.metric} {best.value:.4f}): {vals}"
    out = recipe_from_dict(d, spec.source or "tuned recipe")
    out.source = spec.source
    return out


def trials_rows(study) -> list[dict]:
    """One row per trial: number, state, value, parameters, epochs, duration, retries, errors."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        ua = t.user_attrs
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{f"param:{k}": v for k, v in t.params.items()},
                     "epochs_reported": len(t.intermediate_values), "epochs_run": ua.get("epochs_run"),
                     "best_epoch": ua.get("best_epoch"), "duration_s": dur, "retry_of": ua.get("retry_of"),
                     "note": ua.get("error") or ua.get("failed_because") or ua.get("note") or "", "run_dir": ua.get("run_dir")})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def write_outputs(spec: TuneSpec, study, out_dir: Path, log=print) -> dict:
    """best.yaml, trials.csv, importances.csv, tune.json and the three plots."""
    optuna = _optuna()
    from optuna.trial import TrialState

    from kdlab.core.io import write_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "trials.csv", trials_rows(study))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"no trial of study '{study.study_name}' completed; see {out_dir / 'trials.csv'}")
    best = best_recipe(spec, study)
    atomic_write_text(out_dir / "best.yaml", yaml.safe_dump(best.to_dict(), sort_keys=False))
    importances = {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        if len(complete) >= 2 and len(spec.params) >= 1:
            try:
                importances = optuna.importance.get_param_importances(study)
            except (RuntimeError, ValueError) as e:  # e.g. all trials with the same value
                log(f"parameter importances not computed: {e}")
        write_csv(out_dir / "importances.csv", [{"param": k, "importance": v} for k, v in importances.items()])
        plots = [("history.png", ovm.plot_optimization_history, {})]
        if len(spec.params) > 1 or len(complete) > 1:
            plots.append(("parallel.png", ovm.plot_parallel_coordinate, {}))
        if importances:
            plots.append(("importances.png", ovm.plot_param_importances, {}))
        for fname, fn, kw in plots:
            ax = fn(study, **kw)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=110)
            plt.close(fig)
    states = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary = {"study": study.study_name, "metric": spec.metric, "direction": spec.direction,
               "best_trial": study.best_trial.number, "best_value": study.best_value,
               "best_params": study.best_trial.params, "trials": states, "importances": importances,
               "settings": spec.identity()}
    atomic_write_text(out_dir / "tune.json", json.dumps(summary, indent=2, default=str))
    log(f"best trial {study.best_trial.number}: {spec.metric} {study.best_value:.4f}  "
        f"({', '.join(f'{k}={v}' for k, v in states.items())})")
    log(f"tuned recipe: {out_dir / 'best.yaml'}  (trials.csv, importances.csv, history.png, parallel.png)")
    return summary


# -- the command --------------------------------------------------------------------------------
def tune(recipe_ref=None, *, params=(), overrides=None, trials=None, metric=None, direction=None,
         sampler=None, pruner=None, warmup_epochs=None, startup_trials=None, out_dir=None, storage=None,
         study_name=None, worker: bool = False, jobs: int = 1, threads: Optional[int] = None,
         seed: Optional[int] = None, then_study: int = 0, data_dir=None, heartbeat_s: float = 30.0,
         grace_s: float = 120.0, progress: bool = False, log=print) -> dict:
    """``kdlab tune``: search ``recipe_ref``'s space (see the module doc) and write the outputs.

    ``worker``: only run trials of the (shared) study, write no outputs; with no recipe, the
    settings are read from the study. ``jobs``: worker processes on this machine (this one plus
    jobs−1 spawned), ``threads`` intra-op threads each (default cores // jobs). ``seed``: the
    sampler's seed (default the recipe's ``train.seed``; each extra worker derives its own).
    ``then_study``: after the search, train the untuned and the tuned recipe over that many seeds
    as a paired study on the test split.
    """
    from kdlab.core.seeding import derive_seed
    from kdlab.experiments.parallel import set_threads, threads_per_job

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1 (got {jobs})")
    if recipe_ref is None:
        if not (worker and study_name):
            raise ValueError("give a recipe (or, for --worker, --storage and --study-name of an existing study)")
        if out_dir is None:
            raise ValueError("a --worker without a recipe needs --out (the search's folder)")
        out = Path(out_dir)
        store_obj = make_storage(storage, out)
        spec = spec_of_study(store_obj, study_name)
    else:
        spec = make_spec(recipe_ref, params=params, overrides=overrides, trials=trials, metric=metric,
                         direction=direction, sampler=sampler, pruner=pruner, warmup_epochs=warmup_epochs,
                         startup_trials=startup_trials, data_dir=data_dir)
        base = spec.base()
        out = Path(out_dir or f"runs/{base.name}-tune")
        if not worker:
            from kdlab.core.io import check_out_dir

            check_out_dir(out, "tune folder")
        store_obj = make_storage(storage, out)
    base = spec.base()
    name = study_name or f"{base.name}-tune"
    seed = base.train.seed if seed is None else int(seed)
    threads = threads or (threads_per_job(jobs) if jobs > 1 else None)
    set_threads(threads)
    my_seed = derive_seed(seed, "tune-worker", socket.gethostname(), os.getpid()) if worker else seed
    study = open_study(spec, store_obj, name, my_seed, set_budget=not worker)
    if not worker and not study.get_trials(deepcopy=False):  # start from the recipe's own values
        own = {p.path: get_path(spec.recipe, p.path) for p in spec.spaces()}
        if all(p.contains(own[p.path]) for p in spec.spaces()):
            study.enqueue_trial(own, user_attrs={"note": "the recipe's own values"})
    teacher, store = _teacher_and_store(spec, out, prefill=not worker, log=log)
    ctx = Context(spec, study, store_obj, out, teacher, store, heartbeat_s, grace_s, log)
    log(f"tuning {base.name}: {len(spec.params)} values, {study_budget(study)} trials ({spec.sampler}, "
        f"pruner {spec.pruner}), {spec.metric} on the validation split -> {out}  [study '{name}', "
        f"{jobs} worker(s)]")
    procs = []
    if jobs > 1:
        import multiprocessing as mp

        mpc = mp.get_context("spawn")
        url = storage if storage else None
        for i in range(1, jobs):
            p = mpc.Process(target=worker_main, args=(spec.identity(), spec.source, str(out), url, name,
                                                      derive_seed(seed, "tune-worker", i), threads,
                                                      heartbeat_s, grace_s))
            p.start()
            procs.append(p)
    try:
        work(ctx)
    finally:
        for p in procs:
            p.join()
    if worker:
        return {"study": name, "out_dir": str(out)}
    wait_for_others(ctx)
    summary = write_outputs(spec, study, out, log)
    if then_study:
        summary["study_report"] = compare_tuned(spec, study, out, seeds=list(range(then_study)),
                                                progress=progress, log=log, jobs=jobs)
    return summary


def compare_tuned(spec: TuneSpec, study, out_dir: Path, *, seeds: list[int], progress=False, log=print,
                  jobs: int = 1) -> dict:
    """The honest evaluation: the untuned and the tuned recipe as a paired study over ``seeds``
    on the test split (``<out_dir>/study``; table with the paired difference and its interval)."""
    from kdlab.experiments.study import run_study

    recipes = {"untuned": spec.base(), "tuned": best_recipe(spec, study)}
    log(f"\ntuned vs untuned on the test split, seeds {seeds} -> {out_dir / 'study'}")
    return run_study(recipes, out_dir / "study", seeds=seeds, progress=progress, log=log,
                     baseline="untuned", profile=False, jobs=jobs)
