"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018).

Channel attention ``M_c(F) = sigmoid(W1 relu(W0 avgpool(F)) + W1 relu(W0 maxpool(F)))`` with a
shared bias-free MLP ``W0: C -> C/r``, ``W1: C/r -> C`` (reduction ``r = 16``), followed by spatial
attention ``M_s(F') = sigmoid(conv7x7([mean_c(F'); max_c(F')]))`` (one bias-free 2->1 conv).
Output ``F'' = M_s(F') * F'`` with ``F' = M_c(F) * F``.

Parameters for ``C`` channels: ``2 * C * max(1, C // r) + 2 * 7 * 7``.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel attention then spatial attention, applied in sequence."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
