"""Causal masks: where in a teacher layer the evidence for the true class lies.

For a teacher layer with output F [B, C, H, W], the rest of the network ("tail") g, and the
true-class logit z_y = g(F)_y:

* ``grad``: gradient × activation, ``S = Σ_c F_c · ∂z_y/∂F_c`` (one forward, one backward).
* ``ig``: Integrated Gradients on the layer output with a zero baseline,

      S = Σ_c F_c · ∫_0^1 ∂z_y/∂F_c |_{αF} dα  ≈  Σ_c F_c · Σ_k w_k ∂z_y/∂F_c |_{α_k F}

  with an m-point quadrature rule on [0, 1] (:func:`quadrature`):

  - ``midpoint``: ``α_k = (k − ½)/m``, ``w_k = 1/m``, k = 1..m;
  - ``gausslegendre``: ``α_k = (t_k + 1)/2``, ``w_k = v_k/2`` with ``(t_k, v_k)`` the m-point
    Gauss–Legendre nodes and weights on [−1, 1] (exact for polynomials of degree ≤ 2m − 1;
    Captum's default).

  Completeness: ``Σ_{c,h,w} S = z_y(F) − z_y(0)`` up to the quadrature error
  (:func:`completeness_error` measures it; docs/masks.md has the table that picked the default).

Batched IG (``batched=True``, the default): the teacher runs up to the layer *once* on the
B images, a forward hook replaces the layer's output by the m·B interpolated activations
``α_k F`` (all steps stacked on the batch axis, step-major), and only the tail runs on them; one
backward through the tail gives all m gradients. This needs no model edits. When the tail
cannot take a bigger batch than the head (a connection that skips the layer, e.g. the layer is
inside a residual block) the forward raises a shape error and IG falls back to running the whole
teacher on the batch repeated m times (the same numbers, more work). ``batched=False`` is the
step-by-step reference: m separate forward/backward passes.

The channel-reduced map S [B, H, W] becomes importance ``|S|`` (``reduce='abs'``) or ``max(S, 0)``
(``reduce='relu'``), and then a mask: ``binary`` keeps the top fraction q of positions per sample
(ties broken by position order), ``soft`` divides by the per-sample maximum (values in [0, 1]).

Masks are computed with the teacher's parameters frozen; gradients flow only to the layer
output, never into the teacher's weights. They are a function of (teacher, x, y), so they can be
cached (kdlab's teacher cache stores them with the logits) or computed once per image and reused
across augmented views (:mod:`kdlab.distill.mask_reuse`, :mod:`kdlab.distill.mask_store`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

RULES = ("gausslegendre", "midpoint")
DEFAULT_RULE = "midpoint"  # chosen by the completeness table in docs/masks.md (ReLU teachers)


# ----------------------------------------------------------------------------------------------
# quadrature


def quadrature(steps: int, rule: str = DEFAULT_RULE) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``α`` and weights ``w`` (float64, each [steps]) of an m-point rule on [0, 1].

    ``midpoint``: ``α_k = (k − ½)/m``, ``w_k = 1/m``. ``gausslegendre``: the Gauss–Legendre nodes
    ``t_k`` and weights ``v_k`` on [−1, 1] (numpy.polynomial.legendre.leggauss) mapped by
    ``α = (t + 1)/2``, ``w = v/2``. Both give ``Σ_k w_k = 1``.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"mask.steps must be an integer >= 1, got {steps}")
    steps = int(steps)
    if rule == "midpoint":
        a = (np.arange(steps, dtype=np.float64) + 0.5) / steps
        w = np.full(steps, 1.0 / steps)
    elif rule == "gausslegendre":
        t, v = np.polynomial.legendre.leggauss(steps)
        a, w = (t + 1.0) / 2.0, v / 2.0
    else:
        raise ValueError(f"mask.rule must be one of {', '.join(RULES)}, got '{rule}'")
    return torch.from_numpy(a), torch.from_numpy(w)


# ----------------------------------------------------------------------------------------------
# hooks


class _Replace:
    """Forward hook: the layer's output becomes a leaf requiring grad.

    ``scales`` None: the output itself. ``scales`` [n] and ``expand`` True: the output [B, ...]
    becomes ``cat_k scales[k] · out`` [n·B, ...] (the tail then runs on n·B rows). ``scales`` [n]
    and ``expand`` False: the output is already [n·B, ...] (the input was repeated n times) and
    its k-th block of B rows is scaled by ``scales[k]``.
    """

    def __init__(self, scales: torch.Tensor | None = None, expand: bool = False):
        self.scales = scales
        self.expand = expand
        self.leaf = None
        self.base = None

    def __call__(self, _m, _inp, out):
        base = out.detach()
        if self.scales is None:
            self.base = base
            self.leaf = out.detach().requires_grad_(True)
            return self.leaf
        n = self.scales.numel()
        s = self.scales.to(device=base.device, dtype=base.dtype)
        if self.expand:
            self.base = base
            self.leaf = (s.view(n, *([1] * base.dim())) * base.unsqueeze(0)).flatten(0, 1)
        else:
            self.base = base.unflatten(0, (n, -1))[0]
            self.leaf = (base.unflatten(0, (n, -1)) * s.view(n, *([1] * base.dim()))).flatten(0, 1)
        self.leaf.requires_grad_(True)
        return self.leaf


def _layer(model: nn.Module, name: str) -> nn.Module:
    mods = dict(model.named_modules())
    if name not in mods:
        raise KeyError(f"teacher has no layer '{name}' for the mask (layers: {[n for n in mods if n and '.' not in n]})")
    return mods[name]


class _Frozen:
    """Context: the teacher's parameters do not require grad (restored on exit)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc):
        for p, f in zip(self.model.parameters(), self.flags):
            p.requires_grad_(f)
        return False


