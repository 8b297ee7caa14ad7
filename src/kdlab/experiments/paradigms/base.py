"""The paradigm registry: a paradigm is a training *schedule* (several runs, or a joint objective)
registered by decorator with a pydantic model of its settings, like loss terms.

    @register_paradigm("ban", "Born-Again Networks ...", "Furlanello et al. 2018", params=BanParams)
    def run_ban(recipe, params, out_dir, *, progress=False, log=print) -> dict: ...

The function trains into ``out_dir`` (every run through :class:`kdlab.train.trainer.Trainer`) and
returns a *summary* dict whose ``"student"`` key is the ``result.json`` of the paradigm's final
student and ``"train_time_s"`` its whole training time; a paradigm may add ``"rows"`` (extra table
rows such as an ensemble). Its settings are the ``paradigm:`` section of a paradigm recipe
(``--set paradigm.generations=3`` on the command line).
"""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ConfigDict

from kdlab.core.registry import Registry

PARADIGMS = Registry("paradigm", "kdlab methods")


class ParadigmParams(BaseModel):
    """Base of every paradigm's settings (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")


def register_paradigm(name: str, description: str = "", reference: str = "", *,
                      params: type[ParadigmParams] = ParadigmParams, needs_teacher: bool = False) -> Callable:
    """Register ``fn(recipe, params, out_dir, *, progress, log) -> summary`` as paradigm ``name``.
    ``needs_teacher``: the recipe's teacher is trained first when missing."""
    return PARADIGMS.register(name, description=description, reference=reference, params=params,
                              needs_teacher=needs_teacher)


def list_paradigms() -> list[tuple[str, str, str]]:
    """``(name, description, reference)`` of every registered paradigm."""
    return [(e.name, e.description, e.reference) for e in PARADIGMS.entries()]
