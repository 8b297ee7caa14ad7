"""Masks reused across augmentations: one importance map per training image, mapped to each view.

A view of image x is (see :mod:`kdlab.data.augment`) a zero-padded crop at offset ``(dy, dx)``
in ``0..2p`` followed by an optional horizontal flip:

    view[i, j] = x[i + dy − p, j + dx − p]     (0 outside x), then mirrored when flip.

A map M [h, w] of x at a teacher layer of resolution (h, w) for an input of size (H, W) (stride
s = H/h) is mapped to the view by the same crop at the layer's resolution — a shift by
``t_y = (dy − p)/s`` rows and ``t_x = (dx − p)/s`` columns, zero outside — and the same flip:

    M_view[u, v] = M[u + t_y, v + t_x]        (then mirrored when flip),

where a fractional shift interpolates linearly between the two nearest cells
(``M[u + t] = (1 − a)·M[u + ⌊t⌋] + a·M[u + ⌊t⌋ + 1]``, ``a = t − ⌊t⌋``); when the offset is a
multiple of the stride the map is exactly the cropped map. The flip of a layer whose cell u is
centred on input column ``s·u + c`` also shifts by ``δ = (s − 1 − 2c)/s`` cells (:func:`map_masks`).

:class:`PerImageMasks` maps each image's stored importance map (``|S|`` of
:mod:`kdlab.distill.masks`, kept by :class:`kdlab.distill.mask_store.MaskStore`) to the view and
only then makes the mask (top-q or normalisation, per view), so a binary mask keeps its fraction q.

Which view each sample of a batch is: a :class:`kdlab.data.loader.BatchLoader` draws, per epoch,
a permutation and the augmentation draws of every epoch *position* (``loader.epoch_plan(e)``);
the sample at dataset index i sits at position ``inv[i]`` with ``inv[perm] = arange(N)``, so its
draws are ``params.select(inv[idx])`` (:func:`view_params`). Nothing in the loader changes.
"""

from __future__ import annotations

import math
import time

import torch

from kdlab.data.augment import AugmentParams, AugmentSpec
from kdlab.distill.mask_store import image_keys
from kdlab.distill.masks import to_mask


def view_params(perm: torch.Tensor, params: AugmentParams | None, idx: torch.Tensor) -> AugmentParams | None:
    """The augmentation draws of the samples at dataset indices ``idx`` in an epoch whose
    permutation is ``perm`` [N] and whose per-position draws are ``params``.

    ``pos = inv[idx]`` with ``inv[perm[j]] = j``; returns ``params.select(pos)`` (None if None).
    """
    if params is None:
        return None
    perm = perm.to("cpu")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return params.select(inv[idx.to("cpu")])


class EpochViews:
    """Per-sample augmentation draws of a `BatchLoader`, one epoch plan cached at a time.

    ``views(epoch, idx)`` -> :class:`AugmentParams` of the samples ``idx`` (CPU tensors), or None
    when the loader does not augment. Recomputes ``loader.epoch_plan(epoch)`` (the same generator
    draws as the loader's own iteration) once per epoch.
    """

    def __init__(self, loader):
        self.loader = loader
        self._epoch = None
        self._inv = None
        self._params = None

    def __call__(self, epoch: int, idx: torch.Tensor) -> AugmentParams | None:
        if self.loader.augment is None:
            return None
        if self._epoch != epoch:
            perm, params = self.loader.epoch_plan(epoch)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
            self._epoch, self._inv, self._params = epoch, inv, params
        return self._params.select(self._inv[idx.to("cpu")])


