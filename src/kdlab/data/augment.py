"""Batched augmentation on ``[N, C, H, W]`` tensors, driven by a `torch.Generator`.

Random crop with zero padding: the image is padded by ``p`` zeros on every side and an
``H x W`` window is cut at offset ``(dy, dx)``, each drawn uniformly from ``0..2p`` per image, so

    out[n, c, i, j] = x[n, c, i + dy[n] - p, j + dx[n] - p]   (0 where that is outside x).

``dy = dx = p`` is the identity. Horizontal flip mirrors the width axis of each image with
probability 0.5. Crop is applied before flip. Everything is vectorised (one pad and two gathers
for the crop, one ``torch.where`` for the flip); no Python loop over images.

RandAugment-lite (``randaugment: k``, ``magnitude: m`` in (0, 1]; after crop and flip, on images in
[0, 1]): each image gets ``k`` operations in turn, each drawn uniformly from :data:`RA_OPS` with a
random sign ``s = ±1``, all at the one magnitude ``m`` (RandAugment's single-magnitude scheme,
Cubuk et al. 2020, reduced to photometric operations that need no interpolation):

* ``identity``;
* ``brightness``: ``clamp(x · (1 + 0.9·m·s))`` (PIL's blend with black);
* ``contrast``: ``clamp(μ + (1 + 0.9·m·s)·(x − μ))``, μ the image's mean over channels and pixels;
* ``solarize``: ``1 − x`` where ``x ≥ 1 − m``;
* ``posterize``: ``floor(x · 2^b) / 2^b`` with ``b = 8 − round(4m)`` bits;
* ``autocontrast``: each channel of each image rescaled to span [0, 1] (unchanged when flat).

Every operation is computed for the whole batch and chosen per image with ``torch.where``.

Random draws, in this order and only for the enabled parts: ``dy`` (``randint``, N values),
``dx`` (``randint``, N), flip (``rand(N) < 0.5``), RandAugment operations (``randint(len(RA_OPS))``,
N×k) and signs (``rand(N, k) < 0.5`` → +1). They are made on the generator's device and
then moved to ``x``'s device, so a CPU generator gives the same augmentation on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


RA_OPS = ("identity", "brightness", "contrast", "solarize", "posterize", "autocontrast")


@dataclass(frozen=True)
class AugmentSpec:
    """``crop_pad``: zero padding of the random crop (0 = no crop); ``flip``: random h-flip;
    ``randaugment``: RandAugment-lite operations per image (0 = off) at ``magnitude``."""

    crop_pad: int = 0
    flip: bool = False
    randaugment: int = 0
    magnitude: float = 0.5

    def __post_init__(self) -> None:
        if int(self.crop_pad) != self.crop_pad or self.crop_pad < 0:
            raise ValueError(f"crop_pad must be an integer >= 0, got {self.crop_pad}")
        if int(self.randaugment) != self.randaugment or self.randaugment < 0:
            raise ValueError(f"randaugment must be an integer >= 0, got {self.randaugment}")
        if not 0.0 < float(self.magnitude) <= 1.0:
            raise ValueError(f"magnitude must be in (0, 1], got {self.magnitude}")

    def __repr__(self) -> str:  # without RandAugment: the repr of earlier versions (cache keys)
        ra = f", randaugment={self.randaugment}, magnitude={self.magnitude}" if self.randaugment else ""
        return f"AugmentSpec(crop_pad={self.crop_pad}, flip={self.flip}{ra})"

    @property
    def pad(self) -> int:
        """Alias of ``crop_pad``."""
        return self.crop_pad

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.flip or self.randaugment > 0


@dataclass
class AugmentParams:
    """Per-image random draws: crop offsets ``dy``, ``dx`` (or None) and ``flip`` mask (or None)."""

    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    ra_op: torch.Tensor | None = None  # [N, k] indices into RA_OPS
    ra_sign: torch.Tensor | None = None  # [N, k] of ±1

    def select(self, pos) -> "AugmentParams":
        """The draws of the images at positions ``pos``."""
        pick = lambda t: None if t is None else t[pos]  # noqa: E731
        return AugmentParams(pick(self.dy), pick(self.dx), pick(self.flip), pick(self.ra_op), pick(self.ra_sign))

    def to(self, device) -> "AugmentParams":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AugmentParams(mv(self.dy), mv(self.dx), mv(self.flip), mv(self.ra_op), mv(self.ra_sign))


def draw_params(n: int, spec: AugmentSpec, generator: torch.Generator) -> AugmentParams:
    """Draw the random choices for ``n`` images (see the module docstring for the order)."""
    dev = generator.device
    p = AugmentParams()
    if spec.crop_pad > 0:
        hi = 2 * spec.crop_pad + 1
        p.dy = torch.randint(0, hi, (n,), generator=generator, device=dev)
        p.dx = torch.randint(0, hi, (n,), generator=generator, device=dev)
    if spec.flip:
        p.flip = torch.rand(n, generator=generator, device=dev) < 0.5
    if spec.randaugment:
        k = int(spec.randaugment)
        p.ra_op = torch.randint(0, len(RA_OPS), (n, k), generator=generator, device=dev)
        p.ra_sign = torch.where(torch.rand(n, k, generator=generator, device=dev) < 0.5, 1.0, -1.0)
    return p


def randaugment_ops(x: torch.Tensor, m: float, sign: torch.Tensor) -> list[torch.Tensor]:
    """Every RandAugment-lite operation of :data:`RA_OPS` applied to the whole batch ``x``
    (``[N, C, H, W]`` in [0, 1]) at magnitude ``m`` with per-image signs ``sign`` ``[N]``."""
    f = (1.0 + 0.9 * m * sign.to(x.device, x.dtype)).view(-1, 1, 1, 1)
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    levels = 2.0 ** (8 - round(4 * m))
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    auto = torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)
    return [x, (x * f).clamp(0, 1), (mu + f * (x - mu)).clamp(0, 1), torch.where(x >= 1.0 - m, 1.0 - x, x),
            torch.floor(x * levels) / levels, auto]


def randaugment_with_params(x: torch.Tensor, m: float, ops: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Apply the drawn operations ``ops`` ``[N, k]`` (signs ``[N, k]``) to ``x`` in turn."""
    ops = ops.to(x.device)
    for j in range(ops.shape[1]):
        outs = randaugment_ops(x, m, signs[:, j])
        pick = ops[:, j].view(-1, 1, 1, 1)
        y = x
        for i, out in enumerate(outs):
            y = torch.where(pick == i, out, y)
        x = y
    return x


