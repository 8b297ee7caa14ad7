"""The diffusion task: a denoiser trained by DDPM (the teacher) and its sampler distilled by
progressive distillation (Salimans & Ho, ICLR 2022), scored by a Fréchet distance on the features
of kdlab's own classifier for the data set (:mod:`kdlab.evaluate.generative`).

Pieces: the math and the objective in :mod:`kdlab.distill.diffusion`, the denoiser in
:mod:`kdlab.models.unet_lite`, recipes, one run and the chain of rounds in :mod:`kdlab.tasks.diffusion_runs`, the
step-count study in :mod:`kdlab.experiments.paradigms.progressive`.
See docs/diffusion.md.
"""

from __future__ import annotations

from typing import Any, Optional

from kdlab.tasks.base import Metric, Task, register_task


@register_task("diffusion", "diffusion sampling: DDPM teacher, progressive distillation of its DDIM sampler")
class DiffusionTask(Task):
    metrics = (
        Metric("fd", "min", "", 1.0, "FD (classifier features)"),
        Metric("coverage", "max", "bits", 1.0, "class coverage"),
        Metric("precision", "max", "", 1.0, "k-NN precision"),
        Metric("recall", "max", "", 1.0, "k-NN recall"),
        Metric("loss", "min", "", 1.0, "denoising loss"),
    )
    select = "loss"   # the best epoch: validation denoising / distillation loss (cheap, every epoch)
    primary = "fd"    # the headline: FD of the sampler, scored once after training
    sample_unit = "images"

    def load_recipe(self, ref, overrides: Optional[list[str]] = None) -> Any:
        from kdlab.tasks.diffusion_recipe import load_diffusion_recipe

        return load_diffusion_recipe(ref, overrides)

    def ablation_methods(self, recipe, mode: str = "ladder") -> dict[str, Any]:
        """A teacher recipe: itself. A distill recipe: the baseline ``ddim-<k>`` (the teacher's own
        DDIM with the chain's final step count ``k``) and ``progressive-<k>`` (the distilled sampler)."""
        if recipe.distill is None:
            return {recipe.name: recipe}
        from kdlab.tasks.diffusion_runs import teacher_recipe

        k = recipe.distill.end_steps
        t = teacher_recipe(recipe)
        base = t.derive(name=f"{t.name}-ddim{k}", sampler={**t.sampler.model_dump(mode="json"), "steps": k})
        return {f"ddim-{k}": base, f"progressive-{k}": recipe}

    def train(self, recipe, run_dir, *, context: Any = None, method: str = "", progress: bool = True,
              resume: bool = True) -> dict:
        if recipe.distill is None:
            from kdlab.tasks.diffusion_runs import train_run

            return train_run(recipe, run_dir, method=method or "teacher", progress=progress, resume=resume)
        from kdlab.tasks.diffusion_runs import run_chain

        summary = run_chain(recipe, run_dir, progress=progress, resume=resume)
        return {**summary["student"], "method": method or summary["student"].get("method"),
                "chain_train_time_s": summary["train_time_s"]}

    def profile(self, recipe) -> dict:
        from kdlab.tasks.diffusion_runs import build_net, load_data

        info = load_data(recipe).info
        net = build_net(recipe, info.in_channels, info.hw[0])
        n = sum(p.numel() for p in net.parameters())
        return {"params": n, "size_mb": n * 4 / 2 ** 20}

    def figures(self, study_dir, rows: list[dict], recipes: dict, log=print) -> list:
        return []