def shift_axis(m: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[b, ..., u, ...] = m[b, ..., u + t[b], ...]`` along ``dim``, zero outside, with
    linear interpolation for fractional ``t`` (float [B]); see the module docstring."""
    n = m.shape[dim]
    t = t.to(device=m.device, dtype=torch.float64)
    f = torch.floor(t)
    a = (t - f).to(m.dtype)
    f = f.to(torch.int64)
    pad = int(f.abs().max().item()) + 2 if t.numel() else 2
    shape = list(m.shape)
    shape[dim] = pad
    z = m.new_zeros(shape)
    padded = torch.cat([z, m, z], dim=dim)
    view = [1] * m.dim()
    view[0], view[dim] = -1, n
    i0 = (torch.arange(n, device=m.device).view(1, n) + f.view(-1, 1) + pad).view(view)
    i0 = i0.expand(*[m.shape[k] if k != dim else n for k in range(m.dim())])
    g0 = padded.gather(dim, i0)
    g1 = padded.gather(dim, i0 + 1)
    av = a.view([-1] + [1] * (m.dim() - 1))
    return (1 - av) * g0 + av * g1


def map_masks(mask: torch.Tensor, spec: AugmentSpec | None, params: AugmentParams | None,
              image_size: tuple[int, int], center: float | None = None) -> torch.Tensor:
    """Maps or masks [B, h, w] of un-augmented images -> those of their augmented views (module doc).

    ``spec`` / ``params``: the loader's augmentation and the batch's draws (None: no
    augmentation, ``mask`` is returned). ``image_size``: the input's (H, W). ``center``: the
    input column of the centre of the layer's column 0 (cell u is centred on pixel s·u + c,
    s = W/w); None: ``(s − 1)/2``, the grid symmetric under a flip. A flip then maps cell u to
    ``w − 1 − u + δ`` with ``δ = (s − 1 − 2c)/s`` (0 for the symmetric grid, ½ for a stride-2
    layer of 3x3 stride-2 convolutions, whose cells are centred on even pixels, c = 0).
    """
    if spec is None or not spec.active or params is None:
        return mask
    H, W = image_size
    h, w = mask.shape[-2:]
    out = mask
    if spec.crop_pad > 0:
        p = spec.crop_pad
        ty = (params.dy.to(torch.float64) - p) * (h / H)
        tx = (params.dx.to(torch.float64) - p) * (w / W)
        out = shift_axis(shift_axis(out, ty, out.dim() - 2), tx, out.dim() - 1)
    if spec.flip:
        fl = params.flip.to(out.device)
        out = torch.where(fl.view([-1] + [1] * (out.dim() - 1)), out.flip(-1), out)
        s = W / w
        c = (s - 1) / 2 if center is None else float(center)
        delta = (s - 1 - 2 * c) / s
        if delta != 0:
            out = shift_axis(out, torch.where(fl.cpu(), -delta, 0.0).to(torch.float64), out.dim() - 1)
    return out


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from scipy.stats import spearmanr

    rho = [spearmanr(u, v).statistic for u, v in zip(a.double().numpy(), b.double().numpy())]
    return torch.tensor(rho, dtype=torch.float64)


def mask_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Agreement of two batches of masks [B, h, w] (values in [0, 1]).

    ``iou``: mean over samples of ``Σ min(a, b) / Σ max(a, b)`` (the Jaccard index on binary
    masks, its fuzzy form otherwise; 1 when both are empty). ``spearman``: mean over samples of
    Spearman's rank correlation of the flattened masks (scipy.stats.spearmanr; samples where a
    mask is constant are left out, ``nan`` if all are).
    """
    a = a.detach().flatten(1).cpu().double()
    b = b.detach().flatten(1).cpu().double()
    inter = torch.minimum(a, b).sum(1)
    union = torch.maximum(a, b).sum(1)
    iou = torch.where(union > 0, inter / union.clamp_min(1e-30), torch.ones_like(union))
    rho = _spearman_rows(a, b)
    rho = rho[~torch.isnan(rho)]
    return {"iou": float(iou.mean()), "spearman": float(rho.mean()) if rho.numel() else math.nan,
            "n": int(a.shape[0])}


