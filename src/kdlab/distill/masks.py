"""Causal masks: where in a teacher layer the evidence for the true class lies.

For a teacher layer with output F [B, C, H, W] and the true-class logit z_y:

* ``grad``: gradient × activation, ``S = Σ_c F_c · ∂z_y/∂F_c``.
* ``ig``: Integrated Gradients on the layer output with a zero baseline,
  ``S = Σ_c F_c · (1/m) Σ_k ∂z_y/∂F_c |_{α_k F}`` with midpoints ``α_k = (k − ½)/m``, k = 1..m.
  (Completeness: Σ over all positions and channels ≈ z_y(F) − z_y(0).)

The channel-reduced map S [B, H, W] becomes importance ``|S|`` (``reduce='abs'``) or ``max(S, 0)``
(``reduce='relu'``), and then a mask: ``binary`` keeps the top fraction q of positions per sample
(ties broken by position order), ``soft`` divides by the per-sample maximum (values in [0, 1]).

Masks are computed with the teacher's parameters frozen; gradients flow only to the layer
output, never into the teacher's weights. They are a function of (teacher, x, y), so they can be
cached (kdlab's teacher cache stores them with the logits).
"""

from __future__ import annotations

import torch
from torch import nn


class _Replace:
    """Forward hook that records a layer output as a leaf requiring grad, optionally scaled."""

    def __init__(self, scales: torch.Tensor | None = None):
        self.scales = scales
        self.leaf = None

    def __call__(self, _m, _inp, out):
        base = out.detach()
        self.base = base
        if self.scales is None:
            self.leaf = base.requires_grad_(True)
            return self.leaf
        # out is [m*B, ...] (the batch repeated m times); scale the k-th copy by alpha_k
        shape = (-1,) + (1,) * (base.dim() - 1)
        self.leaf = (base * self.scales.view(shape).to(base.dtype)).requires_grad_(True)
        return self.leaf


def _layer(model: nn.Module, name: str) -> nn.Module:
    mods = dict(model.named_modules())
    if name not in mods:
        raise KeyError(f"teacher has no layer '{name}' for the mask (layers: {[n for n in mods if n and '.' not in n]})")
    return mods[name]


def layer_attribution(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str,
                      method: str = "grad", steps: int = 16, chunk: int = 4096) -> torch.Tensor:
    """Channel-summed attribution S [B, H, W] of the true-class logit to ``layer``'s output."""
    if method not in ("grad", "ig"):
        raise ValueError(f"mask method must be 'grad' or 'ig', got '{method}'")
    module = _layer(teacher, layer)
    flags = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            if method == "grad":
                hook = _Replace()
                h = module.register_forward_hook(hook)
                try:
                    logits = teacher(x)
                finally:
                    h.remove()
                z = logits.gather(1, y.view(-1, 1)).sum()
                (g,) = torch.autograd.grad(z, hook.leaf)
                return (g * hook.leaf.detach()).sum(dim=1)
            return _integrated_gradients(teacher, module, x, y, steps, chunk)
    finally:
        for p, f in zip(teacher.parameters(), flags):
            p.requires_grad_(f)


def _integrated_gradients(teacher, module, x, y, steps, chunk):
    B = x.shape[0]
    alphas = (torch.arange(steps, dtype=torch.float32, device=x.device) + 0.5) / steps
    per = max(1, chunk // max(B, 1))  # steps per forward pass
    grad_sum, feat = None, None
    for k0 in range(0, steps, per):
        a = alphas[k0:k0 + per]
        n = a.numel()
        scales = a.repeat_interleave(B)
        hook = _Replace(scales)
        h = module.register_forward_hook(hook)
        try:
            logits = teacher(x.repeat(n, *([1] * (x.dim() - 1))))
        finally:
            h.remove()
        z = logits.gather(1, y.repeat(n).view(-1, 1)).sum()
        (g,) = torch.autograd.grad(z, hook.leaf)
        g = g.view(n, B, *g.shape[1:]).sum(0)
        grad_sum = g if grad_sum is None else grad_sum + g
        if feat is None:
            feat = hook.base.view(n, B, *g.shape[1:])[0]
    return (feat * grad_sum / steps).sum(dim=1)


def to_mask(s: torch.Tensor, q: float = 0.3, kind: str = "binary", reduce: str = "abs") -> torch.Tensor:
    """Turn a channel-reduced attribution [B, H, W] into a mask in [0, 1]."""
    imp = s.abs() if reduce == "abs" else s.clamp_min(0)
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


def causal_masks(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, layers, cfg) -> dict:
    """Masks for each teacher layer in ``layers``, configured by a recipe's ``mask`` section."""
    was_training = teacher.training
    teacher.eval()
    try:
        return {
            name: to_mask(layer_attribution(teacher, x, y, name, cfg.method, cfg.steps),
                          cfg.q, cfg.kind, cfg.reduce).detach()
            for name in layers
        }
    finally:
        teacher.train(was_training)
