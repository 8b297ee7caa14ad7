"""Data-free KD with DeepInversion (Yin et al., CVPR 2020).

Synthesis: inputs x̂ (in the normalised input space) start as Gaussian noise and are optimised
with Adam to minimise, for sampled class targets ŷ,

    CE(T(x̂), ŷ) + α_bn · Σ_l (‖μ_l(x̂) − μ_l^BN‖₂ + ‖σ²_l(x̂) − σ²_l^BN‖₂) + α_tv · R_TV(x̂) + α_l2 · ‖x̂‖²/n

where μ_l, σ²_l are the batch mean / variance of the input of the teacher's BatchNorm layer l
(compared with its running statistics) and ``R_TV`` is the mean absolute difference of
neighbouring pixels (the total-variation prior). The student is then distilled on the synthetic
set alone with the ``kd`` term (validation/test stay the real splits, used for model selection
and reporting only; with ``train.patience: null`` no real data influences training at all).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from kdlab.core.checkpoint import atomic_save
from kdlab.core.io import read_json, write_json
from kdlab.distill.inversion import BNStatHook, synthesize, tv_prior  # noqa: F401  (the one implementation)
from kdlab.experiments.paradigms.base import ParadigmParams, register_paradigm
from kdlab.train.recipe import Recipe


class DeepInvParams(ParadigmParams):
    n_images: int = Field(512, ge=1)
    iters: int = Field(200, ge=1)
    lr: float = Field(0.1, gt=0)
    a_bn: float = Field(1.0, ge=0)
    a_tv: float = Field(1e-2, ge=0)
    T: float = Field(4.0, gt=0)
    # small settings reach synthesis: each batch runs min(iters, iters_per_epoch × train.epochs) steps
    iters_per_epoch: int = Field(10, ge=1)


def synthesis_steps(params: DeepInvParams, epochs: int) -> int:
    """The Adam steps each synthesis batch runs: ``iters``, bounded by ``iters_per_epoch`` per
    training epoch of the recipe, so ``--set train.epochs=2`` shortens the synthesis too."""
    return max(1, min(int(params.iters), int(params.iters_per_epoch) * int(epochs)))


@register_paradigm("deepinv", "data-free KD: DeepInversion (BN-statistics matching + TV prior + class targets), then KD",
                   "Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR 2020",
                   params=DeepInvParams, needs_teacher=True)
def run_deepinv(recipe: Recipe, params: DeepInvParams, out_dir, *, progress: bool = False, log=print) -> dict:
    """Synthesise ``n_images`` from the recipe's teacher, then distil the student on them (kd, T)."""
    import time

    from kdlab.data.splits import Splits, TensorSet
    from kdlab.experiments.paradigms.common import derive
    from kdlab.train.build import load_splits, load_teacher, train
    from kdlab.core.device import resolve_device

    p = params
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.teacher is None:
        raise ValueError("DeepInversion needs a recipe with a teacher section (teacher.checkpoint)")
    kd_recipe = derive(recipe, loss=[{"term": "kd", "weight": 1.0, "T": p.T}], name=f"{recipe.name}-deepinv")
    splits = load_splits(recipe)
    info = splits.info
    dev = resolve_device(recipe.train.device)
    teacher = load_teacher(kd_recipe, info, dev)
    syn_path, syn_time = out_dir / "synthetic.pt", out_dir / "synthetic.json"
    if syn_path.exists() and syn_time.exists():
        x_hat, y_hat = (t.to(dev) for t in torch.load(syn_path, weights_only=True))
    else:
        t0 = time.perf_counter()
        shape = (info.in_channels, info.image_size, info.image_size)
        x_hat, y_hat = synthesize(teacher, p.n_images, shape, info.num_classes,
                                  iters=synthesis_steps(p, recipe.train.epochs), lr=p.lr, a_bn=p.a_bn, a_tv=p.a_tv,
                                  seed=recipe.train.seed, log=log if progress else None, progress=progress)
        atomic_save((x_hat.cpu(), y_hat.cpu()), syn_path)
        write_json(syn_time, {"synthesis_time_s": time.perf_counter() - t0})
    with torch.no_grad():
        agree = (teacher(x_hat).argmax(1) == y_hat).float().mean().item()
    mean = torch.tensor(info.mean, device=x_hat.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x_hat.device).view(1, -1, 1, 1)
    x01 = (x_hat * std + mean).clamp(0, 1).cpu()  # back to [0, 1]; the loader re-normalises
    syn = Splits(train=TensorSet(x01, y_hat.cpu()), val=splits.val, test=splits.test, info=info)
    res = train(kd_recipe, out_dir / "student", teacher=teacher, splits=syn, progress=progress,
                method="deepinv")
    log(f"DeepInversion: {p.n_images} synthetic images (teacher agrees with the targets on {agree:.2f}); "
        f"student test {res['test_acc']:.4f}")
    t_syn = read_json(syn_time)["synthesis_time_s"]
    summary = {"paradigm": "deepinv", "n_images": p.n_images, "iters": synthesis_steps(p, recipe.train.epochs),
               "teacher_agreement": agree,
               "synthesis_time_s": t_syn, "student": res, "train_time_s": res["train_time_s"] + t_syn,
               "extra": {"teacher_agreement": agree}}
    write_json(out_dir / "deepinv.json", summary)
    return summary
