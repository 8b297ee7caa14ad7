"""The control of the data-free methods: KD on Gaussian noise images (``x ~ N(0, 1)`` in the
normalised input space, fresh every step, no generator), with the same steps, batch size and
evaluation as ``dafl`` / ``zskt`` (:mod:`kdlab.experiments.paradigms.datafree`)."""

from __future__ import annotations

from pydantic import Field

from kdlab.experiments.paradigms.base import register_paradigm
from kdlab.experiments.paradigms.datafree import DataFreeParams, run_generator_kd
from kdlab.train.recipe import Recipe


class NoiseParams(DataFreeParams):
    T: float = Field(4.0, gt=0)


@register_paradigm("noise", "data-free control: KD (T=4) on fresh Gaussian-noise inputs, no generator",
                   "control for Chen et al. 2019 / Micaelli & Storkey 2019 (random-noise transfer set)",
                   params=NoiseParams, needs_teacher=True)
def run_noise(recipe: Recipe, params: NoiseParams, out_dir, *, progress: bool = False, log=print) -> dict:
    return run_generator_kd(recipe, params, out_dir, mode="noise", progress=progress, log=log)
