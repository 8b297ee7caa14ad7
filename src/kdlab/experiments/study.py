"""Studies of any task: many runs built from one recipe (ablation ladders, leave-one-out sets,
method lists), each over several seeds, with finished runs skipped and one report at the end.

The task (:mod:`kdlab.tasks`) says what the methods are (:meth:`~kdlab.tasks.base.Task.
ablation_methods`), how one run is trained (:meth:`~kdlab.tasks.base.Task.train`) and which
metrics it reports; this module owns the rest, the same for every task:

* the layout ``<out>/<method>/seed<k>/`` (run k of every method uses seed k: a paired design);
* one recipe under two names (``--mode both``: ``full-align`` of kd+align+attn is ``kd+attn``) is
  trained once and recorded as an alias, so Holm counts each comparison once;
* the report of each ablation mode in its own folder: ``<out>/report`` (the ladder, or a task's
  method list), ``<out>/report-loo``, ``<out>/report-both``, each with ``study.json``;
* the table, paired statistics, forest plot and validation curves of the task's primary metric
  (:mod:`kdlab.report.tables`), rebuilt byte for byte by ``kdlab report``.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Optional

from kdlab.core.io import check_out_dir, inside, write_json
from kdlab.tasks import Task, get_task, load_recipe


def ablation_methods(full, mode: str = "ladder") -> dict:
    """Name -> recipe of a classification recipe's ladder / leave-one-out set (see
    :func:`kdlab.tasks.classification.ablation_methods`)."""
    return get_task(getattr(full, "task", None)).ablation_methods(full, mode)


def distinct_methods(task: Task, methods: dict) -> tuple[dict, dict]:
    """``(distinct, aliases)``: the methods with one entry per distinct recipe (the first name
    wins) and ``{other name: kept name}`` for the rest."""
    distinct, aliases, seen = {}, {}, {}
    for m, r in methods.items():
        key = json.dumps(task.run_key(r), sort_keys=True, default=str)
        if key in seen:
            aliases[m] = seen[key]
        else:
            seen[key] = m
            distinct[m] = r
    return distinct, aliases


def report_folder(out_dir, mode: Optional[str]) -> Path:
    """``<out>/report`` for the ladder (or a task's method list), ``<out>/report-<mode>`` else."""
    return Path(out_dir) / ("report" if mode in (None, "ladder") else f"report-{mode}")


def load_seed_models(study_dir: Path, stats, seed: int, device) -> tuple[dict, dict]:
    """The trained models of one study seed: ``({method: model}, {method: checkpoint dict})`` from
    ``<study_dir>/<method>/seed<seed>/best.pt`` for each method of the study table's rows
    ``stats`` (dicts with ``method`` and ``seeds``), in their order; a method without that file is
    left out, unless the table lists the seed for it: then FileNotFoundError says how to rebuild it."""
    from kdlab.models.adapters import load_model

    models, cks = {}, {}
    for m in [r["method"] for r in stats]:
        path = Path(study_dir) / m / f"seed{seed}" / "best.pt"
        if path.is_file():
            models[m], cks[m] = load_model(path, device)
        elif seed in next(r["seeds"] for r in stats if r["method"] == m):  # the table has this run
            raise FileNotFoundError(
                f"{path} is missing (method {m}, seed {seed} of the study table); re-run the study "
                f"command with --out {study_dir} (it rebuilds best.pt from last.pt, or retrains the "
                f"run), then kdlab robustness --study again")
    return models, cks


def _task_of(recipes: dict, task) -> Task:
    if isinstance(task, Task):
        return task
    first = next(iter(recipes.values()))
    return get_task(task or getattr(first, "task", None))


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_study(recipes: dict, out_dir, *, seeds: list[int], data_dir=None, progress: bool = True,
              log=print, baseline: Optional[str] = None, profile: bool = True, teacher_cache: bool = True,
              jobs: int = 1, launcher: str = "local", threads: Optional[int] = None,
              launcher_options: Optional[dict] = None, task=None, report_dir=None,
              aliases: Optional[dict] = None, train_only: Optional[list] = None) -> dict:
    """Train every (method, seed) into ``out_dir/<method>/seed<k>`` and write the report.

    ``task``: a :class:`~kdlab.tasks.base.Task` or its name (default: the recipes' ``task``).
    ``teacher_cache``: share the teacher's outputs between the study's runs (classification
    recipes with ``train.teacher_mode: cache-*``; docs/speed.md). ``jobs`` > 1 or
    ``launcher="submitit"``: run the independent runs in that many processes
    (:mod:`kdlab.experiments.parallel`, classification). ``report_dir``: where the report goes
    (default ``out_dir/report``); ``aliases``: method names recorded as another method's runs.
    ``train_only``: train only these methods; the others join the table when every seed of
    theirs is finished (``kdlab lm ablate --methods``)."""
    check_out_dir(out_dir, "study folder")  # before any teacher is trained
    task = _task_of(recipes, task)
    out_dir = Path(out_dir)
    report_dir = Path(report_dir or out_dir / "report")
    baseline = baseline or task.baseline(recipes)
    if jobs != 1 or launcher != "local":
        if task.name != "classification":
            raise ValueError(f"--jobs / --launcher run classification studies in parallel; the "
                             f"{task.name} task runs one run at a time (leave --jobs out)")
        return _run_study_parallel(task, recipes, out_dir, seeds=seeds, data_dir=data_dir, progress=progress,
                                   log=log, baseline=baseline, profile=profile, teacher_cache=teacher_cache,
                                   jobs=jobs, launcher=launcher, threads=threads,
                                   launcher_options=launcher_options, report_dir=report_dir, aliases=aliases)
    from kdlab.train.runtime import is_main

    recipes = {m: task.with_data_dir(r, data_dir) for m, r in recipes.items()}
    kw = {"teacher_cache": teacher_cache} if _accepts(task.prepare_study, "teacher_cache") else {}
    ctx = task.prepare_study(recipes, out_dir, data_dir=data_dir, progress=progress, log=log, **kw)
    todo = [m for m in recipes if train_only is None or m in train_only]
    pairs = ([(m, s) for m in todo for s in seeds] if task.study_order == "method"
             else [(m, s) for s in seeds for m in todo])
    rows, now = [], []  # now: the runs trained by this call (not reused finished ones)
    t_start = time.perf_counter()
    for method, seed in pairs:
        run_dir = inside(out_dir, out_dir / method / f"seed{seed}", f"run folder of method {method!r}")
        finished = (run_dir / "result.json").exists()
        res = task.train(recipes[method].with_seed(seed), run_dir, context=ctx, method=method, progress=progress)
        res = {**res, "method": method, "seed": int(seed)}
        rows.append(res)
        if not finished:
            now.append(res)
        state = "done earlier" if finished else f"{res.get('train_time_s', float('nan')):.1f}s"
        log(f"  {method:<14} seed {seed}: {task.run_line(res)}  ({state})")
    others = [m for m in recipes if m not in todo
              and all((out_dir / m / f"seed{s}" / "result.json").is_file() for s in seeds)]
    if others:  # a --methods subset: the table still covers the study's other finished methods
        log(f"also in the table (finished earlier): {', '.join(others)}")
        for m in others:
            for s in seeds:
                res = task.train(recipes[m].with_seed(s), out_dir / m / f"seed{s}", context=ctx, method=m,
                                 progress=False)
                rows.append({**res, "method": m, "seed": int(s)})
    wall = time.perf_counter() - t_start
    store = getattr(ctx, "store", None)
    if store is not None and getattr(store, "hits", 0) + getattr(store, "misses", 0):
        log(f"teacher cache: {store.hits} batches reused, {store.misses} computed")
    teacher_s = sum(r.get("teacher_time_s", 0.0) for r in now)  # of this call's runs: within its wall time
    log(f"study wall time {wall:.1f}s ({len(now)} of {len(pairs)} runs trained now); teacher outputs and masks "
        f"{teacher_s:.1f}s (computed once per batch and shared when cached); students' own training "
        f"{sum(r.get('train_time_s', 0.0) for r in now) - teacher_s:.1f}s")
    task.finish_study(rows, log=log)
    if not is_main():
        return {}
    t_report = time.perf_counter()
    report = _report(task, ctx, rows, recipes, report_dir, baseline=baseline, wall=wall, profile=profile,
                     log=log, aliases=aliases)
    report["report_time_s"] = time.perf_counter() - t_report  # tables, statistics, figures, page (kdlab bench)
    return report


def _report(task: Task, ctx, rows: list, recipes: dict, report_dir: Path, *, baseline: str, wall: float,
            profile: bool, log, aliases=None) -> dict:
    from kdlab.report.tables import study_report

    metric = task.metric()
    secondary = [m for m in task.metrics if m.table and m.name != metric.name]
    teacher = getattr(ctx, "teacher_result", None) or task.teacher_result(recipes)
    tv = teacher.get(f"test_{metric.name}") if isinstance(teacher, dict) else None
    notes = task.study_notes(ctx, rows, recipes)
    return study_report(rows, recipes, report_dir, baseline=baseline, wall_time_s=wall, profile=profile,
                        log=log, metric=metric, secondary=secondary, sample_unit=task.sample_unit,
                        teacher_value=tv, profiler=task.profile, notes=notes, task=task.name, aliases=aliases,
                        extra=getattr(ctx, "table_extra", None))


def _run_study_parallel(task, recipes, out_dir, *, seeds, data_dir, progress, log, baseline, profile,
                        teacher_cache, jobs, launcher, threads, launcher_options, report_dir, aliases) -> dict:
    """``run_study`` through :func:`kdlab.experiments.parallel.run_jobs`: teachers trained here,
    the teacher cache filled once, then the runs fanned out; rows in the sequential order."""
    from kdlab.experiments.parallel import run_jobs, study_jobs, threads_per_job
    from kdlab.train.build import ensure_teachers, with_data_dir
    from kdlab.train.runtime import is_main

    out_dir = Path(out_dir)
    recipes = {m: with_data_dir(r, data_dir) for m, r in recipes.items()}
    t_start = time.perf_counter()
    for recipe in recipes.values():
        if recipe.needs_teacher():
            ensure_teachers(recipe, data_dir=data_dir, progress=progress, log=log)
    threads = threads or threads_per_job(jobs)
    log(f"running {len(recipes) * len(seeds)} runs in {jobs} {launcher} worker(s), {threads} thread(s) each")
    rows, counts = run_jobs(study_jobs(recipes, out_dir, seeds), n_jobs=jobs, launcher=launcher,
                            threads=threads, cache_root=out_dir / ".teacher_cache" if teacher_cache else None,
                            launcher_options=launcher_options, folder=out_dir / ".submitit", log=log)
    wall = time.perf_counter() - t_start
    if counts["hits"] + counts["misses"]:
        log(f"teacher cache: {counts['hits']} batches reused, {counts['misses']} computed")
    log(f"study wall time {wall:.1f}s; students' own training time "
        f"{sum(r.get('train_time_s', 0.0) for r in rows):.1f}s")
    if not is_main():
        return {}
    return _report(task, None, rows, recipes, report_dir, baseline=baseline, wall=wall, profile=profile,
                   log=log, aliases=aliases)


def run_ablation(recipe_ref, *, out_dir=None, seeds=None, mode=None, data_dir=None,
                 overrides=None, progress=True, log=print, teacher_cache: bool = True,
                 jobs: int = 1, launcher: str = "local", threads: Optional[int] = None,
                 launcher_options: Optional[dict] = None, methods: Optional[list] = None,
                 task: Optional[str] = None) -> dict:
    """``kdlab ablate``: the study of any task's recipe over seeds (classification: the ladder
    and/or leave-one-out set of a full recipe; language models: the recipe's ``study.methods``).

    ``task``: read the recipe as this task's (default: its ``task:``); ``methods``: train only
    these (the others' finished runs still join the table); ``jobs``, ``launcher``, ``threads``,
    ``launcher_options``: see :func:`run_study`. The report goes to :func:`report_folder`."""
    full = get_task(task).load_recipe(recipe_ref, overrides) if task else load_recipe(recipe_ref, overrides)
    t = get_task(getattr(full, "task", None))
    if getattr(full, "kind", None) == "arithmetic":  # the LM trace study: exact match, its own table
        from kdlab.lm.arithmetic_study import run_arithmetic

        return run_arithmetic(full, Path(out_dir or f"runs/{full.name}"), seeds=seeds, progress=progress, log=log)
    seeds = list(seeds) if seeds else list(full.study.seeds)
    if mode is None and isinstance(getattr(full.study, "methods", None), str):
        mode = full.study.methods
    all_methods = t.ablation_methods(full, mode or "ladder")
    if methods:
        unknown = [m for m in methods if m not in all_methods]
        if unknown:
            raise KeyError(f"no study method '{unknown[0]}' in {full.name}; methods: {', '.join(all_methods)}")
    distinct, aliases = distinct_methods(t, all_methods)
    out_dir = Path(out_dir or f"runs/{full.name}")
    rdir = report_folder(out_dir, mode)
    base = t.baseline(distinct)
    check_out_dir(out_dir, "study folder", create=False)  # created once the inputs are checked
    from kdlab.train.build import check_can_train

    for r in distinct.values():  # every task's device, before a teacher trains or the header prints
        check_can_train(r)
    t.check_study(distinct, data_dir)  # data, teachers: refused before anything is printed or written
    if aliases:
        log("same recipe under two names, trained once: "
            + ", ".join(f"{a} = {b}" for a, b in aliases.items()))
    log(f"study '{full.name}' ({t.name}): {len(distinct)} methods x {len(seeds)} seeds -> {out_dir}")
    from kdlab.train.runtime import is_main
    if is_main():  # what the study is, before its report: the report's page and figure titles read it,
        # so the first report and `kdlab report` write the same files (a rank > 0 writes nothing)
        write_json(rdir / "study.json",
                   {"task": t.name, "recipe": full.to_dict(), "source": full.source, "seeds": seeds,
                    "mode": mode, "methods": list(distinct), "aliases": aliases})
    return run_study(distinct, out_dir, seeds=seeds, data_dir=data_dir, progress=progress,
                     log=log, baseline=base, teacher_cache=teacher_cache, jobs=jobs, launcher=launcher,
                     threads=threads, launcher_options=launcher_options, task=t, report_dir=rdir,
                     aliases=aliases, train_only=[m for m in distinct if m in methods] if methods else None)


def lm_ablate(recipe_ref, *, out_dir=None, seeds=None, methods=None, overrides=None, progress: bool = False,
              log=print) -> dict:
    """``kdlab lm ablate``: :func:`run_ablation` of an LM recipe (read as one even without
    ``task: lm``), by default into ``runs/lm/<recipe name with / as _>``."""
    from kdlab.lm.recipe import load_lm_recipe

    r = load_lm_recipe(recipe_ref, overrides)
    out = Path(out_dir) if out_dir else Path("runs") / "lm" / r.name.replace("/", "_")
    return run_ablation(recipe_ref, out_dir=out, seeds=seeds, overrides=overrides, methods=methods,
                        progress=progress, log=log, task="lm")
