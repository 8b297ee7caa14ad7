"""Diffusion in continuous time with a log-SNR schedule, the DDIM sampler and progressive
distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
ICLR 2022), as pure functions (the Trainer's objective is
:class:`kdlab.tasks.diffusion_runs.DiffusionObjective`).

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


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` ``[B]`` (or a scalar) shaped to broadcast over ``like`` ``[B, ...]``."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def x_from_v(z, v, alpha, sigma):
    return per_sample(alpha, z) * z - per_sample(sigma, z) * v


def eps_from_v(z, v, alpha, sigma):
    return per_sample(sigma, z) * z + per_sample(alpha, z) * v


def eps_from_x(z, x, alpha, sigma):
    return (z - per_sample(alpha, z) * x) / per_sample(sigma, z)


def v_from_x_eps(x, eps, alpha, sigma):
    return per_sample(alpha, x) * eps - per_sample(sigma, x) * x


def ddim_update(z_t, x_pred, alpha_t, sigma_t, alpha_s, sigma_s, eta: float = 0.0,
                noise: Optional[torch.Tensor] = None):
    """One DDIM update ``z_t → z_s`` given the prediction ``x̂``: with ``ε̂ = (z_t − α_t·x̂)/σ_t``,
    ``z_s = α_s·x̂ + sqrt(σ_s² − c²)·ε̂ + c·noise``, ``c = η·σ_s·sqrt(1 − SNR_t/SNR_s)``
    ``= η·(σ_s/σ_t)·sqrt(1 − α_t²/α_s²)``
    (η = 0: deterministic DDIM; η = 1: the ancestral DDPM step)."""
    eps = eps_from_x(z_t, x_pred, alpha_t, sigma_t)
    a_s, s_s = per_sample(alpha_s, z_t), per_sample(sigma_s, z_t)
    if eta == 0:
        return a_s * x_pred + s_s * eps
    a_t, s_t = per_sample(alpha_t, z_t), per_sample(sigma_t, z_t)
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
            x = (z - per_sample(s, z) * out) / per_sample(a, z)
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
    z_mid = per_sample(a_m, z_t) * x1 + per_sample(s_m, z_t) * e1
    x2, e2 = teacher.x_eps(z_mid, mid, y=y)
    z_s = per_sample(a_s, z_t) * x2 + per_sample(s_s, z_t) * e2
    ratio = per_sample(s_s / s_t, z_t)
    x_tilde = (z_s - ratio * z_t) / (per_sample(a_s, z_t) - ratio * per_sample(a_t, z_t))
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
