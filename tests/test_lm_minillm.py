"""MiniLLM (Gu et al. 2024): sequence-level reverse KL by policy gradient, checked against values
worked out by hand and against the exact gradient of the sequence-level reverse KL."""

import itertools
import math

import pytest
import torch
from torch import nn

from kdlab.core.config import RecipeError
from kdlab.lm.minillm import MiniLLMConfig, apply_baseline, future_reward, minillm_loss, mixed_sample
from kdlab.lm.models import GPT
from kdlab.lm.objective import LMObjective
from kdlab.lm.recipe import lm_recipe_from_dict, load_lm_recipe
from kdlab.lm.runs import student_identity
from kdlab.train.objective import StepContext

L = math.log


def _logits(*probs):
    """[1, T, V] logits whose softmax is the given probability rows."""
    return torch.tensor([[[L(p) for p in row] for row in probs]], dtype=torch.float64)


def test_single_step_term_is_the_exact_token_reverse_kl_by_hand():
    # q = (1/2, 1/4, 1/4), p = (1/4, 1/2, 1/4): KL(q||p) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln(2)/4
    s, t = _logits([0.5, 0.25, 0.25]), _logits([0.25, 0.5, 0.25])
    y, m = torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool)
    for long_term in (False, True):  # the policy-gradient term is 0 in value
        loss, st = minillm_loss(s, t, y, m, MiniLLMConfig(alpha=0.0, long_term=long_term))
        assert float(loss) == pytest.approx(L(2) / 4, abs=1e-7)
        assert float(st["reward"]) == pytest.approx(L(0.25) - L(0.5), abs=1e-7)  # r = log p(y) - log q(y)
    # teacher-mixed: w = q(y) / (0.2 p(y) + 0.8 q(y)) = 0.5 / 0.45 for y = 0
    loss, st = minillm_loss(s, t, y, m, MiniLLMConfig(alpha=0.2, long_term=False))
    assert float(st["w"]) == pytest.approx(0.5 / 0.45, abs=1e-7)
    assert float(loss) == pytest.approx(0.5 / 0.45 * L(2) / 4, abs=1e-7)


def test_future_reward_and_baselines_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    m = torch.tensor([[True, True, True, False]])  # the 7 is padding
    assert future_reward(r, m, length_norm=False).tolist() == [[5.0, 3.0, 0.0, 0.0]]
    assert future_reward(r, m, length_norm=True).tolist() == [[2.5, 3.0, 0.0, 0.0]]  # (2+3)/2, 3/1, none
    a = torch.tensor([[1.0, 2.0, 6.0, 100.0]])
    assert apply_baseline(a, m, "mean").tolist() == [[-2.0, -1.0, 3.0, 0.0]]  # mean of the real ones: 3
    w = apply_baseline(a, m, "whiten")
    sd = math.sqrt((4 + 1 + 9) / 3)
    assert w[0, :3].tolist() == pytest.approx([-2 / sd, -1 / sd, 3 / sd], abs=1e-4) and float(w[0, 3]) == 0.0


def test_policy_gradient_on_a_two_token_example_by_hand():
    """V = 2, two generated tokens y = (0, 1); student q1 = q2 = (1/2, 1/2), teacher p2 = (0.2, 0.8).
    r_2 = ln 0.8 − ln 0.5 = ln 1.6; the long-term term at t = 1 is −(R_2 / N) ∇ log q1(y1) with
    R_2 = r_2 (one future token), N = 2 tokens; at t = 2 nothing follows (R_3 = 0)."""
    th = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)  # student logits, steps 1 and 2
    t = _logits([0.3, 0.7], [0.2, 0.8])
    y, m = torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)
    r2 = L(1.6)
    loss, _ = minillm_loss(th, t, y, m, MiniLLMConfig(alpha=0.0, baseline="none", single_step=False))
    (g,) = torch.autograd.grad(loss, th)
    # d/dθ1 log q1(0) = e_0 − q1 = (1/2, −1/2): gradient −(r2/2)(1/2, −1/2); a positive future reward
    # makes gradient descent raise the logit of the token that led to it
    assert g[0, 0].tolist() == pytest.approx([-r2 / 4, r2 / 4], abs=1e-12)
    assert g[0, 0, 0] < 0
    assert g[0, 1].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    # with the mean baseline: A = (r2, 0) − r2/2 = (r2/2, −r2/2)
    loss, _ = minillm_loss(th, t, y, m, MiniLLMConfig(alpha=0.0, baseline="mean", single_step=False))
    (g,) = torch.autograd.grad(loss, th)
    assert g[0, 0].tolist() == pytest.approx([-r2 / 8, r2 / 8], abs=1e-12)
    # t = 2: −(−r2/2)/2 · (e_1 − q2) = (r2/4)(−1/2, 1/2)
    assert g[0, 1].tolist() == pytest.approx([-r2 / 8, r2 / 8], abs=1e-12)