class PerImageMasks:
    """``mask.reuse: per-image`` — a batch's masks from a :class:`kdlab.distill.mask_store.MaskStore`.

    ``masks(x, y, idx, epoch)`` -> ``{layer: [B, h, w]}`` for the batch that ``loader.epoch(epoch)``
    yielded as ``(x, y, idx)``: the stored importance maps of the un-augmented images
    ``loader.x[idx]`` (normalised like the batch; computed by the store the first time an image is
    seen), mapped to the batch's views by :func:`map_masks` (draws from :class:`EpochViews`), then
    made masks on the view by :func:`kdlab.distill.masks.to_mask` (top-q / normalisation per view,
    so a binary mask keeps a fraction q of the view's cells).

    Args:
        teacher: the teacher (the store refuses any other).
        layers: teacher layers to mask.
        loader: the run's training `BatchLoader` (its ``x``, ``mean``/``std``, ``augment`` and
            ``epoch_plan``).
        store: a `MaskStore` shared by the study's runs.
        cfg: the recipe's ``mask`` section (``q``, ``kind``, ``reduce``).
        center: see :func:`map_masks` (None: the flip-symmetric grid).
    """

    def __init__(self, teacher, layers, loader, store, cfg, center: float | None = None):
        self.teacher = teacher
        self.layers = list(layers)
        self.loader = loader
        self.store = store
        self.cfg = cfg
        self.center = center
        self.views = EpochViews(loader)
        self.keys = image_keys(loader.x)
        self.image_size = tuple(loader.x.shape[-2:])
        self.mask_time_s = 0.0  # seconds spent in __call__: stored maps (computed when missing) -> masks

    def plain(self, idx: torch.Tensor) -> torch.Tensor:
        """The un-augmented images ``idx``, normalised as the loader normalises its batches."""
        x = self.loader.x[idx.to(self.loader.x.device)]
        if self.loader.mean is not None:
            x = (x - self.loader.mean) / self.loader.std
        return x

    def __call__(self, x, y, idx, epoch: int, step: int | None = None) -> dict:
        if not self.layers:
            return {}
        t0 = time.perf_counter()
        ii = idx.to("cpu").tolist()
        base = self.store.maps(self.teacher, self.plain(idx), y, [self.keys[i] for i in ii], self.layers)
        params = self.views(epoch, idx)
        c = self.cfg
        out = {l: to_mask(map_masks(m, self.loader.augment, params, self.image_size, self.center),
                          c.q, c.kind, c.reduce).to(x.device)
               for l, m in base.items()}
        self.mask_time_s += time.perf_counter() - t0
        return out


class PerImageSource:
    """A teacher source (``(x, y, idx, epoch, step) -> outputs with .logits/.feats/.masks``) that
    serves ``inner``'s logits and features and ``per_image``'s masks (``mask.reuse: per-image``).

    ``inner`` is the run's live or cached source built *without* mask layers, so the per-view
    masks are never computed; its outputs are a NamedTuple whose ``masks`` field is replaced.
    """

    def __init__(self, inner, per_image: PerImageMasks):
        self.inner = inner
        self.per_image = per_image

    @property
    def teacher(self):
        return self.inner.teacher

    def range_error(self):
        """``inner``'s fp16 overflow reason (see ``kdlab.distill.teachers.LiveTeacher.range_error``)."""
        why = getattr(self.inner, "range_error", None)
        return why() if why is not None else None

    @property
    def mask_time_s(self) -> float:
        """Seconds spent on masks: the per-image masks, plus any of ``inner`` (none when built
        without mask layers)."""
        return getattr(self.inner, "mask_time_s", 0.0) + self.per_image.mask_time_s

    def __call__(self, x, y, idx=None, epoch: int = 0, step: int = 0):
        if idx is None:
            raise ValueError("mask.reuse: per-image needs the batch indices (idx) of the training loader")
        out = self.inner(x, y, idx, epoch, step)
        return out._replace(masks=self.per_image(x, y, idx, epoch, step))


def per_image_source(inner, teacher, mask_layers, loader, mask_cfg, root=None) -> PerImageSource:
    """``mask.reuse: per-image`` on top of a teacher source built without mask layers: the masks
    of ``mask_layers`` come from the process-wide :func:`kdlab.distill.mask_store.shared_store`
    of (teacher, ``mask_cfg``) (saved under ``root`` when given), mapped to ``loader``'s views."""
    from kdlab.distill.mask_store import shared_store

    store = shared_store(teacher, mask_cfg, root)
    return PerImageSource(inner, PerImageMasks(teacher, mask_layers, loader, store, mask_cfg))
