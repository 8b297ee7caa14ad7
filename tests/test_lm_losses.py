"""LM divergences against values worked out by hand (P = teacher, Q = student)."""

import math

import pytest
import torch

from kdlab.lm.losses import (bucket_logprobs, divergence, forward_kl, generalized_jsd, kd_loss,
                             reverse_kl, skew_kl, skew_reverse_kl, token_mean, total_variation)

P = torch.tensor([0.5, 0.5]).log()
Q = torch.tensor([0.25, 0.75]).log()
ln = math.log


def close(a, b, tol=1e-6):
    return abs(float(torch.as_tensor(a).detach()) - b) < tol


def test_forward_and_reverse_kl_by_hand():
    # KL(P||Q) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    assert close(forward_kl(Q, P), 0.5 * ln(4 / 3))
    # KL(Q||P) = .25 ln(.25/.5) + .75 ln(.75/.5)
    assert close(reverse_kl(Q, P), 0.25 * ln(0.5) + 0.75 * ln(1.5))


def test_skew_kls_by_hand():
    # alpha = .5: M = .5P + .5Q = [.375, .625]; KL(P||M) = .5 ln(.5/.375) + .5 ln(.5/.625) = .5 ln(16/15)
    assert close(skew_kl(Q, P, 0.5), 0.5 * ln(16 / 15))
    # skew reverse, alpha = .5: KL(Q || .5Q + .5P) = .25 ln(.25/.375) + .75 ln(.75/.625)
    assert close(skew_reverse_kl(Q, P, 0.5), 0.25 * ln(2 / 3) + 0.75 * ln(1.2))
    # alpha = 0 gives the plain KLs; alpha = 1 gives 0
    assert close(skew_kl(Q, P, 0.0), 0.5 * ln(4 / 3))
    assert close(skew_reverse_kl(Q, P, 0.0), 0.25 * ln(0.5) + 0.75 * ln(1.5))
    assert close(skew_kl(Q, P, 1.0), 0.0)
    # alpha = .9: M = [.9*.5+.1*.25, .9*.5+.1*.75] = [.475, .525]
    assert close(skew_kl(Q, P, 0.9), 0.5 * ln(0.5 / 0.475) + 0.5 * ln(0.5 / 0.525))


def test_jsd_by_hand_and_beta_limits():
    kl_pm = 0.5 * ln(16 / 15)
    kl_qm = 0.25 * ln(2 / 3) + 0.75 * ln(1.2)
    assert close(generalized_jsd(Q, P, 0.5), 0.5 * kl_pm + 0.5 * kl_qm)
    fkl, rkl = 0.5 * ln(4 / 3), 0.25 * ln(0.5) + 0.75 * ln(1.5)
    assert close(generalized_jsd(Q, P, 0.0), fkl)
    assert close(generalized_jsd(Q, P, 1.0), rkl)
    b = 1e-4  # the scaled limits: JSD(b)/b -> KL(P||Q), JSD(1-b)/b -> KL(Q||P)
    assert abs(float(generalized_jsd(Q.double(), P.double(), b)) / b - fkl) < 1e-3
    assert abs(float(generalized_jsd(Q.double(), P.double(), 1 - b)) / b - rkl) < 1e-3


def test_total_variation_by_hand():
    assert close(total_variation(Q, P), 0.25)
    assert close(total_variation(P, P), 0.0)


def test_zero_probability_is_finite():
    p = torch.tensor([1.0, 0.0]).log()  # teacher puts no mass on id 1
    q = torch.tensor([0.5, 0.5]).log().requires_grad_()
    v = forward_kl(q, p)
    assert close(v, ln(2))
    v.backward()
    assert torch.isfinite(q.grad).all()


def test_temperature_kd_by_hand():
    t = torch.tensor([[[0.0, ln(3)]]])
    s = torch.zeros(1, 1, 2)
    m = torch.ones(1, 1, dtype=torch.bool)
    # T = 1: P = [.25, .75], Q = [.5, .5]; KL = .25 ln .5 + .75 ln 1.5
    assert close(kd_loss("fkl", s, t, m), 0.25 * ln(0.5) + 0.75 * ln(1.5))
    # T = 2: P ∝ [1, √3]; loss = 4 · KL(P||[.5, .5])
    p0 = 1 / (1 + math.sqrt(3))
    p1 = 1 - p0
    assert close(kd_loss("fkl", s, t, m, temperature=2.0), 4 * (p0 * ln(2 * p0) + p1 * ln(2 * p1)), 1e-5)


def test_masking_ignores_padding_and_normalises_per_token():
    vals = torch.tensor([[1.0, 2.0, 99.0], [3.0, 77.0, 55.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = token_mean(vals, mask)
    assert close(out, (1 + 2 + 3) / 3)
    out.backward()
    assert torch.equal(vals.grad, mask.float() / 3)
    # an explicit accumulation-window denominator: Σ over this micro-batch / 10
    assert close(token_mean(vals.detach(), mask, denom=10), 0.6)
    assert close(token_mean(vals.detach(), torch.zeros_like(mask)), 0.0)


def test_divergences_padding_positions_do_not_matter():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 100 * torch.randn(3, 5)
    t2[~mask] = 100 * torch.randn(3, 5)
    for name in ("fkl", "rkl", "skl", "srkl", "jsd", "tvd"):
        assert close(kd_loss(name, s, t, mask), float(kd_loss(name, s2, t2, mask)), 1e-5)


def test_unknown_divergence_and_bad_params():
    with pytest.raises(KeyError, match="unknown divergence"):
        divergence("kl2", Q, P)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(Q, P, 1.5)


def test_bucket_kl_chain_rule_by_hand():
    # teacher P = [.5, .3, .15, .05]; top-2 ids {0, 1}; tail r = .2 split (.15, .05)
    # student Q = [.4, .2, .3, .1]; its tail q_r = .4 split (.3, .1)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.4, 0.2, 0.3, 0.1])
    idx = torch.tensor([0, 1])
    ls, lt = bucket_logprobs(q.log(), idx, p[idx].log(), torch.tensor(0.2).log())
    assert torch.allclose(ls.exp(), torch.tensor([0.4, 0.2, 0.4]), atol=1e-6)
    assert torch.allclose(lt.exp(), torch.tensor([0.5, 0.3, 0.2]), atol=1e-6)
    kl_bucket = 0.5 * ln(0.5 / 0.4) + 0.3 * ln(0.3 / 0.2) + 0.2 * ln(0.2 / 0.4)
    kl_full = 0.5 * ln(0.5 / 0.4) + 0.3 * ln(0.3 / 0.2) + 0.15 * ln(0.15 / 0.3) + 0.05 * ln(0.05 / 0.1)
    tail_term = 0.2 * (0.75 * ln(0.75 / 0.75) + 0.25 * ln(0.25 / 0.25))  # tails have the same shape
    assert close(forward_kl(ls, lt), kl_bucket)
    assert close(kl_full - kl_bucket, tail_term)
    # a student tail of another shape: Q = [.4, .2, .1, .3] -> gap = r · KL([.75,.25] || [.25,.75])
    q2 = torch.tensor([0.4, 0.2, 0.1, 0.3])
    ls2, _ = bucket_logprobs(q2.log(), idx, p[idx].log(), torch.tensor(0.2).log())
    gap = float(forward_kl(q2.log(), p.log()) - forward_kl(ls2, lt))
    assert close(gap, 0.2 * (0.75 * ln(3) + 0.25 * ln(1 / 3)))