def test_expected_gradient_is_the_gradient_of_the_sequence_reverse_kl():
    """Over all 4 sequences of a 2-step, 2-token model whose second step depends on the first, the
    q-weighted mean of the estimator's gradient (single-step + long-term, no baseline, no mixing)
    equals ∇ KL(q(y1, y2) ‖ p(y1, y2)) / 2 (the loss is a per-token mean over 2 tokens)."""
    g = torch.Generator().manual_seed(0)
    th1 = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_()
    th2 = torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_()  # row y1: step-2 logits
    ph1 = torch.randn(2, generator=g, dtype=torch.float64)
    ph2 = torch.randn(2, 2, generator=g, dtype=torch.float64)
    lq1, lq2 = th1.log_softmax(-1), th2.log_softmax(-1)
    lp1, lp2 = ph1.log_softmax(-1), ph2.log_softmax(-1)
    kl_seq = sum(torch.exp(lq1[a] + lq2[a, b]) * (lq1[a] + lq2[a, b] - lp1[a] - lp2[a, b])
                 for a, b in itertools.product(range(2), range(2)))
    want = torch.autograd.grad(kl_seq / 2, (th1, th2))
    got = [torch.zeros_like(th1), torch.zeros_like(th2)]
    cfg = MiniLLMConfig(alpha=0.0, baseline="none")
    for a, b in itertools.product(range(2), range(2)):
        s = torch.stack([th1, th2[a]])[None]
        t = torch.stack([ph1, ph2[a]])[None]
        loss, _ = minillm_loss(s, t, torch.tensor([[a, b]]), torch.ones(1, 2, dtype=torch.bool), cfg)
        gs = torch.autograd.grad(loss, (th1, th2))
        prob = float(torch.exp(lq1[a] + lq2[a, b]).detach())
        got[0] += prob * gs[0]
        got[1] += prob * gs[1]
    assert torch.allclose(got[0], want[0], atol=1e-12) and torch.allclose(got[1], want[1], atol=1e-12)
    # the long-term term matters: without it the expectation is not the sequence gradient
    only_single = torch.zeros_like(th1)
    for a, b in itertools.product(range(2), range(2)):
        s = torch.stack([th1, th2[a]])[None]
        t = torch.stack([ph1, ph2[a]])[None]
        loss, _ = minillm_loss(s, t, torch.tensor([[a, b]]), torch.ones(1, 2, dtype=torch.bool),
                               MiniLLMConfig(alpha=0.0, baseline="none", long_term=False))
        only_single += float(torch.exp(lq1[a] + lq2[a, b]).detach()) * torch.autograd.grad(loss, th1)[0]
    assert not torch.allclose(only_single, want[0], atol=1e-6)


def test_zero_loss_and_gradient_when_student_equals_teacher():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 7, generator=g)
    s = z.clone().requires_grad_()
    y = torch.randint(0, 7, (3, 5), generator=g)
    m = torch.ones(3, 5, dtype=torch.bool)
    m[1, 3:] = False
    for cfg in (MiniLLMConfig(), MiniLLMConfig(alpha=0.0, baseline="mean"), MiniLLMConfig(baseline="none")):
        loss, st = minillm_loss(s, z, y, m, cfg)
        (gr,) = torch.autograd.grad(loss, s)
        assert abs(float(loss.detach())) < 1e-6 and float(gr.abs().max()) < 1e-6
        assert abs(float(st["reward"])) < 1e-6 and float(st["w"]) == pytest.approx(1.0, abs=1e-6)


