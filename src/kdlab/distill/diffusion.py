"""Diffusion in continuous time with a log-SNR schedule, the DDIM sampler and progressive
distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
ICLR 2022), as pure functions plus the one :class:`DiffusionObjective` the Trainer runs.

Notation (time ``u`` in [0, 1], data ``x`` in [−1, 1], noise ``ε ~ N(0, I)``):

* log-SNR ``λ(u)``; ``α² = sigmoid(λ)``, ``σ² = sigmoid(−λ)`` (variance preserving, α² + σ² = 1);
  ``z_u = α_u·x + σ_u·ε``.
* cosine schedule: ``λ(u) = −2·log(tan(a·u + b))`` with ``b = arctan(exp(−λ_max/2))`` and
  ``a = arctan(exp(−λ_min/2)) − b``, so ``λ(0) = λ_max`` and ``λ(1) = λ_min``.
* v-prediction: ``v = α·ε − σ·x``; from ``(z, v)``: ``x = α·z − σ·v``, ``ε = σ·z + α·v``.
* DDIM (η = 0) from ``u=t`` to ``u=s < t``: ``ε̂ = (z_t − α_t·x̂)/σ_t``, ``z_s = α_s·x̂ + σ_s·ε̂``;
  the last step (``s = 0``) returns ``x̂``. With ``N`` steps, step ``i = N−1, …, 0`` goes from
  ``t = (i+1)/N`` to ``s = i/N``.
* progressive distillation, student of ``N`` steps: ``i ~ U{0..N−1}``, ``t = (i+1)/N``; two teacher
  DDIM steps ``t → t − ½/N → s = t − 1/N`` give ``z''``; the student's target is the ``x̃`` whose one
  DDIM step ``t → s`` lands on ``z''``: ``x̃ = (z'' − (σ_s/σ_t)·z_t) / (α_s − (σ_s/σ_t)·α_t)``; at
  ``i = 0`` (``s = 0``) the target is the teacher's ``x̂`` at the midpoint.
* "truncated SNR" weighting: per example ``max(‖x̂ − x̃‖², ‖ε̂ − ε̃‖²)`` (means over pixels), which
  is ``max(1, SNR)·x-MSE``.

The formulas follow the paper and google-research's ``diffusion_distillation`` (read, not copied).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn


class LogSNRSchedule:
    """The cosine log-SNR schedule between ``logsnr_max`` (u = 0) and ``logsnr_min`` (u = 1).

    A range that is zero or negative (``logsnr_max <= logsnr_min``) is refused with one line."""

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)):
            raise ValueError(f"schedule: logsnr_min {logsnr_min} and logsnr_max {logsnr_max} must be finite numbers")
        if logsnr_max <= logsnr_min:
            raise ValueError(f"schedule: the log-SNR range is zero or negative (logsnr_min {logsnr_min:g} >= "
                             f"logsnr_max {logsnr_max:g}); set schedule.logsnr_max above schedule.logsnr_min "
                             f"(e.g. -20 and 20)")
        self.logsnr_min, self.logsnr_max = float(logsnr_min), float(logsnr_max)
        self.b = math.atan(math.exp(-0.5 * self.logsnr_max))
        self.a = math.atan(math.exp(-0.5 * self.logsnr_min)) - self.b

    def logsnr(self, u) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=torch.get_default_dtype()) if not torch.is_tensor(u) else u
        return -2.0 * torch.log(torch.tan(self.a * u + self.b))

    def alpha_sigma(self, u) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(λ, α, σ)`` at times ``u``."""
        lam = self.logsnr(u)
        return lam, torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` ``[B]`` (or a scalar) shaped to broadcast over ``like`` ``[B, ...]``."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def x_from_v(z, v, alpha, sigma):
    return _bc(alpha, z) * z - _bc(sigma, z) * v


def eps_from_v(z, v, alpha, sigma):
    return _bc(sigma, z) * z + _bc(alpha, z) * v


def eps_from_x(z, x, alpha, sigma):
    return (z - _bc(alpha, z) * x) / _bc(sigma, z)


def v_from_x_eps(x, eps, alpha, sigma):
    return _bc(alpha, x) * eps - _bc(sigma, x) * x


def ddim_update(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s, eta: float = 0.0,
                noise: Optional[torch.Tensor] = None):
    """One DDIM update ``z_t → z_s`` given the prediction ``x̂``: with ``ε̂ = (z_t − α_t·x̂)/σ_t``,
    ``z_s = α_s·x̂ + sqrt(σ_s² − c²)·ε̂ + c·noise``, ``c = η·σ_s·sqrt(1 − SNR_t/SNR_s)``
    ``= η·(σ_s/σ_t)·sqrt(1 − α_t²/α_s²)``
    (η = 0: deterministic DDIM; η = 1: the ancestral DDPM step)."""
    eps = eps_from_x(z_t, x_pred, alpha_t, sigma_t)
    a_s, s_s = _bc(alpha_s, z_t), _bc(sigma_s, z_t)
    if eta == 0:
        return a_s * x_pred + s_s * eps
    a_t, s_t = _bc(alpha_t, z_t), _bc(sigma_t, z_t)
    c = eta * s_s * (1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2).clamp_min(0).sqrt()
    if noise is None:
        noise = torch.randn_like(z_t)
    return a_s * x_pred + (s_s ** 2 - c ** 2).clamp_min(0).sqrt() * eps + c * noise


class Denoiser:
    """A network as an ``x̂`` predictor: ``Denoiser(net, schedule, prediction)(z, u)``, optionally
    clipping ``x̂`` to [−1, 1] (sampling) — ``prediction``: ``v`` (default), ``x`` or ``eps``."""

    def __init__(self, net: Callable, schedule: LogSNRSchedule, prediction: str = "v"):
        if prediction not in ("v", "x", "eps"):
            raise ValueError(f"prediction must be v, x or eps, not {prediction!r}")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def x_eps(self, z, u, clip: bool = False, y=None):
        lam, a, s = self.schedule.alpha_sigma(_as_batch(u, z))
        out = self.net(z, lam, y) if y is not None else self.net(z, lam)
        if self.prediction == "v":
            x = x_from_v(z, out, a, s)
        elif self.prediction == "x":
            x = out
        else:
            x = (z - _bc(s, z) * out) / _bc(a, z)
        if clip:
            x = x.clamp(-1.0, 1.0)
        if self.prediction == "eps" and not clip:
            return x, out
        return x, eps_from_x(z, x, a, s)

    def __call__(self, z, u, clip: bool = False, y=None):
        return self.x_eps(z, u, clip, y)[0]


def _as_batch(u, z) -> torch.Tensor:
    u = torch.as_tensor(u, dtype=z.dtype, device=z.device)
    return u.expand(z.shape[0]) if u.dim() == 0 else u


def check_steps(n: int, what: str = "steps") -> int:
    """``n`` as a positive int; else one line naming the fix."""
    if int(n) != n or n < 1:
        raise ValueError(f"{what} must be a positive whole number of sampler steps, not {n!r}")
    return int(n)


def is_power_of_two(n: int) -> bool:
    return int(n) == n and n >= 1 and (int(n) & (int(n) - 1)) == 0


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, z: torch.Tensor, steps: int, *, clip: bool = True, eta: float = 0.0,
                y=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Run the ``steps``-step DDIM sampler from ``z`` (noise at u = 1) down to ``x̂`` at u = 0."""
    steps = check_steps(steps, "sampler steps")
    sch = denoiser.schedule
    for i in reversed(range(steps)):
        t, s = (i + 1) / steps, i / steps
        x = denoiser(z, t, clip=clip, y=y)
        if i == 0:
            return x
        _, a_t, s_t = sch.alpha_sigma(torch.tensor(t, dtype=z.dtype))
        _, a_s, s_s = sch.alpha_sigma(torch.tensor(s, dtype=z.dtype))
        noise = None
        if eta:
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
        z = ddim_update(z, x, a_t, s_t, a_s, s_s, eta, noise)
    return z


def two_step_target(teacher: Denoiser, z_t: torch.Tensor, i: torch.Tensor, steps: int, y=None) -> torch.Tensor:
    """The progressive-distillation target ``x̃`` for a student of ``steps`` steps at step indices
    ``i`` (``t = (i+1)/steps``): two teacher DDIM steps (unclipped) ``t → t − ½/steps → s``, then
    ``x̃ = (z'' − (σ_s/σ_t)·z_t)/(α_s − (σ_s/σ_t)·α_t)``; the teacher's midpoint ``x̂`` where ``i = 0``."""
    sch = teacher.schedule
    i = i.to(z_t.dtype)
    t, mid, s = (i + 1) / steps, (i + 0.5) / steps, i / steps
    _, a_t, s_t = sch.alpha_sigma(t)
    _, a_m, s_m = sch.alpha_sigma(mid)
    _, a_s, s_s = sch.alpha_sigma(s)
    x1, e1 = teacher.x_eps(z_t, t, y=y)
    z_mid = _bc(a_m, z_t) * x1 + _bc(s_m, z_t) * e1
    x2, e2 = teacher.x_eps(z_mid, mid, y=y)
    z_s = _bc(a_s, z_t) * x2 + _bc(s_s, z_t) * e2
    ratio = _bc(s_s / s_t, z_t)
    x_tilde = (z_s - ratio * z_t) / (_bc(a_s, z_t) - ratio * _bc(a_t, z_t))
    last = (i == 0).reshape(-1, *([1] * (z_t.dim() - 1)))
    return torch.where(last, x2, x_tilde)


def weighted_mse(x_pred, x_tgt, eps_pred, eps_tgt, weighting: str = "snr_trunc") -> torch.Tensor:
    """Per-example loss ``[B]``: ``snr_trunc`` = max(x-MSE, ε-MSE); ``x`` = x-MSE; ``eps`` = ε-MSE
    (= SNR·x-MSE); ``v`` = v-MSE."""
    dims = tuple(range(1, x_pred.dim()))
    x_mse = (x_pred - x_tgt).pow(2).mean(dims)
    e_mse = (eps_pred - eps_tgt).pow(2).mean(dims)
    if weighting == "snr_trunc":
        return torch.maximum(x_mse, e_mse)
    if weighting == "x":
        return x_mse
    if weighting == "eps":
        return e_mse
    if weighting == "v":
        raise ValueError("weighting 'v' needs the v targets; use diffusion_loss")
    raise ValueError(f"loss weighting must be snr_trunc, x, eps or v, not {weighting!r}")


class DiffusionObjective:
    """The Trainer's objective for a diffusion model: DDPM training in continuous time
    (``teacher=None``: the target is the data ``x`` and its noise ``ε``) or one round of progressive
    distillation (``teacher`` a frozen :class:`Denoiser`, ``steps`` the student's step count: the
    target is :func:`two_step_target`). Loss: :func:`weighted_mse` (default truncated SNR).

    Batches are ``(x, y, idx)`` with ``x`` in [−1, 1]. Validation: the same loss on the split with
    fixed draws (times and noise from ``torch.Generator().manual_seed(eval_seed)``), so epochs are
    compared on identical problems; ``monitor = ("loss", "min")``.
    """

    monitor = ("loss", "min")

    def __init__(self, model: nn.Module, schedule: LogSNRSchedule, *, runtime, prediction: str = "v",
                 weighting: str = "snr_trunc", teacher: Optional[Denoiser] = None, steps: Optional[int] = None,
                 meta: Optional[dict] = None, conditional: bool = False, eval_seed: int = 0):
        self.model = model
        self.schedule = schedule
        self.runtime = runtime
        self.denoiser = Denoiser(model, schedule, prediction)
        if weighting not in ("snr_trunc", "x", "eps", "v"):
            raise ValueError(f"loss weighting must be snr_trunc, x, eps or v, not {weighting!r}")
        self.weighting = weighting
        self.teacher = teacher
        if teacher is not None:
            self.steps = check_steps(steps, "student steps")
        else:
            self.steps = None
        self.meta = dict(meta or {})
        self.conditional = conditional
        self.eval_seed = int(eval_seed)
        self.teacher_time_s = 0.0

    def models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def parameters(self):
        return list(self.model.parameters())

    def checkpoint_meta(self, name: str) -> dict:
        return dict(self.meta)

    def loss(self, x: torch.Tensor, y, u_or_i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example losses for draws ``u`` (teacher runs: times in (0, 1]) or ``i`` (step indices)."""
        import time

        yy = y if self.conditional else None
        if self.teacher is None:
            u = u_or_i
        else:
            u = (u_or_i.to(x.dtype) + 1) / self.steps
        _, a, s = self.schedule.alpha_sigma(u)
        z = _bc(a, x) * x + _bc(s, x) * eps
        if self.teacher is None:
            x_tgt, eps_tgt = x, eps
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                x_tgt = two_step_target(self.teacher, z, u_or_i, self.steps, y=yy)
            eps_tgt = eps_from_x(z, x_tgt, a, s)
            self.teacher_time_s += time.perf_counter() - t0
        with self.runtime.autocast():
            x_pred, eps_pred = self.denoiser.x_eps(z, u, y=yy)
        x_pred, eps_pred = x_pred.float(), eps_pred.float()
        if self.weighting == "v":
            dims = tuple(range(1, x.dim()))
            return (v_from_x_eps(x_pred, eps_pred, a, s) - v_from_x_eps(x_tgt, eps_tgt, a, s)).pow(2).mean(dims)
        return weighted_mse(x_pred, x_tgt, eps_pred, eps_tgt, self.weighting)

    def draw(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        if self.teacher is None:
            # u in (0, 1]: 1 − U[0, 1)
            return 1.0 - torch.rand(n, generator=generator).to(device)
        return torch.randint(0, self.steps, (n,), generator=generator).to(device)

    def step(self, batch, ctx):
        x, y, _ = batch
        draws = self.draw(x.shape[0], device=x.device)
        eps = torch.randn_like(x)
        per = self.loss(x, y, draws, eps)
        loss = per.mean()
        return loss, {"loss": loss.detach(), "n": x.shape[0]}

    @torch.no_grad()
    def evaluate(self, name: str, loader) -> dict[str, float]:
        model = self.models()[name]
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.eval_seed)
        total, n = 0.0, 0
        for x, y, _ in loader.epoch(0):
            draws = self.draw(x.shape[0], generator=g, device=x.device)
            eps = torch.randn(x.shape, generator=g).to(x.device)
            total += float(self.loss(x, y, draws, eps).sum())
            n += x.shape[0]
        model.train(was)
        return {"loss": total / max(n, 1), "n": n}
