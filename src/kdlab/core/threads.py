"""How many intra-op threads a run uses when nobody said (``train.threads`` unset and no
``OMP_NUM_THREADS`` in the environment).

Tiny models gain nothing from intra-op threads: their kernels are too small to split, and on a
shared machine the threads wait on each other (a digits teacher trained 20× slower beside four other
torch jobs than alone). :func:`choose_threads` therefore gives

* 1 thread to a model of fewer than ``SMALL`` (1 M) parameters,
* at most 2 to one of fewer than ``MEDIUM`` (10 M),
* otherwise every core the machine's load leaves free,

never more than the free cores (cores minus the 1-minute load average, rounded, at least 1). The count
is recorded in ``run.json`` / ``result.json`` as before, so a run's numbers are reproducible at the
recorded count; a resumed run keeps the count it was started with.
"""

from __future__ import annotations

import os
from typing import Optional

SMALL = 1_000_000
MEDIUM = 10_000_000


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose_threads(n_params: int, cpus: Optional[int] = None, load: Optional[float] = None) -> int:
    """The intra-op thread count for a model of ``n_params`` parameters on ``cpus`` cores with
    ``load`` runnable processes (defaults: this machine now); see the module doc."""
    cpus = cpu_count() if cpus is None else max(1, int(cpus))
    load = load_average() if load is None else max(0.0, float(load))
    free = max(1, min(cpus, int(cpus - load + 0.5)))
    if n_params < SMALL:
        return 1
    if n_params < MEDIUM:
        return min(2, free)
    return free


def explicit_threads() -> bool:
    """True when the user fixed the thread count: ``OMP_NUM_THREADS`` in the environment, or a
    command's ``--threads`` (:func:`pin_threads`, which sets ``KDLAB_THREADS``)."""
    return bool(os.environ.get("OMP_NUM_THREADS", "").strip() or os.environ.get("KDLAB_THREADS", "").strip())


def pin_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` as an explicit choice that runs keep (and child processes
    inherit through ``KDLAB_THREADS``)."""
    import torch

    os.environ["KDLAB_THREADS"] = str(int(threads))
    torch.set_num_threads(int(threads))
