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

from kdlab.core.registry import Registry

LOG_FLOOR = -80.0
DIVERGENCE_REGISTRY = Registry("divergence")


def register_divergence(name: str, description: str = "", reference: str = "", params: Optional[dict] = None):
    """Register a per-token divergence ``fn(logp_s, logp_t, **params) -> [...]`` (log-probabilities
    over the last dimension in, one value per position out) under ``name``: the ``term:`` key of an LM
    recipe's ``distill.loss`` list. ``params``: ``{name: (default, low, high)}`` of its parameters
    (every divergence also takes ``temperature`` and ``temperature_scale``, handled by the caller).
    Adding a divergence is this decorator on one function, in any imported file; ``kdlab losses``
    lists it."""

    def deco(fn):
        return DIVERGENCE_REGISTRY.register(name, description=description, reference=reference,
                                            params=dict(params or {}))(fn)

    return deco


def divergence_names() -> tuple[str, ...]:
    """The registered divergences (sorted)."""
    return tuple(DIVERGENCE_REGISTRY.names())


def divergence_params(name: str) -> dict:
    """``{param: (default, low, high)}`` of a registered divergence."""
    return dict(DIVERGENCE_REGISTRY.entry(name).meta.get("params", {}))


def log_softmax_t(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(z / τ)`` in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) = Σ_v a_v (log a_v − log b_v); log-probabilities are floored at −80 (a mass of
    1.8e-35) so that zero probabilities give 0·log 0 = 0 and finite gradients."""
    la, lb = logp_a.clamp_min(LOG_FLOOR), logp_b.clamp_min(LOG_FLOOR)
    return (la.exp() * (la - lb)).sum(-1)


@register_divergence("fkl", "forward KL(P‖Q), mode covering", "Hinton et al. 2015; DistilBERT")
def forward_kl(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Forward KL, mode covering (Hinton KD, DistilBERT): KL(P‖Q) = Σ_v p_v (log p_v − log q_v).

    With a temperature τ pass ``log_softmax_t(z, τ)`` for both; :func:`kd_loss` and the LM
    objective then multiply every divergence (not only this one) by :func:`temperature_factor`.
    """
    return _kl(logp_t, logp_s)


@register_divergence("rkl", "token-level reverse KL(Q‖P), mode seeking (not MiniLLM's sequence-level objective)")
def reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Token-level reverse KL, mode seeking: KL(Q‖P) = Σ_v q_v (log q_v − log p_v) at each position
    of the given (teacher-forced or sampled) sequence. MiniLLM (Gu et al. 2024) minimises the
    *sequence-level* reverse KL by policy gradient over student samples; this is the per-token
    divergence, not that objective."""
    return _kl(logp_s, logp_t)


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) computed in log space."""
    if w <= 0.0:
        return logp_b
    if w >= 1.0:
        return logp_a
    return torch.logaddexp(logp_a + math.log(w), logp_b + math.log1p(-w))


@register_divergence("skl", "skew KL: KL(P ‖ αP + (1−α)Q)", "DistiLLM, Ko et al. 2024",
                     params={"alpha": (0.1, 0.0, 1.0)})
def skew_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(P ‖ αP + (1−α)Q); α = 0 is the forward KL, and it stays finite
    where Q has no mass (bounded by log(1/α))."""
    _check01("alpha", alpha)
    return _kl(logp_t, _mix(logp_t, logp_s, alpha))


@register_divergence("srkl", "skew reverse KL: KL(Q ‖ αQ + (1−α)P)", "DistiLLM, Ko et al. 2024",
                     params={"alpha": (0.1, 0.0, 1.0)})
def skew_reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(Q ‖ αQ + (1−α)P); α = 0 is the reverse KL."""
    _check01("alpha", alpha)
    return _kl(logp_s, _mix(logp_s, logp_t, alpha))


@register_divergence("jsd", "generalised JSD: β KL(P‖M) + (1−β) KL(Q‖M), M = βP + (1−β)Q",
                     "GKD, Agarwal et al. 2024", params={"beta": (0.5, 0.0, 1.0)})
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


