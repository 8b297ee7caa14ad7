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
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdlab.core.checkpoint import atomic_save
from kdlab.core.config import Recipe
from kdlab.core.io import read_json, write_json
from kdlab.core.seeding import derive_seed
from kdlab.experiments.paradigms.base import ParadigmParams, register_paradigm


def tv_prior(x: torch.Tensor) -> torch.Tensor:
    """``R_TV(x) = mean|x[..., i+1, j] − x[..., i, j]| + mean|x[..., i, j+1] − x[..., i, j]|``."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class BNStatHook:
    """Forward hooks on every BatchNorm2d of a model: ``loss`` accumulates the distance of each
    layer's batch statistics to its running statistics."""

    def __init__(self, model: nn.Module):
        self.terms: list = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, nn.BatchNorm2d)]
        if not self.handles:
            raise ValueError("DeepInversion needs a teacher with BatchNorm2d layers (their statistics are the prior)")

    def _hook(self, module, inputs, output):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    def pop(self) -> torch.Tensor:
        out = torch.stack(self.terms).sum()
        self.terms = []
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def synthesize(teacher: nn.Module, n: int, shape: tuple, num_classes: int, *, iters: int = 200,
               lr: float = 0.1, batch_size: int = 64, a_bn: float = 1.0, a_tv: float = 1e-2,
               a_l2: float = 1e-4, seed: int = 0, log=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic inputs [n, *shape] (normalised space) and their sampled class targets."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dev = next(teacher.parameters()).device
    g = torch.Generator().manual_seed(derive_seed(seed, "deepinv"))
    hook = BNStatHook(teacher)
    xs, ys = [], []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            y = (torch.arange(start, start + b) % num_classes)[torch.randperm(b, generator=g)].to(dev)
            x = torch.randn(b, *shape, generator=g).to(dev).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for it in range(iters):
                opt.zero_grad(set_to_none=True)
                logits = teacher(x)
                loss = F.cross_entropy(logits, y) + a_bn * hook.pop() + a_tv * tv_prior(x) \
                    + a_l2 * x.pow(2).mean()
                loss.backward()
                opt.step()
            hook.terms = []
            if log:
                log(f"DeepInversion batch {start // batch_size + 1}: loss {loss.item():.3f}, "
                    f"teacher agrees with targets {(logits.argmax(1) == y).float().mean().item():.2f}")
            xs.append(x.detach())
            ys.append(y)
    finally:
        hook.close()
    return torch.cat(xs), torch.cat(ys)


class DeepInvParams(ParadigmParams):
    n_images: int = Field(512, ge=1)
    iters: int = Field(200, ge=1)
    lr: float = Field(0.1, gt=0)
    a_bn: float = Field(1.0, ge=0)
    a_tv: float = Field(1e-2, ge=0)
    T: float = Field(4.0, gt=0)


@register_paradigm("deepinv", "data-free KD: DeepInversion (BN-statistics matching + TV prior + class targets), then KD",
                   "Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR 2020",
                   params=DeepInvParams, needs_teacher=True)
def run_deepinv(recipe: Recipe, params: DeepInvParams, out_dir, *, progress: bool = False, log=print) -> dict:
    """Synthesise ``n_images`` from the recipe's teacher, then distil the student on them (kd, T)."""
    import time

    from kdlab.data.splits import Splits, TensorSet
    from kdlab.experiments.paradigms.common import derive
    from kdlab.train.build import load_splits, load_teacher, train
    from kdlab.train.runtime import resolve_device

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
        x_hat, y_hat = (t.to(dev) for t in torch.load(syn_path))
    else:
        t0 = time.perf_counter()
        shape = (info.in_channels, info.image_size, info.image_size)
        x_hat, y_hat = synthesize(teacher, p.n_images, shape, info.num_classes, iters=p.iters, lr=p.lr,
                                  a_bn=p.a_bn, a_tv=p.a_tv, seed=recipe.train.seed, log=log if progress else None)
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
    summary = {"paradigm": "deepinv", "n_images": p.n_images, "iters": p.iters, "teacher_agreement": agree,
               "synthesis_time_s": t_syn, "student": res, "train_time_s": res["train_time_s"] + t_syn,
               "extra": {"teacher_agreement": agree}}
    write_json(out_dir / "deepinv.json", summary)
    return summary