def crop_with_offsets(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x`` by ``pad`` and cut each image's ``H x W`` window at ``(dy[n], dx[n])``."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # [N, C, H+2p, W+2p]
    dy = dy.to(device=x.device, dtype=torch.int64)
    dx = dx.to(device=x.device, dtype=torch.int64)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def flip_with_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the width axis of the images where ``mask`` is True."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)


def apply_params(x: torch.Tensor, spec: AugmentSpec, params: AugmentParams) -> torch.Tensor:
    """Apply drawn choices to a batch (crop, then flip). Returns a new tensor or ``x`` itself."""
    if spec.crop_pad > 0:
        x = crop_with_offsets(x, spec.crop_pad, params.dy, params.dx)
    if spec.flip:
        x = flip_with_mask(x, params.flip)
    if spec.randaugment:
        x = randaugment_with_params(x, float(spec.magnitude), params.ra_op, params.ra_sign)
    return x


def augment_batch(x: torch.Tensor, spec: AugmentSpec | None, generator: torch.Generator) -> torch.Tensor:
    """Randomly crop (zero padding ``spec.crop_pad``) and flip a batch ``[N, C, H, W]``.

    ``x`` is not modified. With ``spec`` None or inactive, ``x`` is returned and nothing is drawn.
    """
    if spec is None or not spec.active:
        return x
    return apply_params(x, spec, draw_params(x.shape[0], spec, generator))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x - mean) / std`` per channel; ``mean`` / ``std`` are sequences of length C."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if m.shape[1] != x.shape[1] or s.shape[1] != x.shape[1]:
        raise ValueError(
            f"normalize: mean/std have {m.shape[1]}/{s.shape[1]} values but x has {x.shape[1]} channels"
        )
    return (x - m) / s


# -- mixup / CutMix (batch-level; drawn per epoch position by the training step) -------------------
@dataclass(frozen=True)
class MixSpec:
    """``mixup`` / ``cutmix``: the Beta(α, α) parameter of each (0 = off). With both on, each batch
    uses one of them, CutMix with probability ½ (timm's switch). Mixup (Zhang et al., ICLR 2018):
    ``x̃ = λ·x + (1−λ)·x[π]``; CutMix (Yun et al., ICCV 2019): the box of ``x[π]`` pasted into ``x``,
    side ``√(1−λ)`` of the image's, centred at a uniform pixel and clipped, and λ set to the share
    of ``x`` left. Label terms then count ``λ·L(y) + (1−λ)·L(y[π])``."""

    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self) -> None:
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix must be >= 0, got {self.mixup} and {self.cutmix}")

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class MixParams:
    lam: float  # the weight of x (and of y) in the mixed batch
    perm: torch.Tensor  # [N] partner of each image
    box: tuple | None = None  # CutMix: (y1, y2, x1, x2), else None


def draw_mix(n: int, h: int, w: int, spec: MixSpec, generator: torch.Generator) -> MixParams:
    """Draw one batch's mixing: mode (``rand() < ½`` → CutMix, only when both are on), λ ~ Beta(α, α)
    (numpy's, seeded from the generator), the permutation, and CutMix's box centre (``randint``)."""
    import math

    import numpy as np

    cut = spec.cutmix > 0 and (spec.mixup <= 0 or bool(torch.rand(1, generator=generator) < 0.5))
    alpha = spec.cutmix if cut else spec.mixup
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(n, generator=generator)
    if not cut:
        return MixParams(lam, perm)
    r = math.sqrt(1.0 - lam)
    ch, cw = int(h * r), int(w * r)
    cy, cx = int(torch.randint(0, h, (1,), generator=generator)), int(torch.randint(0, w, (1,), generator=generator))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return MixParams(1.0 - (y2 - y1) * (x2 - x1) / (h * w), perm, (y1, y2, x1, x2))


def apply_mix(x: torch.Tensor, p: MixParams) -> torch.Tensor:
    """The mixed batch (``x`` is not modified)."""
    perm = p.perm.to(x.device)
    if p.box is None:
        return p.lam * x + (1.0 - p.lam) * x[perm]
    y1, y2, x1, x2 = p.box
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    return out
