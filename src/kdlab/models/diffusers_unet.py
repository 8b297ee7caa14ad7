"""The optional second denoiser backend: ``diffusers``' ``UNet2DModel`` built from a config
offline (no download), behind the same ``forward(z, logsnr, y=None)`` as
:class:`kdlab.models.unet_lite.UNetLite`, so the schedule, sampler, objective and progressive
distillation of :mod:`kdlab.distill.diffusion` drive it unchanged.

The log-SNR enters as diffusers' timestep: ``t = 25·(20 − λ)`` (λ ∈ [−20, 20] → t ∈ [0, 1000],
the range its sinusoidal timestep embedding is made for). Needs ``pip install 'kdlab[diffusion]'``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def _unet2d_class():
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError("model.backend: diffusers needs the diffusers package; install it with "
                          "pip install 'kdlab[diffusion]' or use model.backend: unet_lite") from None
    return UNet2DModel


class DiffusersUNet(nn.Module):
    """``UNet2DModel(sample_size, in/out channels, block_out_channels = channels·mults,
    layers_per_block = blocks, DownBlock2D / UpBlock2D)``; ``config`` overrides any of its keys."""

    def __init__(self, in_channels: int = 1, channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 blocks: int = 1, sample_size: int = 8, dropout: float = 0.0, config: Optional[dict] = None):
        super().__init__()
        widths = tuple(int(channels * m) for m in channel_mults)
        groups = next(g for g in (8, 4, 2, 1) if all(w % g == 0 for w in widths))
        cfg = {"sample_size": int(sample_size), "in_channels": in_channels, "out_channels": in_channels,
               "block_out_channels": widths, "layers_per_block": int(blocks), "norm_num_groups": groups,
               "down_block_types": ("DownBlock2D",) * len(widths), "up_block_types": ("UpBlock2D",) * len(widths),
               "dropout": float(dropout)}
        cfg.update(config or {})
        self.unet = _unet2d_class()(**cfg)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        lam = logsnr.reshape(-1).expand(z.shape[0]) if logsnr.numel() == 1 else logsnr.reshape(-1)
        return self.unet(z, 25.0 * (20.0 - lam.float())).sample
