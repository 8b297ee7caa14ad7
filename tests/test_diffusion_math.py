"""Closed-form checks of the diffusion pieces: the cosine log-SNR schedule, the DDIM update at
η = 0, and progressive distillation on Gaussian data, where the optimal denoiser is known:
one step of the optimal distilled student equals two teacher DDIM steps."""

import math

import pytest
import torch

from kdlab.distill.diffusion import (Denoiser, LogSNRSchedule, ddim_sample, ddim_update, two_step_target,
                                     weighted_mse)

MU = torch.tensor([0.3, -0.5, 0.0], dtype=torch.float64)
SD = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)


def optimal_net(z, logsnr):
    """E[x | z] for x ~ N(MU, diag SD²), z = α x + σ ε: MU + α SD²/(α² SD² + σ²)·(z − α MU)."""
    a = torch.sigmoid(logsnr).sqrt().reshape(-1, 1)
    s2 = torch.sigmoid(-logsnr).reshape(-1, 1)
    return MU + a * SD ** 2 / (a ** 2 * SD ** 2 + s2) * (z - a * MU)


def test_cosine_schedule_endpoints_and_midpoint():
    sch = LogSNRSchedule(-20.0, 20.0)
    lam = sch.logsnr(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    # λ(0) = λ_max, λ(1) = λ_min; a/2 + b = π/4 exactly, so λ(½) = −2 log tan(π/4) = 0
    assert lam.tolist() == pytest.approx([20.0, 0.0, -20.0], abs=1e-9)
    _, a, s = sch.alpha_sigma(torch.tensor(0.3, dtype=torch.float64))
    assert float(a ** 2 + s ** 2) == pytest.approx(1.0, abs=1e-12)
    # the unbounded cosine schedule α = cos(πu/2) is the limit: at λ range ±20 it is within 1e-4
    assert float(a) == pytest.approx(math.cos(math.pi * 0.3 / 2), abs=1e-4)


@pytest.mark.parametrize("lo,hi", [(5.0, 5.0), (3.0, -3.0)])
def test_schedule_with_empty_range_is_refused(lo, hi):
    with pytest.raises(ValueError, match="zero or negative.*logsnr_max above"):
        LogSNRSchedule(lo, hi)


def test_ddim_update_eta0_hand_value():
    # α_t = 0.6, σ_t = 0.8, α_s = 0.8, σ_s = 0.6, z_t = 1, x̂ = 0.5:
    # ε̂ = (1 − 0.3)/0.8 = 0.875; z_s = 0.8·0.5 + 0.6·0.875 = 0.925
    z = torch.tensor([[1.0]], dtype=torch.float64)
    x = torch.tensor([[0.5]], dtype=torch.float64)
    out = ddim_update(z, x, *(torch.tensor(v, dtype=torch.float64) for v in (0.6, 0.8, 0.8, 0.6)))
    assert float(out) == pytest.approx(0.925, abs=1e-12)


def test_ddim_eta1_with_zero_noise_is_the_posterior_mean():
    # η = 1 is the DDPM step; with the noise set to 0 it is the mean of q(z_s | z_t, x̂):
    # r·(α_s/α_t)·z_t + (1 − r)·α_s·x̂ with r = SNR(t)/SNR(s) (= (α_t/α_s)(σ_s²/σ_t²)·z_t + ...)
    a_t, s_t, a_s, s_s = 0.6, 0.8, 0.8, 0.6
    r = (a_t ** 2 / s_t ** 2) / (a_s ** 2 / s_s ** 2)
    z = torch.tensor([[1.0]], dtype=torch.float64)
    x = torch.tensor([[0.5]], dtype=torch.float64)
    out = ddim_update(z, x, *(torch.tensor(v, dtype=torch.float64) for v in (a_t, s_t, a_s, s_s)), eta=1.0,
                      noise=torch.zeros_like(z))
    assert float(out) == pytest.approx(r * a_s / a_t * 1.0 + (1 - r) * a_s * 0.5, abs=1e-12)


@pytest.mark.parametrize("steps", [4, 1])
def test_optimal_distilled_student_step_equals_two_teacher_steps(steps):
    torch.manual_seed(0)
    sch = LogSNRSchedule(-20.0, 20.0)
    teacher = Denoiser(optimal_net, sch, prediction="x")
    n = 2000
    for i in range(steps):
        # fit the student on the distillation targets at this step: for Gaussian data the target is
        # affine in z_t per dimension, so least squares recovers the optimal student exactly
        x = MU + SD * torch.randn(n, 3, dtype=torch.float64)
        t = torch.full((n,), (i + 1) / steps, dtype=torch.float64)
        _, a, s = sch.alpha_sigma(t)
        z = a[:, None] * x + s[:, None] * torch.randn(n, 3, dtype=torch.float64)
        tgt = two_step_target(teacher, z, torch.full((n,), i), steps)
        w, b = [], []
        for d in range(3):
            A = torch.stack([z[:, d], torch.ones(n, dtype=torch.float64)], 1)
            sol = torch.linalg.lstsq(A, tgt[:, d:d + 1]).solution.squeeze(1)
            assert float((A @ sol - tgt[:, d]).abs().max()) < 1e-8  # the target is affine in z_t
            w.append(sol[0])
            b.append(sol[1])
        w, b = torch.stack(w), torch.stack(b)
        # fresh states: one student DDIM step t -> s vs two teacher DDIM steps t -> mid -> s
        z0 = torch.randn(500, 3, dtype=torch.float64) * 1.3
        tt, mm, ss = (i + 1) / steps, (i + 0.5) / steps, i / steps
        ab = {u: sch.alpha_sigma(torch.tensor(u, dtype=torch.float64))[1:] for u in (tt, mm, ss)}
        x_student = w * z0 + b
        x1 = teacher(z0, tt)
        z_mid = ddim_update(z0, x1, *ab[tt], *ab[mm])
        x2 = teacher(z_mid, mm)
        if i == 0:  # the last step returns x̂
            student, two = x_student, x2
        else:
            student = ddim_update(z0, x_student, *ab[tt], *ab[ss])
            two = ddim_update(z_mid, x2, *ab[mm], *ab[ss])
        assert float((student - two).abs().max()) < 1e-5


def test_optimal_student_sampler_matches_teacher_with_twice_the_steps():
    # a whole sampler: the student built from the exact targets at every step, N steps, equals
    # the teacher's 2N-step DDIM from the same noise
    sch = LogSNRSchedule(-20.0, 20.0)
    teacher = Denoiser(optimal_net, sch, prediction="x")
    steps = 2

    def student_net(z, logsnr):
        # the step index of this time: t = (i+1)/steps
        u = (torch.atan(torch.exp(-0.5 * logsnr)) - sch.b) / sch.a
        i = torch.round(u * steps - 1).long()
        return two_step_target(teacher, z, i, steps)

    student = Denoiser(student_net, sch, prediction="x")
    z = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = ddim_sample(student, z, steps, clip=False)
    b = ddim_sample(teacher, z, 2 * steps, clip=False)
    assert float((a - b).abs().max()) < 1e-5
    # and 2N teacher steps differ from N teacher steps (the test can fail)
    c = ddim_sample(teacher, z, steps, clip=False)
    assert float((c - b).abs().max()) > 1e-3


def test_truncated_snr_weighting_is_max_of_x_and_eps_mse():
    xp, xt = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])  # x-MSE 2.5
    ep, et = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])  # eps-MSE 0.5
    assert float(weighted_mse(xp, xt, ep, et)) == pytest.approx(2.5)
    assert float(weighted_mse(ep, et, xp, xt)) == pytest.approx(2.5)
    assert float(weighted_mse(xp, xt, ep, et, "eps")) == pytest.approx(0.5)


def test_v_weighting_is_the_v_mse():
    # with the v-weighting the objective's per-example loss is ‖v̂ − v‖², v = α·ε − σ·x
    from kdlab.tasks.diffusion_runs import DiffusionObjective
    from kdlab.train.runtime import Runtime

    sch = LogSNRSchedule(-20.0, 20.0)
    net = lambda z, lam: torch.zeros_like(z)  # noqa: E731  (v̂ = 0)
    obj = DiffusionObjective(torch.nn.Linear(1, 1), sch, runtime=Runtime("cpu"), weighting="v")
    obj.denoiser.net = net
    x = torch.tensor([[0.5, -0.5]])
    eps = torch.tensor([[1.0, 2.0]])
    u = torch.tensor([0.5])  # λ = 0: α = σ = √½
    a = s = math.sqrt(0.5)
    v = a * eps - s * x
    assert float(obj.loss(x, None, u, eps)) == pytest.approx(float(v.pow(2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="loss weighting must be"):
        DiffusionObjective(torch.nn.Linear(1, 1), sch, runtime=Runtime("cpu"), weighting="snr")
