"""Teacher sharing for runs in other processes: the study's teacher loaded once per process, and a
teacher cache filled once before the runs that read it (used by parallel studies and by the tuner's
workers; :mod:`kdlab.experiments.parallel` has the launchers)."""

from __future__ import annotations

from typing import Optional


def set_threads(threads: Optional[int]) -> None:
    if threads:
        from kdlab.core.threads import pin_threads

        pin_threads(int(threads))


_TEACHERS: dict = {}  # per worker process: teacher checkpoint -> loaded model


def shared_teacher(recipe):
    """The recipe's teacher, loaded once per process (read-only)."""
    from kdlab.train.build import load_splits, load_teacher
    from kdlab.core.device import resolve_device

    key = (recipe.teacher.checkpoint, recipe.train.device)
    if key not in _TEACHERS:
        _TEACHERS[key] = load_teacher(recipe, load_splits(recipe).info, resolve_device(recipe.train.device))
    return _TEACHERS[key]


def uses_cache(recipe) -> bool:
    """Whether the runs of ``recipe`` read teacher outputs from a study's cache."""
    from kdlab.distill.teachers import teacher_plan

    return recipe.needs_teacher() and teacher_plan(recipe.train.teacher_mode).cached


def prefill_job(recipes: list, seed: int, cache_root: str, threads: Optional[int] = None,
                progress: bool = False) -> dict:
    """Store every teacher output the runs of ``recipes`` at ``seed`` will ask for under
    ``cache_root`` (all ``train.epochs`` epochs; entries already there are kept). Returns the
    store's hit / miss counts. ``progress``: a bar per recipe over its batches (plain lines when
    piped)."""
    import torch

    from kdlab.core.progress import progress_bar

    from kdlab.distill.teachers import TeacherStore
    from kdlab.train.build import build_run, teacher_layers_of

    set_threads(threads)
    store = TeacherStore(cache_root, memory_mb=0)  # every finished epoch goes to disk
    store.expect(teacher_layers_of([r for r in recipes if uses_cache(r)]))
    for recipe in recipes:
        if not uses_cache(recipe):
            continue
        r = recipe.with_seed(seed)
        run = build_run(r, teacher=shared_teacher(r), store=store)
        obj = run.objective
        sources = ([obj.teacher] if obj.teacher is not None else []) + list(obj.extra_teachers.values())
        bar = progress_bar(r.train.epochs * len(run.train_loader), f"teacher cache {r.name} s{seed}", "batch",
                           enabled=progress, end_line=False)
        for e in range(r.train.epochs):
            for step, (x, y, idx) in enumerate(run.train_loader.epoch(e)):
                if r.train.channels_last:  # as DistillObjective.record passes it
                    x = x.contiguous(memory_format=torch.channels_last)
                for src in sources:
                    src(x, y, idx, e, step)
                bar.update(1)
        bar.close()
    return {"hits": store.hits, "misses": store.misses}
