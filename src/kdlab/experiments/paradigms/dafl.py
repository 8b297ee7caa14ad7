"""DAFL, data-free learning of student networks (Chen et al., ICCV 2019): a generator trained
against the frozen teacher to make inputs the teacher classifies confidently (one-hot loss), in
balanced classes (information entropy) and with strong features (activation loss), while the
student learns the teacher's outputs on them. The loop is :mod:`kdlab.experiments.paradigms.datafree`;
the losses are :mod:`kdlab.distill.generators`."""

from __future__ import annotations

from pydantic import Field

from kdlab.experiments.paradigms.base import register_paradigm
from kdlab.experiments.paradigms.datafree import DataFreeParams, run_generator_kd
from kdlab.train.recipe import Recipe


class DaflParams(DataFreeParams):
    lr_g: float = Field(0.2, gt=0)   # the authors' MNIST setting (Adam)
    oh: float = Field(1.0, ge=0)
    ie: float = Field(5.0, ge=0)
    a: float = Field(0.1, ge=0)


@register_paradigm("dafl", "data-free KD, DAFL: generator maximises teacher one-hot confidence, class entropy and feature activation; student KL",
                   "Chen et al., Data-Free Learning of Student Networks, ICCV 2019", params=DaflParams, needs_teacher=True)
def run_dafl(recipe: Recipe, params: DaflParams, out_dir, *, progress: bool = False, log=print) -> dict:
    return run_generator_kd(recipe, params, out_dir, mode="dafl", progress=progress, log=log)
