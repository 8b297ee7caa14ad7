"""Token-level divergences between a teacher distribution P and a student distribution Q.

Every divergence takes log-probabilities over the last dimension (``logp_t`` for the teacher P,
``logp_s`` for the student Q; use :func:`log_softmax_t` for logits with a temperature) and returns
one value per token (the shape without the last dimension), in nats. :func:`token_mean` reduces
per-token values over the non-padding positions:

    L = Σ_{b,t} m_{b,t} ℓ_{b,t} / N,

with ``N = Σ m`` for the batch, or — for gradient accumulation over micro-batches — ``N`` the
number of real tokens in the whole accumulation window (then the micro-batch losses are *summed*,
and the accumulated gradient equals that of one big batch; averaging per-micro-batch means instead
over-weights the tokens of short micro-batches).

The same functions serve a sparse teacher (top-k probabilities plus tail mass, see
:mod:`kdlab.lm.cache`): both distributions are then collapsed onto the k+1 buckets
(the k kept ids and "everything else") by :func:`bucket_logprobs`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

LOG_FLOOR = -80.0
DIVERGENCES = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")


def log_softmax_t(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(z / τ)`` in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) = Σ_v a_v (log a_v − log b_v); log-probabilities are floored at −80 (a mass of
    1.8e-35) so that zero probabilities give 0·log 0 = 0 and finite gradients."""
    la, lb = logp_a.clamp_min(LOG_FLOOR), logp_b.clamp_min(LOG_FLOOR)
    return (la.exp() * (la - lb)).sum(-1)


def forward_kl(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Forward KL, mode covering (Hinton KD, DistilBERT): KL(P‖Q) = Σ_v p_v (log p_v − log q_v).

    With a temperature τ pass ``log_softmax_t(z, τ)`` for both and multiply by τ² (as
    :func:`kd_loss` does) so gradients keep their scale.
    """
    return _kl(logp_t, logp_s)


def reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Reverse KL, mode seeking (MiniLLM): KL(Q‖P) = Σ_v q_v (log q_v − log p_v)."""
    return _kl(logp_s, logp_t)


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) computed in log space."""
    if w <= 0.0:
        return logp_b
    if w >= 1.0:
        return logp_a
    return torch.logaddexp(logp_a + math.log(w), logp_b + math.log1p(-w))


def skew_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(P ‖ αP + (1−α)Q); α = 0 is the forward KL, and it stays finite
    where Q has no mass (bounded by log(1/α))."""
    _check01("alpha", alpha)
    return _kl(logp_t, _mix(logp_t, logp_s, alpha))


def skew_reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(Q ‖ αQ + (1−α)P); α = 0 is the reverse KL."""
    _check01("alpha", alpha)
    return _kl(logp_s, _mix(logp_s, logp_t, alpha))


def generalized_jsd(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence (GKD, Agarwal et al. 2024):

        JSD(β)(P‖Q) = β·KL(P‖M) + (1−β)·KL(Q‖M),   M = βP + (1−β)Q.

    It vanishes at both ends, but its scaled limits are the KLs: JSD(β)/β → KL(P‖Q) as β → 0 and
    JSD(β)/(1−β) → KL(Q‖P) as β → 1. So ``beta=0`` returns the forward KL and ``beta=1`` the
    reverse KL (as TRL's GKD trainer does); β = 0.5 is the usual symmetric JSD.
    """
    _check01("beta", beta)
    if beta == 0.0:
        return forward_kl(logp_s, logp_t)
    if beta == 1.0:
        return reverse_kl(logp_s, logp_t)
    m = _mix(logp_t, logp_s, beta)
    return beta * _kl(logp_t, m) + (1.0 - beta) * _kl(logp_s, m)


def total_variation(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Total variation distance: TV(P, Q) = ½ Σ_v |p_v − q_v| (in [0, 1])."""
    return 0.5 * (logp_t.exp() - logp_s.exp()).abs().sum(-1)


def _check01(name: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (got {v})")


def divergence(name: str, logp_s: torch.Tensor, logp_t: torch.Tensor, **params) -> torch.Tensor:
    """Per-token divergence by name: fkl | rkl | skl (alpha) | srkl (alpha) | jsd (beta) | tvd."""
    if name == "fkl":
        return forward_kl(logp_s, logp_t)
    if name == "rkl":
        return reverse_kl(logp_s, logp_t)
    if name == "skl":
        return skew_kl(logp_s, logp_t, params.get("alpha", 0.1))
    if name == "srkl":
        return skew_reverse_kl(logp_s, logp_t, params.get("alpha", 0.1))
    if name == "jsd":
        return generalized_jsd(logp_s, logp_t, params.get("beta", 0.5))
    if name == "tvd":
        return total_variation(logp_s, logp_t)
    raise KeyError(f"unknown divergence '{name}'; choose one of {', '.join(DIVERGENCES)}")


def token_mean(values: torch.Tensor, mask: torch.Tensor, denom: Optional[float] = None) -> torch.Tensor:
    """Σ m·ℓ / N over non-padding tokens; N = Σ m unless ``denom`` (tokens of the accumulation
    window) is given. An all-padding batch gives 0, not NaN."""
    m = mask.to(values.dtype)
    n = m.sum() if denom is None else torch.as_tensor(float(denom), dtype=values.dtype)
    return (values * m).sum() / n.clamp_min(1.0)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy −log q(y_t) (nats), in float32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def kd_loss(name: str, s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0, denom: Optional[float] = None, **params) -> torch.Tensor:
    """Masked per-token mean of a divergence between dense teacher and student logits; for
    ``fkl`` with τ ≠ 1: τ²·KL(softmax(z_t/τ)‖softmax(z_s/τ)) (Hinton et al.)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    per = divergence(name, log_softmax_t(s_logits, temperature), log_softmax_t(t_logits, temperature), **params)
    return token_mean(per * temperature ** 2, mask, denom)


def bucket_logprobs(logp_s: torch.Tensor, top_idx: torch.Tensor, top_logp_t: torch.Tensor,
                    log_tail_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse student and sparse teacher onto k+1 buckets (the k cached ids, then the tail).

    Student: ``[log q_{i_1}, …, log q_{i_k}, log(1 − Σ_j q_{i_j})]``; teacher:
    ``[log p_{i_1}, …, log p_{i_k}, log r]`` with r the teacher's tail mass. By the chain rule of
    KL, KL_full(P‖Q) = KL_buckets(P‖Q) + r·KL(P_tail/r ‖ Q_tail/q_tail) ≥ KL_buckets: the
    sparse forward KL under-estimates the dense one by exactly the teacher-tail-weighted KL
    between the renormalised tails (zero when the tail is empty).
    """
    g = logp_s.gather(-1, top_idx.long())
    s_head = torch.logsumexp(g, dim=-1, keepdim=True)
    # log(1 - exp(s_head)) stably; clamp keeps it finite when the head holds all the mass
    s_tail = torch.log1p(-s_head.clamp(max=-1e-7).exp())
    return torch.cat([g, s_tail], -1), torch.cat([top_logp_t.float(), log_tail_t.float().unsqueeze(-1)], -1)
