"""The task plug-in: one file per task declares how a recipe becomes data, models, an objective
and metrics; everything around the loop (study, compare, sweep, tune, findings, report) reads only
what a task declares here.

A task is a :class:`Task` subclass registered with ``@register_task("name")`` in one module of
``kdlab.tasks`` (or any module a user imports). A recipe names its task with ``task: <name>``
(``classification`` when absent, so every classification recipe keeps working).

The contract, in the order the study machinery uses it::

    task = get_task(name)
    recipe = task.load_recipe(ref, overrides)            # validated, seed via recipe.with_seed(k)
    methods = task.ablation_methods(recipe, mode)         # {"baseline": r0, "kd": r1, ...}
    ctx = task.prepare_study(methods, out_dir, ...)       # trains missing teachers, shared caches
    result = task.train(r.with_seed(k), run_dir, context=ctx, method=m)   # one run -> result.json
    row = task.profile(r)                                 # params / MACs / latency of the student

``result`` (also ``result.json``) holds ``val_<m>`` and ``test_<m>`` for every declared metric
``m``, plus ``method``, ``seed``, ``best_epoch``, ``train_time_s``, ``sample_unit`` and
``<sample_unit>_per_s`` (``images_per_s``, ``tokens_per_s``, ...). The study table, paired
statistics, findings sentences and the tuner read ``test_<task.primary>`` / ``val_<task.primary>``
with the direction of that metric; nothing else about the task is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional


@dataclass(frozen=True)
class Metric:
    """One number a task reports for a model on a split.

    ``name``: the key (``acc``, ``bpb``, ``map``, ``tar@far1e-3``, ``fd``); result files hold
    ``val_<name>`` / ``test_<name>``. ``direction``: ``"max"`` or ``"min"`` (which is better).
    ``unit``: shown in table headers (``"%"``, ``"bits/byte"``, ``""``). ``scale``: multiplier for
    display only (accuracy is stored as a fraction and shown ×100 as %). ``label``: a human name
    for headers and findings sentences (defaults to ``name``).
    """

    name: str
    direction: str = "max"
    unit: str = ""
    scale: float = 1.0
    label: str = ""

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise ValueError(f"metric {self.name}: direction must be 'max' or 'min', not {self.direction!r}")

    @property
    def title(self) -> str:
        return self.label or self.name

    def better(self, a: float, b: float) -> bool:
        """Whether value ``a`` is strictly better than ``b``."""
        return a > b if self.direction == "max" else a < b

    def sign(self) -> int:
        """+1 when larger is better, −1 when smaller is (a paired difference times ``sign`` is a gain)."""
        return 1 if self.direction == "max" else -1


class Task:
    """Base class of a task plug-in. Subclasses set the class attributes and implement the methods
    that raise ``NotImplementedError``; the others have working defaults.

    Class attributes:

    * ``name``: the registry name (set by :func:`register_task`).
    * ``metrics``: every metric the task reports, as :class:`Metric` s.
    * ``select``: the metric (on the validation split) that selects the best epoch and drives early
      stopping; the objective's ``monitor`` is ``(select, direction)``.
    * ``primary``: the headline metric of study tables, statistics, findings and tuning (defaults
      to ``select``).
    * ``sample_unit``: what one training sample is (``images``, ``tokens``, ``boxes``); throughput
      is recorded as ``<sample_unit>_per_s``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]] = ()
    select: ClassVar[str] = ""
    primary: ClassVar[str] = ""
    sample_unit: ClassVar[str] = "images"

    # -- declared metrics ------------------------------------------------------------------------
    @classmethod
    def metric(cls, name: Optional[str] = None) -> Metric:
        """The declared metric ``name`` (default: the primary one)."""
        name = name or cls.primary or cls.select
        for m in cls.metrics:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in cls.metrics)
        raise KeyError(f"task {cls.name!r} has no metric {name!r} (it reports: {known})")

    @classmethod
    def monitor(cls) -> tuple[str, str]:
        """``(metric, "max" | "min")``: what selects the best epoch on the validation split."""
        m = cls.metric(cls.select)
        return m.name, m.direction

    # -- recipes -----------------------------------------------------------------------------------
    def load_recipe(self, ref, overrides: Optional[list[str]] = None) -> Any:
        """A validated recipe of this task from a path or shipped name plus ``key=value`` overrides.
        The recipe object has ``name``, ``with_seed(k)``, ``to_dict()`` and ``study.seeds``."""
        raise NotImplementedError

    def ablation_methods(self, recipe, mode: str = "ladder") -> dict[str, Any]:
        """Method name -> recipe for a study (the step-wise ladder, leave-one-out, or both).
        The first entry is the baseline every other method is paired against."""
        raise NotImplementedError

    # -- runs --------------------------------------------------------------------------------------
    def prepare_study(self, recipes: dict, out_dir, *, data_dir=None, progress: bool = True,
                      log: Callable = print) -> Any:
        """Work shared by a study's runs, done once: train missing teachers, open a teacher cache.
        Returns a context object passed to every :meth:`train` of the study (default: None)."""
        return None

    def train(self, recipe, run_dir, *, context: Any = None, method: str = "", progress: bool = True,
              resume: bool = True) -> dict:
        """Train one run of ``recipe`` (its seed included) into ``run_dir`` with the one Trainer,
        resuming an unfinished run; return the result dict (``result.json``). A finished run of the
        same identity is returned without training."""
        raise NotImplementedError

    def profile(self, recipe) -> dict:
        """Size and cost of the recipe's student: ``params``, ``size_mb``, ``macs``, ``latency_ms``
        (keys absent when unknown). Default: nothing."""
        return {}

    def teacher_result(self, recipes: dict) -> Optional[dict]:
        """The finished teacher run's result dict of a study (for "gap closed"), or None."""
        return None

    def figures(self, study_dir, rows: list[dict], recipes: dict, log: Callable = print) -> list:
        """Task-specific pictures of a finished study (PR curves, ROC, sample grids); default none."""
        return []


