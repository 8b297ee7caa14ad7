"""A small convolutional denoiser for diffusion on these machines' data sets (8×8 digits,
28×28 mnist5k): a U-Net with residual blocks, GroupNorm, a log-SNR embedding added in every block
and one skip connection per resolution.

``UNetLite(in_channels, channels, channel_mults, blocks, num_classes)``: ``forward(z, logsnr, y=None)``
returns a tensor shaped like ``z`` (the v-, x- or ε-prediction; the objective decides which).
``num_classes > 0`` makes it class-conditional (a label embedding added to the log-SNR embedding;
label ``num_classes`` is "no label", for classifier-free use). Not a classifier, so it is not in the
classifier model registry; diffusion checkpoints name it ``unet_lite`` and rebuild it with
:func:`build_unet_lite`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def logsnr_embedding(logsnr: torch.Tensor, dim: int, scale: float = 20.0) -> torch.Tensor:
    """Sinusoidal features of ``logsnr / scale`` (scale ≈ the log-SNR range's half-width), ``[B, dim]``:
    ``sin(f_k · x), cos(f_k · x)`` with frequencies ``f_k = exp(k · log(1000) / (dim/2 − 1))``."""
    half = dim // 2
    x = (logsnr.float() / scale).reshape(-1, 1)
    freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * (math.log(1000.0) / max(half - 1, 1)))
    ang = x * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, plus the embedding (a per-channel shift), GroupNorm → SiLU → conv,
    with a 1×1 skip when the channel count changes."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.n1 = nn.GroupNorm(_groups(cin), cin)
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.n2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.c2(self.drop(F.silu(self.n2(h))))
        return self.skip(x) + h


class UNetLite(nn.Module):
    """See the module doc. Resolutions: one per entry of ``channel_mults`` (each after the first
    halves the image with a stride-2 conv; odd sizes such as 7 are handled by the up-sampling to
    the skip's exact size)."""

    def __init__(self, in_channels: int = 1, channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 blocks: int = 1, num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        if channels < 1 or blocks < 1 or not channel_mults:
            raise ValueError("unet_lite needs channels >= 1, blocks >= 1 and at least one channel_mults entry")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.emb_dim = emb = 4 * channels
        self.t_mlp = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes > 0 else None
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_mults]
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        c = channels
        for i, w in enumerate(widths):
            self.down_blocks.append(nn.ModuleList([ResBlock(c if b == 0 else w, w, emb, dropout) for b in range(blocks)]))
            c = w
            if i < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout), ResBlock(c, c, emb, dropout)])
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            self.up_blocks.append(nn.ModuleList([ResBlock((c + w) if b == 0 else w, w, emb, dropout)
                                                 for b in range(blocks)]))
            c = w
            if i > 0:
                self.upsamples.append(nn.Conv2d(c, widths[i - 1], 3, padding=1))
                c = widths[i - 1]
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.channels = channels

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        logsnr = logsnr.reshape(-1).expand(z.shape[0]) if logsnr.numel() == 1 else logsnr.reshape(-1)
        emb = self.t_mlp(logsnr_embedding(logsnr, self.channels))
        if self.label is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
            emb = emb + self.label(y)
        h = self.inp(z)
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            for blk in blocks:
                h = blk(h, emb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        for blk in self.mid:
            h = blk(h, emb)
        for j, blocks in enumerate(self.up_blocks):
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = torch.cat([h, skip], dim=1)
            for blk in blocks:
                h = blk(h, emb)
            if j < len(self.upsamples):
                h = self.upsamples[j](h)
        return self.out(F.silu(self.out_norm(h)))


def build_unet_lite(in_channels: int, **kwargs) -> UNetLite:
    """``UNetLite`` from a checkpoint's ``in_channels`` and ``model_kwargs``."""
    return UNetLite(in_channels=in_channels, **kwargs)
