"""Attention maps and the study's masked attention terms (alignment and transfer).

An attention map of a feature map F [B, C, H, W] is ``A = Σ_c |F_c|^p`` (p = 2 by default),
flattened and L2-normalised per sample. When the student's and teacher's maps differ in size,
the larger is resized to the smaller by area averaging (adaptive average pooling) before
flattening. A causal mask M [B, H, W] (see kdlab.distill.masks) is resized the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss


def spatial_attention(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``Σ_c |F_c|^p`` over channels: [B, C, H, W] -> [B, H, W] (not normalised)."""
    if feat.dim() != 4:
        raise ValueError(f"attention maps need 4-D feature maps [B,C,H,W], got shape {tuple(feat.shape)}")
    return feat.abs().pow(p).sum(dim=1)


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-resize [B, H, W] maps to ``size`` (no-op when already that size)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.adaptive_avg_pool2d(m.unsqueeze(1), size).squeeze(1)


def common_size(*maps: torch.Tensor) -> tuple[int, int]:
    """The smaller spatial size of the given [B, H, W] maps (per dimension)."""
    return (min(m.shape[-2] for m in maps), min(m.shape[-1] for m in maps))


def l2_normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(eps)


def attention_pair(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0, mask: torch.Tensor | None = None):
    """Flattened, L2-normalised attention vectors of student and teacher at a common size,
    and the mask resized to that size and flattened (or None): ``(a_s, a_t, m)`` each [B, H*W]."""
    ms, mt = spatial_attention(fs, p), spatial_attention(ft, p)
    size = common_size(ms, mt)
    a_s = l2_normalize(resize_map(ms, size).flatten(1))
    a_t = l2_normalize(resize_map(mt, size).flatten(1))
    m = None if mask is None else resize_map(mask.to(a_s.dtype), size).flatten(1)
    return a_s, a_t, m


def masked_attention_mse(a_s: torch.Tensor, a_t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Masked transfer ``MSE(A_s⊙M, A_t⊙M) = mean((M·(A_s − A_t))²)`` over batch and positions."""
    return ((a_s - a_t) * m).pow(2).mean()


def masked_alignment_mse(a_s: torch.Tensor, a_t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Literal masked alignment ``mean(M·(A_s − A_t)²)`` (equals the transfer form for binary M)."""
    return (m * (a_s - a_t).pow(2)).mean()


def masked_alignment_infonce(a_s: torch.Tensor, a_t: torch.Tensor, m: torch.Tensor, tau: float = 0.1):
    """Contrastive masked alignment (InfoNCE).

    For image i, ``z_s[i] = norm(A_s[i]⊙M[i])`` and ``z_t[j] = norm(A_t[j]⊙M[j])``; the logits are
    ``z_s[i]·z_t[j] / τ`` and the loss is the cross-entropy of picking j = i among the batch:
    the positive is the teacher's map of the same image, the negatives its maps of the others.
    """
    z_s = l2_normalize(a_s * m)
    z_t = l2_normalize(a_t * m)
    logits = z_s @ z_t.t() / tau
    target = torch.arange(a_s.shape[0], device=a_s.device)
    return F.cross_entropy(logits, target)


class _MaskedAttention(LossTerm):
    needs_teacher = True
    needs_masks = True

    def __init__(self, layers=None, p: float = 2.0, masked: bool = True):
        super().__init__()
        self.pairs = layer_pairs(layers, self.name)
        if p <= 0:
            raise ValueError("p must be > 0")
        self.p = float(p)
        self.masked = bool(masked)
        self.needs_masks = self.masked

    def mask_layers(self):
        return self.teacher_layers() if self.masked else []

    def _vectors(self, rec: BatchRecord, s_name: str, t_name: str):
        fs, ft = rec.s_feats[s_name], rec.t_feats[t_name]
        mask = rec.masks[t_name] if self.masked else torch.ones_like(ft[:, 0])
        return attention_pair(fs, ft, self.p, mask)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        losses = [self.pair_loss(*self._vectors(rec, s, t)) for s, t in self.pairs]
        return torch.stack(losses).mean()


@register_loss("align", "masked attention alignment: contrastive (InfoNCE) or masked MSE",
               "kdlab study: causal-mask attention alignment")
class MaskedAlignment(_MaskedAttention):
    def __init__(self, layers=None, p: float = 2.0, form: str = "contrastive", tau: float = 0.1,
                 masked: bool = True):
        super().__init__(layers, p, masked)
        if form not in ("contrastive", "mse"):
            raise ValueError("form must be 'contrastive' or 'mse'")
        if tau <= 0:
            raise ValueError("tau must be > 0")
        self.form, self.tau = form, float(tau)

    def pair_loss(self, a_s, a_t, m):
        if self.form == "mse":
            return masked_alignment_mse(a_s, a_t, m)
        return masked_alignment_infonce(a_s, a_t, m, self.tau)


@register_loss("attn", "masked attention transfer: MSE(A_s⊙M, A_t⊙M)",
               "Zagoruyko & Komodakis 2017 (attention transfer), with kdlab's causal masks")
class MaskedAttentionTransfer(_MaskedAttention):
    def pair_loss(self, a_s, a_t, m):
        return masked_attention_mse(a_s, a_t, m)
