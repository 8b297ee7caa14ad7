"""The search space of ``kdlab tune``: one searched value per dotted recipe path and range
(``loss.align.weight=log:0.01:10``, ``train.batch_size=int:16:64``, ``loss.align.form=a|b``;
``distill.loss.fkl.weight=...`` in an LM recipe), and reading / writing such paths in a recipe dict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from kdlab.core.config import apply_overrides


@dataclass(frozen=True)
class ParamSpec:
    """One searched recipe value: ``kind`` float | int | categorical."""

    path: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()

    def suggest(self, trial):
        """The trial's value (``trial.suggest_float / suggest_int / suggest_categorical``)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)

    def contains(self, v) -> bool:
        """Whether ``v`` is a value of this space (used to enqueue the recipe's own values)."""
        if self.kind == "categorical":
            return v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind == "int" and int(v) != v:
            return False
        return self.low <= v <= self.high and (self.step is None or
                                               abs((v - self.low) / self.step - round((v - self.low) / self.step)) < 1e-9)


def parse_range(path: str, spec) -> ParamSpec:
    """A :class:`ParamSpec` from ``"log:0.01:10"``, ``"2:8"``, ``"2:8:0.5"``, ``"int:16:64"``,
    ``"int:log:16:256"``, ``"a|b|c"`` or a YAML list of choices."""
    how = f"give {path} a range like log:0.01:10, 2:8, int:1:5 or choices a|b|c"
    if isinstance(spec, (list, tuple)):
        if len(spec) < 2:
            raise ValueError(f"search space {path}: {list(spec)} has fewer than two choices; {how}")
        return ParamSpec(path, "categorical", choices=tuple(spec))
    s = str(spec).strip()
    if "|" in s:
        choices = tuple(yaml.safe_load(c.strip()) for c in s.split("|"))
        if len(choices) < 2 or any(c is None for c in choices):
            raise ValueError(f"search space {path}: '{s}' has an empty choice; {how}")
        return ParamSpec(path, "categorical", choices=choices)
    parts = s.split(":")
    flags = []
    while parts and parts[0] in ("log", "int"):
        flags.append(parts.pop(0))
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"search space {path}: '{s}' is not a range; {how}") from None
    if len(nums) not in (2, 3):
        raise ValueError(f"search space {path}: '{s}' needs low:high or low:high:step; {how}")
    low, high = nums[0], nums[1]
    step = nums[2] if len(nums) == 3 else None
    log = "log" in flags
    if not low < high:
        raise ValueError(f"search space {path}: low {low:g} must be below high {high:g}")
    if log and low <= 0:
        raise ValueError(f"search space {path}: a log range needs low > 0 (got {low:g})")
    if log and step is not None:
        raise ValueError(f"search space {path}: a log range takes no step; drop ':{step:g}' or 'log:'")
    if "int" in flags:
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise ValueError(f"search space {path}: an int range needs whole numbers (got '{s}')")
        return ParamSpec(path, "int", low, high, log, step)
    return ParamSpec(path, "float", low, high, log, step)


def parse_param(text: str) -> ParamSpec:
    """``"loss.kd.T=2:8"`` -> :class:`ParamSpec` (see :func:`parse_range`)."""
    if "=" not in text:
        raise ValueError(f"--param '{text}' must look like path=range (e.g. loss.kd.T=2:8)")
    path, spec = text.split("=", 1)
    return parse_range(path.strip(), spec)


def term_index(loss: list, key: str, path: str) -> int:
    """The position of the loss term ``key`` (a term name, or an index) in a list of term dicts."""
    if key.isdigit():
        i = int(key)
        if i >= len(loss):
            raise KeyError(f"{path}: the recipe has {len(loss)} loss terms; use an index below {len(loss)}")
        return i
    hits = [i for i, t in enumerate(loss) if t.get("term") == key]
    if not hits:
        raise KeyError(f"{path}: the recipe has no '{key}' loss term (terms: "
                       f"{', '.join(t.get('term', '?') for t in loss)})")
    if len(hits) > 1:
        raise KeyError(f"{path}: the recipe has {len(hits)} '{key}' terms; name one by position "
                       f"(loss.{hits[0]}.…)")
    return hits[0]


def _term_list(raw: dict, parts: list, path: str):
    """``(terms, rest)`` when ``parts`` walks into a list of loss terms (``loss.<term>.<key>`` of a
    classification recipe, ``distill.loss.<term>.<key>`` of an LM recipe), else None."""
    node: Any = raw
    for i, p in enumerate(parts):
        if isinstance(node, list):
            if len(parts) - i != 2:
                pre = ".".join(parts[:i])
                raise KeyError(f"search path '{path}': write {pre}.<term>.<key> (e.g. {pre}.kd.weight)")
            return node, parts[i:]
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return None


def set_path(raw: dict, path: str, value) -> None:
    """Set dotted ``path`` in a recipe dict, in place (``<...>.loss.<term|index>.<key>`` for loss
    terms)."""
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise KeyError(f"search path '{path}' must name a section and a key (e.g. loss.kd.T or train.lr)")
    if parts[0] == "loss" and len(parts) != 3:
        raise KeyError(f"search path '{path}': write loss.<term>.<key> (e.g. loss.kd.weight)")
    hit = _term_list(raw, parts, path)
    if hit is not None:
        terms, (key, field) = hit
        terms[term_index(terms, key, path)][field] = value
        return
    apply_overrides(raw, [f"{path}={json.dumps(value)}"])


def get_path(raw: dict, path: str):
    """The value at dotted ``path`` of a recipe dict (None when unset)."""
    parts = path.split(".")
    hit = _term_list(raw, parts, path)
    if hit is not None:
        terms, (key, field) = hit
        return terms[term_index(terms, key, path)].get(field)
    node: Any = raw
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def with_values(base, values: dict):
    """``base`` with the searched ``values`` (path -> value) set; validated like a recipe file of
    its task (:meth:`kdlab.tasks.base.Task.from_dict`)."""
    from kdlab.tasks import get_task

    raw = base.to_dict()
    for path, v in values.items():
        set_path(raw, path, v)
    r = get_task(getattr(base, "task", None)).from_dict(raw, base.source or base.name)
    r.source = base.source
    return r
