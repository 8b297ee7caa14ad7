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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kdlab.core.config import apply_overrides
from kdlab.core.lock import file_lock
from kdlab.experiments.tune_space import (ParamSpec, get_path, parse_param, parse_range, set_path,  # noqa: F401
                                          with_values)
from kdlab.experiments.tune_outputs import best_recipe, trials_rows, write_outputs  # noqa: F401
from kdlab.experiments.tune_storage import (optuna_module, counted, fail_stale, Heartbeat,  # noqa: F401
                                            make_pruner, make_sampler, make_storage, open_study,
                                            pid_alive, study_budget)
from kdlab.train.callbacks import Callback

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
TUNE_KEYS = {"params", "trials", "metric", "direction", "sampler", "pruner", "warmup_epochs", "startup_trials"}


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
    task: str = "classification"

    def spaces(self) -> list[ParamSpec]:
        return [ParamSpec(**{**p, "choices": tuple(p.get("choices", ()))}) for p in self.params]

    def get_task(self):
        from kdlab.tasks import get_task

        return get_task(self.task)

    def base(self):
        r = self.get_task().from_dict(copy.deepcopy(self.recipe), self.source or "tuned recipe")
        r.source = self.source
        return r

    def identity(self) -> dict:
        """What must agree between the workers of a study (the budget ``trials`` may change);
        ``task`` only when not classification (studies made before tasks keep their identity)."""
        d = asdict(self)
        d.pop("source")
        d.pop("trials")
        if d.get("task") == "classification":
            d.pop("task")
        return json.loads(json.dumps(d))


def load_tune_recipe(ref, overrides=None) -> tuple[Any, dict]:
    """A recipe of any task and its ``tune:`` section (removed before validation); ``overrides``
    as :func:`kdlab.train.recipe.load_recipe`'s."""
    from kdlab.core.config import read_recipe_yaml, resolve_recipe_path
    from kdlab.tasks import get_task, task_of
    from kdlab.tasks.base import resolve_ref

    path = resolve_ref(ref)
    raw = read_recipe_yaml(path)
    section = raw.pop("tune", None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: tune: must be a mapping (params, trials, metric, ...)")
    bad = set(section) - TUNE_KEYS
    if bad:
        raise ValueError(f"{path}: tune.{sorted(bad)[0]}: unknown key (keys: {', '.join(sorted(TUNE_KEYS))})")
    apply_overrides(raw, overrides)
    recipe = get_task(task_of(raw)).from_dict(raw, str(path))
    recipe.source = str(path)
    t = getattr(recipe, "teacher", None)
    if t is not None and getattr(t, "recipe", None):
        recipe.teacher.recipe = str(resolve_recipe_path(recipe.teacher.recipe, path.parent))
    return recipe, section


def make_spec(recipe_ref, *, params=(), overrides=None, trials=None, metric=None, direction=None,
              sampler=None, pruner=None, warmup_epochs=None, startup_trials=None,
              data_dir=None) -> TuneSpec:
    """The :class:`TuneSpec` of a recipe: its ``tune:`` section, then the command-line values.
    The metric defaults to the task's validation ``select`` metric (``val_acc``, ``val_bpb``) and
    the direction to that metric's declared one."""
    from kdlab.tasks import get_task

    recipe, section = load_tune_recipe(recipe_ref, overrides)
    task = get_task(getattr(recipe, "task", None))
    recipe = task.with_data_dir(recipe, data_dir)
    spaces = {p.path: p for p in (parse_range(k, v) for k, v in (section.get("params") or {}).items())}
    spaces.update({p.path: p for p in map(parse_param, params)})
    if not spaces:
        raise ValueError("nothing to search: give --param path=range (e.g. --param loss.kd.T=2:8) "
                         "or a tune.params section in the recipe")
    raw = recipe.to_dict()
    for p in spaces.values():  # every searched path is a key of the recipe: refused before anything is written
        value = get_path(raw, p.path)
        try:
            with_values(recipe, {p.path: value if value is not None else p.choices[0] if p.choices else p.low})
        except (ValueError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ValueError(f"search path {p.path}: {msg}") from None
    pick = lambda k, v, d: v if v is not None else section.get(k, d)  # noqa: E731
    chosen = pick("metric", metric, f"val_{task.select}")
    declared = {f"val_{m.name}": m for m in task.metrics}
    default_dir = ("minimize" if declared[chosen].direction == "min" else "maximize") if chosen in declared \
        else "maximize"
    spec = TuneSpec(recipe=raw, params=[{**asdict(p), "choices": list(p.choices)} for p in spaces.values()],
                    trials=int(pick("trials", trials, 30)), metric=chosen,
                    direction=pick("direction", direction, default_dir), sampler=pick("sampler", sampler, "tpe"),
                    pruner=pick("pruner", pruner, "median"),
                    warmup_epochs=int(pick("warmup_epochs", warmup_epochs, 1)),
                    startup_trials=int(pick("startup_trials", startup_trials, 5)), source=recipe.source,
                    task=task.name)
    if spec.trials < 1:
        raise ValueError(f"trials must be at least 1 (got {spec.trials})")
    if spec.sampler not in SAMPLERS:
        raise ValueError(f"sampler '{spec.sampler}' is not one of {', '.join(SAMPLERS)}")
    if spec.pruner not in PRUNERS:
        raise ValueError(f"pruner '{spec.pruner}' is not one of {', '.join(PRUNERS)}")
    if spec.direction not in ("maximize", "minimize"):
        raise ValueError(f"direction '{spec.direction}' must be maximize or minimize")
    if not spec.metric.startswith("val_"):
        raise ValueError(f"metric '{spec.metric}' must be a validation metric "
                         f"({', '.join(declared)}, ...); "
                         f"the test split is kept out of the search")
    return spec


def spec_of_study(storage, name: str) -> TuneSpec:
    """The settings stored in an existing study (a ``--worker`` started with no recipe)."""
    optuna = optuna_module()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise KeyError(f"no study '{name}' in this storage; start it with `kdlab tune <recipe>` first") from None
    d = study.user_attrs.get("kdlab_spec")
    if d is None:
        raise ValueError(f"study '{name}' was not made by kdlab tune; give the recipe")
    return TuneSpec(**d, trials=study_budget(study), source=study.user_attrs.get("kdlab_source"))


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
            raise optuna_module().TrialPruned(f"pruned after epoch {row['epoch']}")


# -- the worker loop ----------------------------------------------------------------------------
@dataclass
class Context:
    """One worker's state: the study, its storage, the out folder and what the task shares
    between trials (``shared``: :meth:`prepare_tune` of the task, e.g. the teacher and its cache)."""

    spec: TuneSpec
    study: Any
    storage: Any
    out_dir: Path
    shared: Any = None
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
    optuna = optuna_module()
    from optuna.trial import TrialState

    from kdlab.train.trainer import TrainingError

    spec = ctx.spec
    values = {p.path: p.suggest(trial) for p in spec.spaces()}
    recipe = with_values(spec.base(), values)
    run_dir = trial.user_attrs["run_dir"]
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    try:
        with Heartbeat(ctx.storage, _trial_id(ctx, trial), ctx.heartbeat_s):
            res = spec.get_task().tune_run(recipe, Path(run_dir), context=ctx.shared, method=f"trial{trial.number}",
                                           callbacks=[PruneCallback(trial, spec.metric)], progress=False)
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


def work(ctx: Context, progress: bool = False) -> int:
    """Run trials until the study's budget is spent; returns how many this worker ran.
    ``progress``: a bar of the study's finished trials (all workers'), plain lines when piped."""
    from optuna.trial import TrialState

    from kdlab.core.progress import progress_bar

    def finished() -> int:
        return len(ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.FAIL)))

    bar = progress_bar(study_budget(ctx.study), "tuning", "trial", enabled=progress, initial=finished())
    seen = finished() if progress else 0
    n = 0
    try:
        while True:
            trial = _next_trial(ctx)
            if trial is None:
                return n
            run_trial(ctx, trial)
            n += 1
            if progress:
                now = finished()
                bar.update(now - seen)
                seen = now
    finally:
        bar.close()


