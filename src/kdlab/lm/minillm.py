"""MiniLLM: the sequence-level reverse KL KL(q_θ‖p) minimised by policy gradient (Gu, Dong, Wei &
Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024).

For a prompt x and a continuation y = y_1..y_T the objective is the reverse KL between the
*sequence* distributions of the student q_θ and the teacher p,

    L(θ) = KL(q_θ(·|x) ‖ p(·|x)) = −E_{y∼q_θ} Σ_t r_t,   r_t = log p(y_t|y_<t, x) − log q_θ(y_t|y_<t, x),

whose gradient (policy gradient, the score-function term of the −log q inside r_t vanishing in
expectation) the paper splits at every step t into

* the **single-step** part, computed exactly (no sampling of y_t): ∇ E_{y_t∼q_θ(·|y_<t)}[−r_t] =
  ∇ KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x)), the token-level reverse KL at the sampled prefix (its
  gradient flows through the distribution at step t only, not through the prefix); and
* the **long-term** part, −R_{t+1} ∇ log q_θ(y_t|y_<t, x), with the future reward
  R_{t+1} = Σ_{t'>t} r_t', **length-normalised** to the mean over the future tokens,
  R^Norm_{t+1} = R_{t+1} / (number of real tokens after t) (0 when none follows).

**Teacher-mixed sampling**: the continuations are drawn token by token from
p̃ = α·p + (1−α)·q_θ (α = 0.2 in the paper) and every step carries the per-token importance weight
w_t = q_θ(y_t|·) / p̃(y_t|·) (the paper's per-token approximation of the sequence weight); α = 0 is
plain sampling from the student (w_t = 1).

**Baseline** (variance reduction): the advantage A_t is R^Norm_{t+1} minus a baseline, here the
batch statistics of the authors' implementation (microsoft/LMOps ``minillm``, ``whiten``): A_t =
(R^Norm_{t+1} − mean) / std over the real positions of the batch (``baseline: whiten``), or the mean
only (``mean``), or none (``none``; the estimator is then unbiased for the length-un-normalised case).

The loss returned is the per-token mean over the real generated positions (N of them) of

    w_t · KL(q_t ‖ p_t)  −  w_t · A_t · (log q_θ(y_t) − stopgrad log q_θ(y_t)),

whose value is the (weighted) token-level reverse KL (the second term is 0 in value) and whose
gradient is the paper's (∇L)_Single + (∇L)^Norm_Long divided by N. Not included (see docs/lm.md):
PPO's clipped ratio (kdlab takes one gradient step per rollout, where the ratio is 1 and the clip
inactive), reward scaling/clipping, and the γ discount (γ = 1 as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kdlab.lm.generate import decode
from kdlab.lm.losses import divergence

BASELINES = ("whiten", "mean", "none")


@dataclass(frozen=True)
class MiniLLMConfig:
    """The MiniLLM step's settings (``distill.minillm`` of an LM recipe)."""

    alpha: float = 0.2          # teacher mix of the sampling distribution p̃ = α p + (1 − α) q
    baseline: str = "whiten"    # whiten | mean | none
    length_norm: bool = True    # R_{t+1} as a mean over the future tokens
    single_step: bool = True    # the exact token-level reverse KL term
    long_term: bool = True      # the policy-gradient term with the future reward
    pt_weight: float = 1.0      # weight of CE on the step's data batch (the paper's L_PT); 0: none

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"minillm alpha must be in [0, 1] (got {self.alpha})")
        if self.alpha == 1.0:
            raise ValueError("minillm alpha = 1 samples from the teacher only; the student's importance "
                             "weights then carry all of the estimate: use alpha < 1 (the paper: 0.2)")
        if self.baseline not in BASELINES:
            raise ValueError(f"minillm baseline must be one of {', '.join(BASELINES)} (got {self.baseline!r})")
        if self.pt_weight < 0:
            raise ValueError(f"minillm pt_weight must be >= 0 (got {self.pt_weight})")
        if not (self.single_step or self.long_term):
            raise ValueError("minillm needs single_step or long_term (or both)")


def future_reward(r: torch.Tensor, mask: torch.Tensor, length_norm: bool = True) -> torch.Tensor:
    """R_{t+1} = Σ_{t'>t} r_t' over the real positions of each row (``r``, ``mask`` ``[B, T]``),
    divided by the number of real positions after t when ``length_norm`` (0 where none follows)."""
    m = mask.to(r.dtype)
    r = r * m
    after = r.flip(-1).cumsum(-1).flip(-1) - r
    if not length_norm:
        return after
    n_after = m.flip(-1).cumsum(-1).flip(-1) - m
    return after / n_after.clamp_min(1.0)


