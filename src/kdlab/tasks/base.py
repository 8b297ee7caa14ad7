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

from typing import Any, Callable, ClassVar, Optional

from kdlab.core.metric import Metric  # noqa: F401  (part of the task contract; defined in core)


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
    #: the order a study trains its runs in: ``"method"`` (every seed of a method, then the next
    #: method) or ``"seed"`` (every method of a seed, then the next seed); results do not depend on it
    study_order: ClassVar[str] = "method"

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

    def check_study(self, recipes: dict, data_dir=None) -> None:
        """Check what a study's runs need (data present, teachers trainable, ...) before anything
        is printed or written; raise one line naming the fix. Default: nothing to check."""

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

    # -- optional hooks (added for the generic study, tuning and findings; all have defaults) -----
    def from_dict(self, raw: dict, where: str = "recipe") -> Any:
        """A validated recipe from a plain mapping (``recipe.to_dict()`` with changed values): what
        ``kdlab tune`` builds each trial's recipe with. Default: not supported."""
        raise NotImplementedError(f"task {self.name!r} cannot rebuild a recipe from a mapping "
                                  f"(implement Task.from_dict to tune it)")

    def tune_run(self, recipe, run_dir, *, context: Any = None, method: str = "", callbacks=(),
                 progress: bool = False) -> dict:
        """Train one trial of ``kdlab tune`` and return its result (``val_<metric>`` read by the
        tuner). ``callbacks`` (Trainer callbacks that report each epoch's validation metric to the
        pruner) should reach the Trainer, and the test split should stay unevaluated; the default
        calls :meth:`train` (no per-epoch pruning; the tuner reads only validation keys)."""
        return self.train(recipe, run_dir, context=context, method=method, progress=progress)

    def study_notes(self, context: Any, rows: list[dict], recipes: dict) -> list[str]:
        """Sentences appended to the study table's note (kept in ``table.json`` so a rebuilt report
        gives the same files); default none."""
        return []

    def describe(self, recipe: dict) -> str:
        """One line naming a study's setting from its recipe dict (data, teacher, student) for
        findings pages and figure titles; default: the recipe's name."""
        return str(recipe.get("name", "")) if isinstance(recipe, dict) else ""

    def components(self, recipe: dict) -> list[str]:
        """The components a study's methods add (``kd``, ``align``, ...), in ladder order, for the
        findings page's contrasts; default none (every method is compared with the baseline)."""
        return []

    def baseline(self, methods: dict) -> str:
        """The method of ``methods`` every other is paired against; default the first."""
        return next(iter(methods))

    def with_data_dir(self, recipe, data_dir) -> Any:
        """``recipe`` reading its data files from ``data_dir`` (``--data-dir``); default unchanged."""
        return recipe

    def prepare_tune(self, recipe, out_dir, *, prefill: bool, log: Callable = print) -> Any:
        """What every trial of a ``kdlab tune`` search shares (passed to :meth:`tune_run` as
        ``context``); ``prefill``: this is the search's main process. Default: None."""
        return None

    def run_line(self, result: dict) -> str:
        """The study log's summary of one finished run; default the primary test metric."""
        m = self.metric()
        return (f"test {m.name} {result.get('test_' + m.name, float('nan')):.4f}  best epoch "
                f"{result.get('best_epoch', -1):>3}")

    def finish_study(self, rows: list[dict], log: Callable = print) -> None:
        """Called once a study's runs are done (e.g. to warn about mixed thread counts)."""

    def run_key(self, recipe) -> Any:
        """What makes two methods of a study the same run (two names of one recipe are trained
        once); default the recipe dict without its name and description."""
        d = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe)
        return {k: v for k, v in d.items() if k not in ("name", "description")}


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


#: ``task:`` values of recipes written before tasks were plug-ins (LM recipes named their kind)
TASK_ALIASES = {"corpus": "lm", "arithmetic": "lm"}


def task_of(raw: dict) -> str:
    """The task a raw recipe mapping names (``task:``; ``classification`` when absent)."""
    t = raw.get("task") if isinstance(raw, dict) else None
    t = str(t) if t else "classification"
    return TASK_ALIASES.get(t, t)


def load_recipe(ref, overrides: Optional[list[str]] = None) -> Any:
    """Any task's recipe: read the file (path or shipped name), route by its ``task:`` to that
    task's :meth:`Task.load_recipe`. One reader for every task (the routing reads the YAML through
    :func:`kdlab.core.config.read_recipe_yaml`, ``extends:`` included)."""
    return get_task(task_of(read_raw(ref))).load_recipe(ref, overrides)


def read_raw(ref) -> dict:
    """A recipe file as a raw mapping (``extends:`` merged), found by :func:`resolve_ref`."""
    from kdlab.core.config import read_recipe_yaml

    return read_recipe_yaml(resolve_ref(ref))


def resolve_ref(ref):
    """The path of a recipe given by path or shipped name; a bare LM name (``docs``) is found
    under ``lm/``."""
    from kdlab.core.config import RECIPES_DIR, resolve_recipe_path

    RECIPES_LM = RECIPES_DIR / "lm"

    try:
        path = resolve_recipe_path(ref)
    except FileNotFoundError as first:
        s = str(ref)
        if s.startswith("lm/") or not (RECIPES_LM / (s if s.endswith(".yaml") else s + ".yaml")).is_file():
            raise first from None
        path = resolve_recipe_path("lm/" + s)
    return path
