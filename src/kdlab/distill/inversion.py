"""DeepInversion synthesis (Yin et al., Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion, CVPR 2020): inputs optimised from noise so that a frozen teacher's BatchNorm layers
see their running statistics and the teacher predicts sampled classes.

Inputs x̂ (in the normalised input space) start as Gaussian noise and are optimised with Adam to
minimise, for sampled class targets ŷ,

    CE(T(x̂), ŷ) + α_bn · Σ_l (‖μ_l(x̂) − μ_l^BN‖₂ + ‖σ²_l(x̂) − σ²_l^BN‖₂) + α_tv · R_TV(x̂) + α_l2 · ‖x̂‖²/n

Used by the ``deepinv`` transfer set (:mod:`kdlab.data.transfer`). The ``deepinv`` paradigm
(:mod:`kdlab.experiments.paradigms.deepinv`) holds the same functions; it can import them from
here instead (one implementation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.core.seeding import derive_seed
from kdlab.data.transfer import TransferContext, register_transfer


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
               a_l2: float = 1e-4, seed: int = 0, log=None, progress: bool = False,
               steps_done: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic inputs [n, *shape] (normalised space) and their sampled class targets.
    ``progress``: a bar per batch ("DeepInversion batch 3 of 8", see :mod:`kdlab.core.progress`);
    ``steps_done``: a list that receives the number of Adam steps each batch ran."""
    from kdlab.core.progress import progress_bar

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dev = next(teacher.parameters()).device
    g = torch.Generator().manual_seed(derive_seed(seed, "deepinv"))
    hook = BNStatHook(teacher)
    xs, ys = [], []
    n_batches = -(-n // batch_size)
    try:
        for start in range(0, n, batch_size):
            k = start // batch_size + 1
            bar = progress_bar(iters, f"DeepInversion batch {k} of {n_batches}", "step", enabled=progress)
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
                bar.update(1)
            bar.close()
            if steps_done is not None:
                steps_done.append(it + 1)
            hook.terms = []
            if log:
                log(f"DeepInversion batch {k} of {n_batches}: loss {loss.item():.3f}, "
                    f"teacher agrees with targets {(logits.argmax(1) == y).float().mean().item():.2f}")
            xs.append(x.detach())
            ys.append(y)
    finally:
        hook.close()
    return torch.cat(xs), torch.cat(ys)


# -- a DeepInversion transfer set (``data.transfer: [{kind: deepinv, ...}]``) -------------------
_SYNTH_CACHE: dict = {}


@register_transfer("deepinv")
def deepinv_set(ctx: TransferContext, n: int = 256, iters: int = 200, lr: float = 0.1, a_bn: float = 1.0,
                a_tv: float = 1e-2, batch_size: int = 64) -> torch.Tensor:
    """``n`` DeepInversion images (Yin et al. 2020) of the teacher, mapped back to [0, 1]. Kept in
    memory per (teacher weights, parameters, seed), so a study synthesises them once per seed."""
    from kdlab.distill.teachers import module_fingerprint

    if ctx.teacher is None:
        raise ValueError("a deepinv transfer set needs the recipe's teacher (teacher.checkpoint)")
    teacher = ctx.teacher()
    info = ctx.info
    key = (module_fingerprint(teacher), n, iters, lr, a_bn, a_tv, batch_size, ctx.seed, info.input_shape)
    if key not in _SYNTH_CACHE:
        x_hat, _ = synthesize(teacher, n, info.input_shape, info.num_classes, iters=iters, lr=lr,
                              batch_size=batch_size, a_bn=a_bn, a_tv=a_tv, seed=ctx.seed)
        mean = torch.tensor(info.mean, device=x_hat.device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=x_hat.device).view(1, -1, 1, 1)
        _SYNTH_CACHE[key] = (x_hat * std + mean).clamp(0, 1).cpu()
    return _SYNTH_CACHE[key]