@register_divergence("tvd", "total variation ½ Σ|p − q|")
def total_variation(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Total variation distance: TV(P, Q) = ½ Σ_v |p_v − q_v| (in [0, 1])."""
    return 0.5 * (logp_t.exp() - logp_s.exp()).abs().sum(-1)


def _check01(name: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (got {v})")


def divergence(name: str, logp_s: torch.Tensor, logp_t: torch.Tensor, **params) -> torch.Tensor:
    """Per-token divergence by registered name (``kdlab losses`` lists them), with its parameters
    (missing ones take the registered defaults)."""
    e = DIVERGENCE_REGISTRY.entry(name)
    bad = set(params) - set(e.meta.get("params", {}))
    if bad:
        raise ValueError(f"divergence '{name}' has no parameter(s) {sorted(bad)}")
    return e.obj(logp_s, logp_t, **params)


def token_mean(values: torch.Tensor, mask: Optional[torch.Tensor] = None,
               denom: Optional[float] = None) -> torch.Tensor:
    """Σ_{m=1} ℓ / N over the non-padding tokens; N = Σ m unless ``denom`` (tokens of the accumulation
    window) is given. ``mask=None``: ``values`` already holds only the real positions (see
    :func:`real_positions`). An all-padding batch gives 0, not NaN.

    The real positions are *selected* (``values[mask]``), not multiplied by the mask: a NaN or inf
    at a padded position (a fully masked attention row, say) must not reach the loss (0·NaN = NaN).
    """
    if mask is not None:
        values = values[mask.bool()]
    n = float(values.numel()) if denom is None else float(denom)
    return values.sum() / max(n, 1.0)


def real_positions(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``t[mask]`` for each tensor (``[B, T, ...]`` -> ``[N, ...]``), ``mask`` ``[B, T]``: the
    divergences are then computed on the real positions only, so padded positions contribute
    neither a value nor a gradient, even when their logits are not finite."""
    sel = mask.bool()
    return tuple(t[sel] for t in tensors)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy −log q(y_t) (nats), in float32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


TEMPERATURE_SCALES = ("tau2", "none")


def temperature_factor(temperature: float, scale: str = "tau2") -> float:
    """The factor a divergence at temperature τ is multiplied by: ``tau2`` → τ² (Hinton et al.:
    the gradient of a temperature-τ divergence w.r.t. the logits shrinks as 1/τ², so τ² keeps the
    term's weight independent of τ; kdlab's default, for every divergence), ``none`` → 1 (TRL's
    ``generalized_jsd_loss`` divides the logits by τ and applies no factor). At τ = 1 both are 1."""
    if scale not in TEMPERATURE_SCALES:
        raise ValueError(f"temperature_scale must be one of {', '.join(TEMPERATURE_SCALES)} (got {scale!r})")
    return temperature ** 2 if scale == "tau2" else 1.0


def kd_loss(name: str, s_logits: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0, denom: Optional[float] = None, temperature_scale: str = "tau2",
            **params) -> torch.Tensor:
    """Per-token mean over the real positions of ``mask`` of a divergence between dense teacher and
    student logits at temperature τ, times :func:`temperature_factor` (τ² by default, for every
    divergence: τ²·D(softmax(z_t/τ), softmax(z_s/τ)); ``temperature_scale="none"``: no factor, TRL's
    convention)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    s, t = real_positions(mask, s_logits, t_logits)
    per = divergence(name, log_softmax_t(s, temperature), log_softmax_t(t, temperature), **params)
    return token_mean(per * temperature_factor(temperature, temperature_scale), None, denom)


def bucket_logprobs(logp_s: torch.Tensor, top_idx: torch.Tensor, top_logp_t: torch.Tensor,
                    log_tail_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse student and sparse teacher onto k+1 buckets (the k cached ids, then the tail).

    Student: ``[log q_{i_1}, …, log q_{i_k}, log(1 − Σ_j q_{i_j})]``; teacher:
    ``[log p_{i_1}, …, log p_{i_k}, log r]`` with r the teacher's tail mass. By the chain rule of
    KL, KL_full(P‖Q) = KL_buckets(P‖Q) + r·KL(P_tail/r ‖ Q_tail/q_tail) ≥ KL_buckets: the
    sparse forward KL under-estimates the dense one by exactly the teacher-tail-weighted KL
    between the renormalised tails (zero when the tail is empty).
    """
    idx = top_idx.long()
    g = logp_s.gather(-1, idx)
    s_tail = tail_logsumexp(logp_s, idx).unsqueeze(-1)
    return torch.cat([g, s_tail], -1), torch.cat([top_logp_t.float(), log_tail_t.float().unsqueeze(-1)], -1)


def tail_logsumexp(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ idx} p_v: the log-mass outside the ids ``idx``, as a log-sum-exp over those ids.

    Exact where ``log(1 − Σ_{i∈idx} p_i)`` is not: when the head holds all but 1e-9 of the mass,
    1 − Σ p cancels to 0 in float32 (machine ε 1.2e-7) and the tail reads −inf (or a floor). Floored
    at ``LOG_FLOOR`` only when the tail is truly empty (every other log-probability −inf)."""
    rest = logp.scatter(-1, idx.long(), float("-inf"))
    return torch.logsumexp(rest, dim=-1).clamp_min(LOG_FLOOR)


def loss_catalogue() -> str:
    """The text of ``kdlab losses``: the loss terms of classification recipes (``train.losses``) and
    the divergences of language-model recipes (``distill.loss``), each with its description."""
    from kdlab.distill.losses import LOSSES

    lines = ["loss terms (classification recipes: loss: [{term: ...}])"]
    for e in LOSSES.entries():
        ref = f"  [{e.reference}]" if e.reference else ""
        lines.append(f"  {e.name:<10} {e.description}{ref}")
    lines.append("LM divergences (lm recipes: distill.loss: [{term: ...}]; also ce; all take temperature, "
                 "temperature_scale: tau2|none)")
    for e in DIVERGENCE_REGISTRY.entries():
        ps = ", ".join(f"{k}={d}" for k, (d, _, _) in e.meta.get("params", {}).items())
        ref = f"  [{e.reference}]" if e.reference else ""
        lines.append(f"  {e.name:<10} {e.description}{f' ({ps})' if ps else ''}{ref}")
    from kdlab.lm.hidden import HIDDEN_LOSSES

    lines.append("LM hidden-state losses (kdlab lm hf-distill --hidden NAME; learned projections, layer map)")
    for e in HIDDEN_LOSSES.entries():
        ref = f"  [{e.reference}]" if e.reference else ""
        lines.append(f"  {e.name:<10} {e.description}{ref}")
    return "\n".join(lines)
