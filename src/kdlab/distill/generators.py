"""Generators and losses of the generator-based data-free methods: DAFL (Chen et al., ICCV 2019)
and ZSKT (Micaelli & Storkey, NeurIPS 2019). The training schedules are the ``dafl`` / ``zskt``
paradigms (:mod:`kdlab.experiments.paradigms.dafl`, :mod:`kdlab.experiments.paradigms.zskt`).

Both generators map a latent ``z`` (dimension 100) through a linear layer to a 128-channel map at a
quarter of the image size, then two nearest-neighbour x2 upsamplings with 3x3 convolutions,
BatchNorm and LeakyReLU(0.2) (128 -> 128 -> 64 -> image channels), as in the authors' code:

* DAFL's ends with ``tanh`` and a BatchNorm without affine parameters (its images are normalised
  batches); its hidden BatchNorms use ``eps = 0.8`` (``nn.BatchNorm2d(128, 0.8)`` in the authors'
  code passes 0.8 as eps, kept here);
* ZSKT's ends with a BatchNorm with affine parameters after the last conv.

Image sizes that are not multiples of 4 are reached by resizing the output (nearest).

Losses (pure functions):

* DAFL generator: ``L_G = oh·L_oh + ie·L_ie + a·L_a`` with the one-hot loss ``L_oh = CE(z_T, argmax z_T)``,
  the information-entropy term ``L_ie = Σ_k p̄_k log10 p̄_k`` of the batch-mean teacher softmax ``p̄``
  (the negative entropy in base 10, so minimising it balances the classes; exactly ``−log10 K``
  when ``p̄`` is uniform) and the activation loss ``L_a = −mean|f_T|`` of the teacher's features
  before its classifier; paper weights oh = 1, ie = 5, a = 0.1. DAFL student: ``KL(p_T ‖ p_S)`` at
  T = 1, summed over classes and averaged over the batch.
* ZSKT: the divergence is ``F.kl_div(log p_S, p_T)`` with PyTorch's element-wise mean, i.e.
  ``Σ_{i,k} p_T log(p_T/p_S) / (B·K)`` (the authors' code, temperature 1); the generator minimises
  its negative (maximises the teacher–student disagreement); the student minimises it plus
  ``β · Σ_l mean((a_S^l − a_T^l)²)`` with ``a = normalize(mean_c F²)`` (AT, β = 250).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _UpGenerator(nn.Module):
    def __init__(self, latent_dim: int, image_size: int, channels: int, kind: str):
        super().__init__()
        self.latent_dim, self.image_size, self.kind = int(latent_dim), int(image_size), kind
        self.init = max(1, math.ceil(image_size / 4))
        self.l1 = nn.Linear(latent_dim, 128 * self.init ** 2)
        eps = 0.8 if kind == "dafl" else 1e-5
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(128, eps=eps)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64, eps=eps)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(channels, affine=(kind == "zskt"))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.l1(z).view(z.shape[0], 128, self.init, self.init))
        x = F.leaky_relu(self.bn1(self.conv1(F.interpolate(x, scale_factor=2))), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(F.interpolate(x, scale_factor=2))), 0.2)
        x = self.conv3(x)
        if self.kind == "dafl":
            x = torch.tanh(x)
        x = self.bn3(x)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="nearest")
        return x


def dafl_generator(latent_dim: int, image_size: int, channels: int) -> nn.Module:
    return _UpGenerator(latent_dim, image_size, channels, "dafl")


def zskt_generator(latent_dim: int, image_size: int, channels: int) -> nn.Module:
    return _UpGenerator(latent_dim, image_size, channels, "zskt")


def dafl_entropy_term(t_logits: torch.Tensor) -> torch.Tensor:
    """``Σ_k p̄_k log10 p̄_k`` of the batch-mean softmax (``−log10 K`` when uniform)."""
    p_bar = F.softmax(t_logits, dim=1).mean(dim=0)
    return (p_bar * torch.log10(p_bar)).sum()


def dafl_generator_losses(t_logits: torch.Tensor, t_features: torch.Tensor) -> dict:
    """``{"oh", "ie", "a"}``: the three DAFL generator terms (unweighted)."""
    oh = F.cross_entropy(t_logits, t_logits.argmax(dim=1))
    return {"oh": oh, "ie": dafl_entropy_term(t_logits), "a": -t_features.abs().mean()}


def kl_batchmean(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """``mean_i Σ_k p_T log(p_T / p_S)`` at T = 1 (DAFL's student loss)."""
    log_s = F.log_softmax(s_logits, dim=1)
    log_t = F.log_softmax(t_logits, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


def zskt_divergence(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """ZSKT's ``F.kl_div(log p_S, p_T)`` with the element-wise mean: the batch-mean KL / K."""
    return kl_batchmean(s_logits, t_logits) / s_logits.shape[1]


def zskt_generator_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """``−zskt_divergence``: the generator seeks inputs where student and teacher disagree."""
    return -zskt_divergence(s_logits, t_logits)


def zskt_attention(f: torch.Tensor) -> torch.Tensor:
    """``normalize(mean_c F²)`` flattened per sample."""
    return F.normalize(f.pow(2).mean(dim=1).flatten(1), dim=1)


def zskt_student_loss(s_logits, t_logits, s_feats: list, t_feats: list, beta: float = 250.0) -> torch.Tensor:
    """``zskt_divergence + β·Σ_l mean((a_S − a_T)²)`` (maps pooled to the smaller size first)."""
    loss = zskt_divergence(s_logits, t_logits)
    for fs, ft in zip(s_feats, t_feats):
        size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
        fs = F.adaptive_avg_pool2d(fs, size) if tuple(fs.shape[-2:]) != size else fs
        ft = F.adaptive_avg_pool2d(ft, size) if tuple(ft.shape[-2:]) != size else ft
        loss = loss + beta * (zskt_attention(fs) - zskt_attention(ft)).pow(2).mean()
    return loss