def test_padded_positions_reach_neither_loss_nor_gradient():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 5, generator=g)
    y = torch.randint(0, 5, (2, 4), generator=g)
    m = torch.tensor([[True, True, True, True], [True, True, False, False]])
    ref, _ = minillm_loss(s, t, y, m)
    s2 = s.detach().clone()
    s2[1, 3] = float("nan")
    t2 = t.clone()
    t2[1, 2] = float("inf")
    s2.requires_grad_()
    loss, _ = minillm_loss(s2, t2, y, m)
    (gr,) = torch.autograd.grad(loss, s2)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-6)
    assert torch.isfinite(gr).all() and float(gr[1, 2:].abs().max()) == 0.0


class _Fixed(nn.Module):
    """A 'language model' whose next-token logits are always ``z`` (with the kdlab call)."""

    def __init__(self, z):
        super().__init__()
        self.z = nn.Parameter(torch.tensor(z), requires_grad=False)

    def forward(self, ids, past=None):
        return self.z.expand(ids.shape[0], ids.shape[1], -1), past


def test_teacher_mixed_sampler_draws_from_the_mixture():
    s, t = _Fixed([30.0, 0.0, 0.0]), _Fixed([0.0, 30.0, 0.0])  # student says 0, teacher says 1
    prompts = torch.zeros(2000, 2, dtype=torch.long)
    for alpha, share_teacher in ((0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.2, 0.2)):
        ids, mask = mixed_sample(s, t, prompts, 3, alpha, generator=torch.Generator().manual_seed(3))
        assert ids.shape == (2000, 5) and bool(mask.all())
        frac = float((ids[:, 2:] == 1).float().mean())
        assert abs(frac - share_teacher) < 0.03, (alpha, frac)
        assert bool(((ids[:, 2:] == 0) | (ids[:, 2:] == 1)).all())
    # a row stops at its first eos (id 1 here): everything after is padding
    ids, mask = mixed_sample(s, t, prompts[:50], 4, 1.0, eos_id=1, pad_id=2)
    assert mask[:, 0].all() and not mask[:, 1:].any() and bool((ids[:, 3:] == 2).all())


def _models(seed=0):
    torch.manual_seed(seed)
    return GPT(12, d_model=16, n_layer=1, n_head=2, max_len=40), GPT(12, d_model=8, n_layer=1, n_head=2, max_len=40)


def test_objective_takes_minillm_steps_and_keeps_the_teacher_frozen():
    teacher, student = _models()
    g = torch.Generator().manual_seed(1)
    batch = {"ids": torch.randint(0, 10, (3, 11), generator=g), "mask": torch.ones(3, 10, dtype=torch.bool),
             "epoch": 0, "step": 0}
    obj = LMObjective(student, terms=[{"term": "ce"}, {"term": "fkl"}], teacher=teacher, on_policy=1.0,
                      prompt_len=4, gen_len=6, minillm={"alpha": 0.2})
    loss, logs = obj.step(batch, StepContext(0, 0))
    loss.backward()
    assert obj.counts["on_policy"] == 1 and obj.counts["supervised"] == 0
    assert {"minillm", "pt", "minillm_reward", "minillm_w"} <= set(logs) and "fkl" not in logs
    assert float(logs["n"]) == 18  # 3 rows x 6 generated tokens, no eos
    assert abs(float(logs["loss"]) - float(logs["minillm"] + logs["pt"])) < 1e-5
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    with pytest.raises(ValueError, match="on_policy > 0"):
        LMObjective(student, terms=["ce"], teacher=teacher, minillm={"alpha": 0.2})
    with pytest.raises(ValueError, match="gen_temperature: 1"):
        LMObjective(student, terms=["ce"], teacher=teacher, on_policy=1.0, gen_temperature=0.7, minillm={})
    with pytest.raises(ValueError, match="baseline"):
        MiniLLMConfig(baseline="ema")


def test_recipe_method_and_unchanged_identity_of_other_runs():
    r = load_lm_recipe("lm/docs")
    mm = r.method("minillm").distill
    assert mm.minillm is not None and mm.minillm.alpha == 0.2 and mm.on_policy > 0
    # a run without minillm keeps the identity it had before the key existed (finished runs reused)
    ident = student_identity(r.method("gkd"))
    assert "minillm" not in ident["distill"] and "minillm" in student_identity(r.method("minillm"))["distill"]
    raw = r.to_dict()
    raw["distill"] = {**raw["distill"], "minillm": {"alpha": 0.2}, "on_policy": 0.0}
    with pytest.raises(RecipeError, match="on_policy"):
        lm_recipe_from_dict(raw)
