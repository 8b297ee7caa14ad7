"""ZSKT, zero-shot knowledge transfer via adversarial belief matching (Micaelli & Storkey,
NeurIPS 2019): a generator maximises the teacher–student KL; the student, ``n_student`` steps per
generator step on the generator's batch, minimises it plus attention transfer (β = 250). The loop
is :mod:`kdlab.experiments.paradigms.datafree`; the losses are :mod:`kdlab.distill.generators`."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from kdlab.experiments.paradigms.base import register_paradigm
from kdlab.experiments.paradigms.datafree import DataFreeParams, run_generator_kd
from kdlab.train.recipe import Recipe


class ZsktParams(DataFreeParams):
    lr_g: float = Field(1e-3, gt=0)
    n_student: int = Field(7, ge=1)      # student steps per generator step
    beta: float = Field(250.0, ge=0)     # attention transfer weight
    clip_g: float = Field(5.0, gt=0)     # generator gradient-norm clip
    at_layers: Optional[list] = None     # [[student_stage, teacher_stage], ...] for AT


@register_paradigm("zskt", "data-free KD, ZSKT: adversarial generator maximises teacher–student KL; student KL + AT (β=250), 1 generator : 7 student steps",
                   "Micaelli & Storkey, Zero-shot Knowledge Transfer via Adversarial Belief Matching, NeurIPS 2019",
                   params=ZsktParams, needs_teacher=True)
def run_zskt(recipe: Recipe, params: ZsktParams, out_dir, *, progress: bool = False, log=print) -> dict:
    return run_generator_kd(recipe, params, out_dir, mode="zskt", progress=progress, log=log)
