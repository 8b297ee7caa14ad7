"""Parallel studies: a study's independent runs in N local processes, or through ``submitit``
(a Slurm job array, or its local executor).

A study is a list of :class:`Job` s, one per (method, seed) with its run folder. Each run is a pure
function of its recipe and seed (``kdlab.train.trainer``), so running the jobs in any order, in
any process, gives the same ``result.json`` as :func:`kdlab.experiments.study.run_study`'s
sequential loop, provided every run uses the same number of intra-op threads (CPU kernels may sum in
another order with another thread count). :func:`run_jobs` therefore gives each worker
``threads_per_job(n) = max(1, cores // n)`` threads (``torch.set_num_threads``) and records it in
every ``result.json`` (``threads``).

The teacher is trained before the fan-out (``run_study`` calls ``ensure_teachers``) and each worker
loads the finished checkpoint read-only. The teacher *cache* is filled once, before the runs that
read it: for every seed, one prefill job walks the training loader's epochs of the study's recipes
and stores every teacher output (logits, tapped features, causal masks) that the runs of that seed
will ask for, as files under ``<study>/.teacher_cache`` (:class:`kdlab.distill.teachers.
TeacherStore` with no memory budget). The prefill jobs of different seeds run in parallel (their
keys differ), runs without a cached teacher start at once, and a seed's other runs start when its
prefill is done (``local``; ``submitit`` runs all prefills, then all runs); they only read. Served values equal live ones exactly
(``kdlab.distill.teachers``), so a run's numbers do not depend on which process computed them.

Launchers:

* ``local``: a :class:`concurrent.futures.ProcessPoolExecutor` of N ``spawn``-ed processes;
* ``submitit``: N submitit tasks, each training a round-robin slice of the jobs
  (``submitit.AutoExecutor``: a Slurm job array when Slurm is found, local processes otherwise;
  ``launcher_options`` go to ``executor.update_parameters``, e.g. ``{"slurm_partition": "gpu",
  "timeout_min": 120, "gpus_per_node": 1}``). The study folder must be on a file system that
  every node sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from kdlab.train.prefill import prefill_job, set_threads, shared_teacher, uses_cache  # noqa: F401

LAUNCHERS = ("local", "submitit")


@dataclass(frozen=True)
class Job:
    """One run of a study: ``recipe`` (with its seed set) trained into ``run_dir``."""

    method: str
    seed: int
    recipe: object  # kdlab.train.recipe.Recipe
    run_dir: str


def study_jobs(recipes: dict, out_dir, seeds) -> list[Job]:
    """The (method, seed) runs of a study in ``run_study``'s order (method-major, seed-minor),
    each into ``out_dir/<method>/seed<k>``."""
    from kdlab.core.io import inside

    out_dir = Path(out_dir)
    return [Job(m, int(s), r.with_seed(s), str(inside(out_dir, out_dir / m / f"seed{s}",
                                                      f"run folder of method {m!r}")))
            for m, r in recipes.items() for s in seeds]


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_job(n_jobs: int, cores: Optional[int] = None) -> int:
    """Intra-op threads of each of ``n_jobs`` workers: ``max(1, cores // n_jobs)``."""
    if n_jobs < 1:
        raise ValueError(f"jobs must be at least 1 (got {n_jobs})")
    return max(1, (cores or available_cores()) // n_jobs)


def _prefill_item(item: tuple, cache_root: str, threads: Optional[int]) -> dict:
    seed, recipes = item
    return prefill_job(recipes, seed, cache_root, threads)


def train_job(job: Job, threads: Optional[int] = None, cache_root: Optional[str] = None) -> dict:
    """Train one :class:`Job` (a finished run is read back, not retrained) and return
    ``{"result": result.json dict, "done_before": bool, "hits": .., "misses": ..}``."""
    from kdlab.distill.teachers import TeacherStore
    from kdlab.train.build import train

    set_threads(threads)
    store = TeacherStore(cache_root) if cache_root else None
    done_before = (Path(job.run_dir) / "result.json").exists()
    teacher = shared_teacher(job.recipe) if job.recipe.needs_teacher() else None
    res = train(job.recipe, job.run_dir, teacher=teacher, progress=False, method=job.method,
                teacher_cache=store)
    return {"result": res, "done_before": done_before,
            "hits": store.hits if store else 0, "misses": store.misses if store else 0}


def _chunk(fn: Callable, items: list, *args) -> list:
    """``[fn(item, *args) for item in items]`` (one submitit task's slice)."""
    return [fn(it, *args) for it in items]


def _local_map(fn, items: list, n_jobs: int, args: tuple, on_done) -> list:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out: list = [None] * len(items)
    with ProcessPoolExecutor(max_workers=min(n_jobs, len(items)), mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(fn, it, *args): i for i, it in enumerate(items)}
        for f in as_completed(futs):
            i = futs[f]
            out[i] = f.result()
            on_done(i, out[i])
    return out


def _submitit_map(fn, items: list, n_jobs: int, args: tuple, on_done, folder, options: dict) -> list:
    try:
        import submitit
    except ImportError:
        raise ImportError("--launcher submitit needs the submitit package: pip install 'kdlab[tune]'") from None
    options = dict(options or {})
    cluster = options.pop("cluster", None)
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if options:
        ex.update_parameters(**options)
    n = min(n_jobs, len(items))
    slices = [list(range(k, len(items), n)) for k in range(n)]  # round robin
    sub = ex.map_array(_chunk, [fn] * n, [[items[i] for i in s] for s in slices],
                       *[[a] * n for a in args])
    out: list = [None] * len(items)
    for s, job in zip(slices, sub):
        for i, r in zip(s, job.results()[0]):
            out[i] = r
            on_done(i, r)
    return out


def parallel_map(fn, items: list, *, n_jobs: int, launcher: str = "local", args: tuple = (),
                 on_done=lambda i, r: None, folder=None, launcher_options: Optional[dict] = None) -> list:
    """``[fn(item, *args) for item in items]`` in ``n_jobs`` processes (``launcher`` local) or
    ``n_jobs`` submitit tasks; results in the order of ``items``. ``on_done(i, result)`` is called
    in this process as results arrive."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher '{launcher}' is not one of {', '.join(LAUNCHERS)}")
    if not items:
        return []
    if launcher == "local":
        return _local_map(fn, items, n_jobs, args, on_done)
    return _submitit_map(fn, items, n_jobs, args, on_done, folder, launcher_options or {})


def run_jobs(jobs: list[Job], *, n_jobs: int, launcher: str = "local", threads: Optional[int] = None,
             cache_root=None, launcher_options: Optional[dict] = None, folder=None,
             log=print) -> tuple[list[dict], dict]:
    """Train ``jobs`` in ``n_jobs`` workers (see the module doc) and return their result dicts in
    the order of ``jobs``, and the teacher-cache counts ``{"hits", "misses"}``.

    ``threads``: intra-op threads per worker (default :func:`threads_per_job`); ``cache_root``:
    the study's teacher-cache folder (None: no cache, every run computes its teacher live);
    ``folder``: where submitit keeps its logs (default ``<cache_root>/../.submitit``)."""
    if n_jobs < 1:
        raise ValueError(f"jobs must be at least 1 (got {n_jobs})")
    threads = threads or threads_per_job(n_jobs)
    folder = folder or (Path(jobs[0].run_dir).parent.parent / ".submitit" if jobs else None)
    counts = {"hits": 0, "misses": 0}
    kw = dict(n_jobs=n_jobs, launcher=launcher, folder=folder, launcher_options=launcher_options)
    todo: dict[int, list] = {}
    if cache_root is not None:
        for j in jobs:  # seeds with an unfinished run that reads the cache
            if uses_cache(j.recipe) and not (Path(j.run_dir) / "result.json").exists():
                lst = todo.setdefault(j.seed, [])
                if j.recipe not in lst:
                    lst.append(j.recipe)
        if todo:
            log(f"teacher cache: filling {len(todo)} seed(s) before the fan-out -> {cache_root}")

    def done(i, r):
        res, j = r["result"], jobs[i]
        state = "done earlier" if r["done_before"] else f"{res['train_time_s']:.1f}s"
        log(f"  {j.method:<14} seed {j.seed}: test {res['test_acc']:.4f}  best epoch "
            f"{res['best_epoch']:>3}  ({state})")

    cache = str(cache_root) if cache_root else None
    if launcher == "local":
        out, filled = _local_scheduled(jobs, todo, n_jobs, threads, cache, done)
    else:  # two phases: the prefill tasks, then the training tasks
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher '{launcher}' is not one of {', '.join(LAUNCHERS)}")
        filled = parallel_map(_prefill_item, list(todo.items()), args=(cache, threads), **kw)
        out = parallel_map(train_job, jobs, args=(threads, cache), on_done=done, **kw)
    for r in filled:
        counts["misses"] += r["misses"]
    for r in out:
        counts["hits"] += r["hits"]
        counts["misses"] += r["misses"]
    return [r["result"] for r in out], counts


def _local_scheduled(jobs: list[Job], todo: dict, n_jobs: int, threads: int, cache, on_done):
    """One pool of ``n_jobs`` spawned processes: the prefill task of each seed in ``todo`` first,
    every run that does not wait for a prefill at once, and a seed's cache-reading runs as soon as
    its prefill is done. Returns the train results (in ``jobs`` order) and the prefill results."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    out: list = [None] * len(jobs)
    filled = []
    waits = {s: [i for i, j in enumerate(jobs) if j.seed == s and uses_cache(j.recipe)] for s in todo}
    held = {i for lst in waits.values() for i in lst}
    with ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs) or 1), mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_prefill_item, (s, recipes), cache, threads): ("prefill", s)
                for s, recipes in todo.items()}
        futs.update({ex.submit(train_job, j, threads, cache): ("run", i)
                     for i, j in enumerate(jobs) if i not in held})
        while futs:
            finished, _ = wait(list(futs), return_when=FIRST_COMPLETED)
            for f in finished:
                kind, key = futs.pop(f)
                r = f.result()
                if kind == "prefill":
                    filled.append(r)
                    futs.update({ex.submit(train_job, jobs[i], threads, cache): ("run", i) for i in waits[key]})
                else:
                    out[key] = r
                    on_done(key, r)
    return out, filled
