"""Distillation paradigms: schedules of runs (or joint objectives) on the one training loop.

* ``dml``      Deep Mutual Learning: K peers trained jointly (:class:`kdlab.train.objective.PeerObjective`).
* ``ban``      Born-Again Networks: k generations of the same architecture + their ensemble.
* ``ta``       Teacher Assistant: teacher -> assistant -> student chain.
* ``self``     self-distillation: a model taught by a frozen trained copy of itself.
* ``deepinv``  data-free KD (DeepInversion): synthesise inputs from the teacher's BN statistics.
* ``dafl``, ``zskt``  data-free KD with a generator trained alongside the student; ``noise``: KD on Gaussian noise.

Each is one module registering itself with :func:`register_paradigm`; adding a paradigm is one
file (imported here) plus a recipe in ``recipes/paradigms/<dataset>/``.
"""

from kdlab.experiments.paradigms.base import PARADIGMS, ParadigmParams, list_paradigms, register_paradigm
from kdlab.experiments.paradigms import ban, deepinv, dml, selfdistill, ta  # noqa: F401  (registers them)
from kdlab.experiments.paradigms import dafl, noisekd, zskt  # noqa: F401  (data-free generators and their noise control)

__all__ = ["PARADIGMS", "ParadigmParams", "list_paradigms", "register_paradigm"]