def prepare_shared(spec: TuneSpec, out_dir: Path, *, prefill: bool, log=print):
    """What every trial of the search shares, from the task (``prepare_tune``: classification's
    teacher, trained first when missing, and a teacher cache shared through files)."""
    return spec.get_task().prepare_tune(spec.base(), out_dir, prefill=prefill, log=log)


def worker_main(spec_dict: dict, source, out_dir: str, storage_url, name: str, seed: int,
                threads: Optional[int], heartbeat_s: float, grace_s: float) -> int:
    """Entry point of a spawned local worker process."""
    from kdlab.train.prefill import set_threads

    set_threads(threads)
    spec = TuneSpec(**spec_dict, trials=1, source=source)  # the budget is the study's
    out = Path(out_dir)
    storage = make_storage(storage_url, out)
    shared = prepare_shared(spec, out, prefill=False, log=lambda *a: None)
    ctx = Context(spec, open_study(spec, storage, name, seed, set_budget=False), storage, out, shared,
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
        from kdlab.train.build import check_can_train

        check_can_train(base)  # the device, before the journal is made or the teacher trains
        if not worker:
            from kdlab.core.io import check_out_dir

            check_out_dir(out, "tune folder")
        store_obj = make_storage(storage, out)
    base = spec.base()
    name = study_name or f"{base.name}-tune"
    seed = getattr(getattr(base, "train", None), "seed", 0) if seed is None else int(seed)
    threads = threads or (threads_per_job(jobs) if jobs > 1 else None)
    set_threads(threads)
    my_seed = derive_seed(seed, "tune-worker", socket.gethostname(), os.getpid()) if worker else seed
    study = open_study(spec, store_obj, name, my_seed, set_budget=not worker)
    if not worker and not study.get_trials(deepcopy=False):  # start from the recipe's own values
        own = {p.path: get_path(spec.recipe, p.path) for p in spec.spaces()}
        if all(p.contains(own[p.path]) for p in spec.spaces()):
            study.enqueue_trial(own, user_attrs={"note": "the recipe's own values"})
    shared = prepare_shared(spec, out, prefill=not worker, log=log)
    ctx = Context(spec, study, store_obj, out, shared, heartbeat_s, grace_s, log)
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
        work(ctx, progress=progress)
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
                     baseline="untuned", profile=False, jobs=jobs, task=spec.get_task())
