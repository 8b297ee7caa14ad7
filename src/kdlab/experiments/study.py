"""Studies: many runs built from one recipe (ablation ladders, leave-one-out sets, method lists),
each over several seeds, with finished runs skipped and one report at the end.

From a *full* recipe whose loss is ``ce`` plus components (e.g. ``kd``, ``align``, ``attn``):

* the step-wise **ladder**: ``baseline`` (CE only), the first component (``kd``), the first
  component plus each other one alone (``kd+align``, ``kd+attn``), and ``full``;
* the **leave-one-out** set: ``full-<c>`` for each component c.

Every method keeps the full recipe's hyperparameters, data order and augmentation (a paired
design: run k of every method uses seed k). A method without a ``kd`` term trains CE with
weight 1; with ``kd`` it keeps the full recipe's CE weight (the ``1 − α`` of Hinton's KD).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from kdlab.core.config import Recipe, TermCfg, load_recipe
from kdlab.core.io import check_out_dir, write_json


def _components(full: Recipe) -> tuple[Optional[TermCfg], list[TermCfg]]:
    ce = next((t for t in full.loss if t.term == "ce"), None)
    comps = [t for t in full.loss if t.term != "ce"]
    if not comps:
        raise ValueError(f"recipe '{full.name}' has only a 'ce' term; an ablation needs a distillation term")
    return ce, comps


def _method(full: Recipe, comps: list[TermCfg], ce: Optional[TermCfg]) -> Recipe:
    loss = []
    has_kd = any(c.term == "kd" for c in comps)
    if ce is not None or not comps:
        ce_cfg = (ce or TermCfg(term="ce")).model_dump()
        if not has_kd:
            ce_cfg["weight"] = 1.0
        loss.append(ce_cfg)
    loss += [c.model_dump() for c in comps]
    from kdlab.distill.losses import build_terms

    terms = build_terms(TermCfg.model_validate(t) for t in loss)
    if not any(t.needs_masks for _, _, t in terms):
        return full.derive(loss=loss, mask=None)
    return full.derive(loss=loss)


def ablation_methods(full: Recipe, mode: str = "ladder") -> dict[str, Recipe]:
    """Name -> recipe for the ladder, the leave-one-out set, or both."""
    if mode not in ("ladder", "loo", "both"):
        raise ValueError("ablation mode must be ladder, loo or both")
    ce, comps = _components(full)
    names = [c.term for c in comps]
    out: dict[str, Recipe] = {}
    if mode in ("ladder", "both"):
        out["baseline"] = _method(full, [], ce)
        out[names[0]] = _method(full, comps[:1], ce)
        for c in comps[1:]:
            out[f"{names[0]}+{c.term}"] = _method(full, [comps[0], c], ce)
        if len(comps) > 2 or (len(comps) == 2 and "full" not in out):
            out["full"] = full
    if mode in ("loo", "both"):
        out.setdefault("full", full)
        if len(comps) > 1:
            for i, c in enumerate(comps):
                out[f"full-{c.term}"] = _method(full, comps[:i] + comps[i + 1:], ce)
    if len(comps) == 2 and "full" in out and f"{names[0]}+{names[1]}" in out:
        del out[f"{names[0]}+{names[1]}"]  # identical to full
    return out


def run_study(recipes: dict[str, Recipe], out_dir, *, seeds: list[int], data_dir=None,
              progress: bool = True, log=print, baseline: str = "baseline",
              profile: bool = True, teacher_cache: bool = True, jobs: int = 1,
              launcher: str = "local", threads: Optional[int] = None,
              launcher_options: Optional[dict] = None) -> dict:
    """Train every (method, seed) into ``out_dir/<method>/seed<k>`` and write the report.

    ``teacher_cache``: share the teacher's outputs between the study's runs (recipes with
    ``train.teacher_mode: cache-*``), in memory and ``out_dir/.teacher_cache`` (docs/speed.md).
    ``jobs`` > 1 or ``launcher="submitit"``: run the independent runs in that many processes
    (:mod:`kdlab.experiments.parallel`; ``threads`` intra-op threads each, default cores // jobs;
    ``launcher_options`` for submitit), with the same results and report as the sequential loop."""
    check_out_dir(out_dir, "study folder")  # before any teacher is trained
    if jobs != 1 or launcher != "local":
        return _run_study_parallel(recipes, out_dir, seeds=seeds, data_dir=data_dir, progress=progress,
                                   log=log, baseline=baseline, profile=profile, teacher_cache=teacher_cache,
                                   jobs=jobs, launcher=launcher, threads=threads,
                                   launcher_options=launcher_options)
    from kdlab.distill.teachers import TeacherStore
    from kdlab.report.tables import study_report
    from kdlab.train.build import ensure_teachers, load_splits, load_teacher, teacher_layers_of, train, with_data_dir
    from kdlab.train.runtime import is_main, resolve_device

    out_dir = Path(out_dir)
    store = TeacherStore(out_dir / ".teacher_cache") if teacher_cache else None
    recipes = {m: with_data_dir(r, data_dir) for m, r in recipes.items()}
    if store is not None:
        store.expect(teacher_layers_of(recipes.values()))
    teachers = {}
    rows = []
    t_start = time.perf_counter()
    for method, recipe in recipes.items():
        teacher = None
        if recipe.needs_teacher():
            ensure_teachers(recipe, data_dir=data_dir, progress=progress, log=log)
            key = recipe.teacher.checkpoint
            if key not in teachers:
                info = load_splits(recipe).info
                teachers[key] = load_teacher(recipe, info, resolve_device(recipe.train.device))
            teacher = teachers[key]
        for seed in seeds:
            r = recipe.with_seed(seed)
            run_dir = out_dir / method / f"seed{seed}"
            finished = (run_dir / "result.json").exists()
            res = train(r, run_dir, teacher=teacher, progress=progress, method=method,
                        teacher_cache=store)
            rows.append(res)
            state = "done earlier" if finished else f"{res['train_time_s']:.1f}s"
            log(f"  {method:<14} seed {seed}: test {res['test_acc']:.4f}  best epoch "
                f"{res['best_epoch']:>3}  ({state})")
    wall = time.perf_counter() - t_start
    if store is not None and store.hits + store.misses:
        log(f"teacher cache: {store.hits} batches reused, {store.misses} computed")
    teacher_s = sum(r.get("teacher_time_s", 0.0) for r in rows)
    log(f"study wall time {wall:.1f}s; teacher outputs and masks {teacher_s:.1f}s (computed once per "
        f"batch and shared when cached); students' own training {sum(r.get('train_time_s', 0.0) for r in rows) - teacher_s:.1f}s")
    from kdlab.train.trainer import mixed_threads

    warn = mixed_threads(rows)
    if warn:
        log(warn)
    if not is_main():
        return {}
    return study_report(rows, recipes, out_dir / "report", baseline=baseline, wall_time_s=wall,
                        profile=profile, log=log)


def _run_study_parallel(recipes, out_dir, *, seeds, data_dir, progress, log, baseline, profile,
                        teacher_cache, jobs, launcher, threads, launcher_options) -> dict:
    """``run_study`` through :func:`kdlab.experiments.parallel.run_jobs`: teachers trained here,
    the teacher cache filled once, then the runs fanned out; rows in the sequential order."""
    from kdlab.experiments.parallel import run_jobs, study_jobs, threads_per_job
    from kdlab.report.tables import study_report
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
    return study_report(rows, recipes, out_dir / "report", baseline=baseline, wall_time_s=wall,
                        profile=profile, log=log)


def run_ablation(recipe_ref, *, out_dir=None, seeds=None, mode=None, data_dir=None,
                 overrides=None, progress=True, log=print, teacher_cache: bool = True,
                 jobs: int = 1, launcher: str = "local", threads: Optional[int] = None,
                 launcher_options: Optional[dict] = None) -> dict:
    """``kdlab ablate``: the ladder and/or leave-one-out set of a full recipe over seeds
    (``jobs``, ``launcher``, ``threads``, ``launcher_options``: see :func:`run_study`)."""
    full = load_recipe(recipe_ref, overrides)
    seeds = list(seeds) if seeds else list(full.study.seeds)
    mode = mode or full.study.methods
    methods = ablation_methods(full, mode)
    out_dir = Path(out_dir or f"runs/{full.name}")
    base = "baseline" if "baseline" in methods else "full"
    check_out_dir(out_dir, "study folder")
    log(f"study '{full.name}': {len(methods)} methods x {len(seeds)} seeds -> {out_dir}")
    report = run_study(methods, out_dir, seeds=seeds, data_dir=data_dir, progress=progress,
                       log=log, baseline=base, teacher_cache=teacher_cache, jobs=jobs, launcher=launcher,
                       threads=threads, launcher_options=launcher_options)
    from kdlab.train.runtime import is_main
    if not is_main():  # a rank > 0 of a distributed study writes nothing
        return report
    write_json(out_dir / "report" / "study.json",
               {"recipe": full.to_dict(), "source": full.source, "seeds": seeds, "mode": mode,
                "methods": list(methods)})
    return report