def _run(teacher, module, x, hook):
    h = module.register_forward_hook(hook)
    try:
        return teacher(x)
    finally:
        h.remove()


# ----------------------------------------------------------------------------------------------
# attributions


def layer_attribution(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str,
                      method: str = "grad", steps: int = 16, chunk: int = 4096, *,
                      rule: str = DEFAULT_RULE, batched: bool = True) -> torch.Tensor:
    """Channel-summed attribution S [B, H, W] of the true-class logit to ``layer``'s output.

    ``method``: ``grad`` (gradient × activation) or ``ig`` (Integrated Gradients with ``steps``
    quadrature nodes of ``rule``); see the module docstring. ``batched``: IG's steps in one pass
    through the tail (at most ``chunk`` rows per pass) instead of one full pass per step.
    """
    if method not in ("grad", "ig"):
        raise ValueError(f"mask method must be 'grad' or 'ig', got '{method}'")
    module = _layer(teacher, layer)
    with _Frozen(teacher), torch.enable_grad():
        if method == "grad":
            hook = _Replace()
            logits = _run(teacher, module, x, hook)
            z = logits.gather(1, y.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(z, hook.leaf)
            return (g * hook.base).sum(dim=1)
        alphas, weights = quadrature(steps, rule)
        if batched:
            feat, grad = _ig_batched(teacher, module, x, y, alphas, weights, chunk)
        else:
            feat, grad = _ig_stepwise(teacher, module, x, y, alphas, weights)
        return (feat * grad).sum(dim=1)


def _ig_stepwise(teacher, module, x, y, alphas, weights):
    """Σ_k w_k ∂z_y/∂F |_{α_k F}, one forward/backward of the whole teacher per step."""
    grad, feat = None, None
    for a, w in zip(alphas.tolist(), weights.tolist()):
        hook = _Replace(torch.tensor([a]), expand=True)
        logits = _run(teacher, module, x, hook)
        (g,) = torch.autograd.grad(logits.gather(1, y.view(-1, 1)).sum(), hook.leaf)
        grad = w * g if grad is None else grad + w * g
        feat = hook.base
    return feat, grad


def _ig_batched(teacher, module, x, y, alphas, weights, chunk):
    """Σ_k w_k ∂z_y/∂F |_{α_k F} with the head run once per chunk of steps and the tail on all
    of the chunk's steps at once (falls back to repeating the input; see the module docstring)."""
    B = x.shape[0]
    per = max(1, int(chunk) // max(B, 1))  # steps per pass
    grad, feat = None, None
    expand = True
    k0 = 0
    while k0 < alphas.numel():
        a, w = alphas[k0:k0 + per], weights[k0:k0 + per]
        n = a.numel()
        hook = _Replace(a, expand=expand)
        xin = x if expand else x.repeat(n, *([1] * (x.dim() - 1)))
        try:
            logits = _run(teacher, module, xin, hook)
            if logits.shape[0] != n * B:
                raise RuntimeError("tail did not keep the expanded batch")
        except RuntimeError:
            if not expand:
                raise
            expand = False  # a connection skips the layer: run the whole teacher on n copies
            continue
        z = logits.gather(1, y.repeat(n).view(-1, 1)).sum()
        (g,) = torch.autograd.grad(z, hook.leaf)
        g = g.unflatten(0, (n, B))
        g = (g * w.to(device=g.device, dtype=g.dtype).view(n, *([1] * (g.dim() - 1)))).sum(0)
        grad = g if grad is None else grad + g
        feat = hook.base
        k0 += n
    return feat, grad


def layer_logit(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str,
                scale: float = 1.0) -> torch.Tensor:
    """``z_y(scale · F)`` [B]: the true-class logit with ``layer``'s output F scaled (0: baseline)."""
    module = _layer(teacher, layer)
    with torch.no_grad():
        logits = _run(teacher, module, x, _Replace(torch.tensor([float(scale)]), expand=True))
    return logits.gather(1, y.view(-1, 1)).squeeze(1)


def completeness_error(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str,
                       steps: int, rule: str = DEFAULT_RULE) -> dict:
    """How far IG's attributions are from completeness at ``layer``.

    ``gap_b = z_y(F_b) − z_y(0)``, ``err_b = |Σ_{c,h,w} S_b − gap_b|``. Returns
    ``{"steps", "rule", "abs": mean_b err_b, "rel": Σ_b err_b / Σ_b |gap_b|}``.
    """
    was = teacher.training
    teacher.eval()
    try:
        s = layer_attribution(teacher, x, y, layer, "ig", steps, rule=rule)
        gap = layer_logit(teacher, x, y, layer, 1.0) - layer_logit(teacher, x, y, layer, 0.0)
    finally:
        teacher.train(was)
    err = (s.sum(dim=(1, 2)) - gap).abs().double()
    return {"steps": int(steps), "rule": rule, "abs": float(err.mean()),
            "rel": float(err.sum() / gap.abs().double().sum().clamp_min(1e-30))}


def completeness_table(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str,
                       steps=(1, 2, 4, 8, 16, 32), rules=RULES) -> list[dict]:
    """:func:`completeness_error` for every (rule, steps) pair, rules outer."""
    return [completeness_error(teacher, x, y, layer, m, r) for r in rules for m in steps]


# ----------------------------------------------------------------------------------------------
# masks


def to_mask(s: torch.Tensor, q: float = 0.3, kind: str = "binary", reduce: str = "abs") -> torch.Tensor:
    """Turn a channel-reduced attribution [B, H, W] into a mask in [0, 1]."""
    imp = importance(s, reduce)
    if kind == "soft":
        return imp / imp.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    if kind != "binary":
        raise ValueError(f"mask kind must be 'binary' or 'soft', got '{kind}'")
    flat = imp.flatten(1)
    n = flat.shape[1]
    k = max(1, min(n, int(round(q * n))))
    idx = flat.topk(k, dim=1, sorted=False).indices
    mask = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return mask.view_as(imp)


def importance(s: torch.Tensor, reduce: str = "abs") -> torch.Tensor:
    """Importance of a channel-reduced attribution: ``|S|`` (``abs``) or ``max(S, 0)`` (``relu``)."""
    if reduce == "abs":
        return s.abs()
    if reduce == "relu":
        return s.clamp_min(0)
    raise ValueError(f"mask reduce must be 'abs' or 'relu', got '{reduce}'")


def importance_maps(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layers, cfg) -> dict:
    """``{layer: importance [B, H, W]}`` (before top-q / normalisation) for a recipe's ``mask``
    section; ``to_mask(importance_maps(...)[l], q, kind, reduce)`` is ``causal_masks(...)[l]``."""
    rule = getattr(cfg, "rule", DEFAULT_RULE)
    was_training = teacher.training
    teacher.eval()
    try:
        return {name: importance(layer_attribution(teacher, x, y, name, cfg.method, cfg.steps, rule=rule),
                                 cfg.reduce).detach()
                for name in layers}
    finally:
        teacher.train(was_training)


def causal_masks(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layers, cfg) -> dict:
    """Masks for each teacher layer in ``layers``, configured by a recipe's ``mask`` section
    (``method``, ``steps``, ``rule``, ``q``, ``kind``, ``reduce``)."""
    return {name: to_mask(imp, cfg.q, cfg.kind, cfg.reduce)
            for name, imp in importance_maps(teacher, x, y, layers, cfg).items()}