def apply_baseline(adv: torch.Tensor, mask: torch.Tensor, baseline: str) -> torch.Tensor:
    """Subtract the batch mean of ``adv`` over the real positions (``mean``), and also divide by
    the standard deviation (``whiten``, with 1e-8 added to the variance), or leave it (``none``)."""
    if baseline == "none":
        return adv
    m = mask.to(adv.dtype)
    n = m.sum().clamp_min(1.0)
    mu = (adv * m).sum() / n
    out = adv - mu
    if baseline == "whiten":
        var = ((out * m) ** 2).sum() / n
        out = out * torch.rsqrt(var + 1e-8)
    return out * m


def importance_weights(logq_y: torch.Tensor, logp_y: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_t = q(y_t) / (α p(y_t) + (1 − α) q(y_t)), from the log-probabilities of the sampled tokens."""
    if alpha == 0.0:
        return torch.ones_like(logq_y)
    q, p = logq_y.exp(), logp_y.exp()
    return q / (alpha * p + (1.0 - alpha) * q)


def minillm_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 cfg: MiniLLMConfig = MiniLLMConfig()) -> tuple[torch.Tensor, dict]:
    """The MiniLLM surrogate loss (module doc) for sampled continuations.

    ``logits_s`` ``[B, T, V]``: the student's logits at the positions that predict the sampled
    tokens (with gradient); ``logits_t`` the teacher's (no gradient); ``tokens`` ``[B, T]`` the
    sampled tokens; ``mask`` ``[B, T]`` the real (generated, not padding) positions. Returns the
    loss and detached statistics: ``single`` (the weighted token-level reverse KL, the loss's value),
    ``reward`` (the mean over rows of the length-normalised sequence reward Σ_t r_t / T, an
    estimate of −KL per token under the sampling distribution) and ``w`` (mean importance weight)."""
    # the real positions are selected before anything is computed, so padded positions (whatever
    # their logits, NaN included) reach neither the loss nor the gradient
    m = mask.bool()
    n = float(max(int(m.sum()), 1))
    dt = torch.promote_types(logits_s.dtype, torch.float32)       # float32, or float64 when given
    ls = F.log_softmax(logits_s[m].to(dt), -1)                     # [N, V]
    lt = F.log_softmax(logits_t.detach()[m].to(dt), -1)
    y = tokens[m].long().unsqueeze(-1)
    logq_y = ls.gather(-1, y).squeeze(-1)                          # [N]
    logp_y = lt.gather(-1, y).squeeze(-1)
    with torch.no_grad():
        r = torch.zeros(m.shape, dtype=ls.dtype, device=ls.device)
        r[m] = logp_y - logq_y
        w = importance_weights(logq_y, logp_y, cfg.alpha)
        adv = apply_baseline(future_reward(r, m, cfg.length_norm), m, cfg.baseline)[m] if cfg.long_term else None
    single = (w * divergence("rkl", ls, lt)).sum() / n
    loss = single if cfg.single_step else single.new_zeros(())
    if cfg.long_term:
        loss = loss - (w * adv * (logq_y - logq_y.detach())).sum() / n
    with torch.no_grad():
        rows = m.sum(-1)
        seq_reward = (r.sum(-1) / rows.clamp_min(1))[rows > 0]
        stats = {"single": single.detach(), "reward": seq_reward.mean() if seq_reward.numel() else r.new_zeros(()),
                 "w": w.sum() / n}
    return loss, stats


@torch.no_grad()
def mixed_sample(student, teacher, prompts: torch.Tensor, max_new: int, alpha: float, *,
                 eos_id: Optional[int] = None, pad_id: int = 0, generator: Optional[torch.Generator] = None):
    """Continue ``prompts`` ``[B, P]`` by ``max_new`` tokens, each drawn from
    α·softmax(teacher) + (1 − α)·softmax(student) at temperature 1 (both models with their KV
    cache, in eval mode, without gradient). Returns ``(ids [B, P+max_new], mask [B, max_new])``
    like :func:`kdlab.lm.generate.generate` (a row stops at its first ``eos``)."""
    was_s, was_t = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        past_s = past_t = None

        def step(step_in, ids):
            nonlocal past_s, past_t
            zs, past_s = student(step_in, past_s)
            zt, past_t = teacher(step_in, past_t)
            probs = (1.0 - alpha) * torch.softmax(zs[:, -1].float(), -1) + alpha * torch.softmax(zt[:, -1].float(), -1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

        return decode(step, prompts, max_new, eos_id=eos_id, pad_id=pad_id)
    finally:
        student.train(was_s)
        teacher.train(was_t)