_TASKS: dict[str, type[Task]] = {}


def register_task(name: str, description: str = ""):
    """Class decorator: register a :class:`Task` subclass under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register_task({name!r}) decorates a kdlab.tasks.Task subclass")
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is registered twice ({_TASKS[name].__module__} and {cls.__module__})")
        if not cls.metrics:
            raise ValueError(f"task {name!r} declares no metrics")
        cls.name = name
        cls.description = description or cls.description
        if not cls.primary:
            cls.primary = cls.select
        cls.metric(cls.select)  # both must be declared metrics
        cls.metric(cls.primary)
        _TASKS[name] = cls
        return cls

    return deco


#: the modules of the shipped tasks, imported on first look-up (so `import kdlab` stays light)
BUILTIN = {
    "classification": "kdlab.tasks.classification",
    "lm": "kdlab.tasks.lm",
    "detection": "kdlab.tasks.detection",
    "faces": "kdlab.tasks.faces",
    "diffusion": "kdlab.tasks.diffusion",
}


def _import_builtin(name: str) -> None:
    import importlib

    mod = BUILTIN.get(name)
    if mod is not None and name not in _TASKS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the task module exists but something it needs is missing
                raise


def get_task(name: Optional[str] = None) -> Task:
    """The registered task ``name`` (default ``classification``), as an instance."""
    name = name or "classification"
    _import_builtin(name)
    if name not in _TASKS:
        known = ", ".join(list_tasks()) or "none"
        raise KeyError(f"unknown task {name!r} (tasks: {known}); register one with @kdlab.tasks.register_task")
    return _TASKS[name]()


def list_tasks() -> list[str]:
    """The names of every registered task (shipped ones imported first)."""
    for n in BUILTIN:
        _import_builtin(n)
    return sorted(_TASKS)


def task_of(raw: dict) -> str:
    """The task a raw recipe mapping names (``task:``; ``classification`` when absent)."""
    t = raw.get("task") if isinstance(raw, dict) else None
    return str(t) if t else "classification"
