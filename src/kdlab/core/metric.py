"""A metric a task reports (:class:`Metric`): its name, direction, unit and display scale. Defined
in ``core`` so that reports can render any task's numbers without importing the tasks; the task
contract (:mod:`kdlab.tasks.base`) re-exports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
    #: the true difference (stored units) the study's power line asks about: 0.01 = 1 pp of an
    #: accuracy stored as a fraction; 0 = no power line for this metric
    delta: float = 0.0
    #: shown as a column of the study table (mean ± sd and the paired Δ); the primary metric always is
    table: bool = True
    #: a stored value that means "undefined" (COCOeval's −1 for an AP size with no object in the split):
    #: left out of means and differences, shown as ``n/a`` with ``undefined_note`` as the footnote
    undefined: Optional[float] = None
    undefined_note: str = ""

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

    @property
    def diff_unit(self) -> str:
        """The unit of a difference of this metric as displayed: ``pp`` for a percentage."""
        return "pp" if self.unit == "%" else self.unit

    @property
    def digits(self) -> int:
        """Decimals shown in tables: 2 for scaled (percent) metrics, 3 otherwise."""
        return 2 if self.scale != 1.0 else 3

    def fmt(self, value, pm=None, digits: Optional[int] = None) -> str:
        """``value`` (stored units) for a table, times ``scale``, with ``± pm`` when finite; ``—``
        when undefined."""
        import math

        d = self.digits if digits is None else digits
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "—"
        s = f"{self.scale * value:.{d}f}"
        if pm is not None and isinstance(pm, (int, float)) and math.isfinite(pm):
            s += f" ± {self.scale * pm:.{d}f}"
        return s

    def is_undefined(self, value) -> bool:
        """Whether a stored ``value`` is this metric's "undefined" marker."""
        return self.undefined is not None and isinstance(value, (int, float)) and value == self.undefined

    def delta_text(self) -> str:
        """The power line's difference as text: ``1 pp``, ``0.01 bits/byte``."""
        return f"{self.scale * self.delta:g} {self.diff_unit}".strip()


def default_metric() -> Metric:
    """Classification's top-1 accuracy (``acc``, stored as a fraction, shown in %): what study
    tables written before tasks hold."""
    return Metric("acc", "max", "%", 100.0, "top-1", delta=0.01)


def metric_from(d: Optional[dict]) -> Metric:
    """A :class:`Metric` from its dict in a ``table.json`` (the default one when absent)."""
    if not d:
        return default_metric()
    return Metric(**{k: v for k, v in d.items() if k in Metric.__dataclass_fields__})


def metric_dict(m: Metric) -> dict:
    import dataclasses

    return dataclasses.asdict(m)
