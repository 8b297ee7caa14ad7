"""Attribution maps (saliency, Integrated Gradients, Grad-CAM) and region importance.

The attributions themselves come from Captum (``pip install 'kdlab[explain]'``); this module only
fixes the conventions kdlab uses to compare models:

* :func:`attribute` returns one map per image, ``[N, H, W]`` at input resolution:

  - ``"saliency"``: ``sum_c |dF_target/dx_c|`` (Captum ``Saliency(abs=True)``, channel-summed).
  - ``"ig"``: ``sum_c |IG_c(x)|`` with ``IG_c(x) = (x_c - b_c) * ∫_0^1 dF(b + a(x - b))/dx_c da``
    (Captum ``IntegratedGradients``, Gauss-Legendre rule with ``steps`` points).
  - ``"gradcam"``: ``ReLU(sum_k alpha_k A_k)`` at a named layer, ``alpha_k`` the spatial mean of
    ``dF_target/dA_k`` (Captum ``LayerGradCam(relu_attributions=True)``), upsampled to the input
    size with ``LayerAttribution.interpolate`` (bilinear, so the map stays non-negative).

  :func:`attribute_raw` gives the signed per-channel ``[N, C, H, W]`` saliency / IG before the
  absolute value and the channel sum.
* :func:`ig_completeness` measures how well IG satisfies completeness,
  ``sum(IG(x)) = F(x) - F(b)``, from Captum's ``return_convergence_delta``.
* :func:`region_importance` sums ``|attr|`` inside the parts of a regular grid (or of given
  segments, e.g. SLIC superpixels from :func:`superpixels`), giving per-image part-importance
  vectors for :mod:`kdlab.evaluate.alignment`.

Models are put in eval mode while attributing (their previous mode is restored afterwards).
Inputs are what the model consumes (normalised images). Layers are named as in
``model.named_modules()``; ``layer=None`` for Grad-CAM means the model's last stage
(``model.stage_names[-1]``).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor, nn

METHODS = ("saliency", "ig", "gradcam")


def _captum():
    try:
        import captum.attr as ca
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "attribution maps need Captum: pip install 'kdlab[explain]' (or pip install captum)"
        ) from e
    return ca


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """The submodule named ``layer`` (as in ``named_modules()``); ``None`` -> last stage."""
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        stages = getattr(model, "stage_names", None)
        if not stages:
            raise ValueError("Grad-CAM needs a layer: pass layer='<name from model.named_modules()>'")
        layer = stages[-1]
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        some = [n for n in modules if n][:12]
        raise KeyError(f"model has no layer {layer!r}; pick one of {some}{' ...' if len(modules) > 13 else ''}")
    return modules[layer]


def _check_x(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a float tensor [N, C, H, W], got {shape}")
    return x


def _target(target, n: int, device) -> Tensor:
    """Targets as a LongTensor [N] (an int is broadcast to every image)."""
    if isinstance(target, int):
        return torch.full((n,), int(target), dtype=torch.long, device=device)
    t = torch.as_tensor(target, device=device).long().reshape(-1)
    if t.numel() == 1 and n != 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"target must be an int or hold one class per image ({n}), got {t.numel()}")
    return t


def make_baseline(x: Tensor, baseline="zeros") -> Tensor:
    """The IG baseline for inputs ``x`` ``[N, C, H, W]``.

    * ``"zeros"``: all-zero input. For normalised inputs ``(x - mean) / std`` this is the
      dataset-mean colour everywhere.
    * ``"mean"``: each image's own per-channel spatial mean, i.e. a flat image of the same
      average colour (keeps the image's global colour, removes all spatial structure).
    * a tensor (or number) broadcastable to ``x``.
    """
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(x)
        if baseline == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
        raise ValueError(f"baseline must be 'zeros', 'mean' or a tensor, got {baseline!r}")
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        return torch.broadcast_to(b, x.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"baseline of shape {tuple(b.shape)} does not broadcast to the inputs {tuple(x.shape)}"
        ) from None


def attribute_raw(model: nn.Module, x: Tensor, target, method: str = "saliency", *,
                  baseline="zeros", steps: int = 32, internal_batch_size: int | None = None,
                  ) -> Tensor:
    """Signed per-channel attribution ``[N, C, H, W]`` for ``"saliency"`` (the raw gradient,
    no absolute value) or ``"ig"`` (Integrated Gradients)."""
    ca = _captum()
    x = _check_x(x).detach()
    t = _target(target, x.shape[0], x.device)
    with eval_mode(model):
        if method == "saliency":
            return ca.Saliency(model).attribute(x.clone().requires_grad_(True), target=t,
                                                abs=False).detach()
        if method == "ig":
            return ig_attribute(model, x, t, baseline=baseline, steps=steps,
                                internal_batch_size=internal_batch_size)[0]
    raise ValueError(f"attribute_raw supports 'saliency' and 'ig', got {method!r}")


def attribute(model: nn.Module, x: Tensor, target, method: str = "saliency", *,
              layer: str | nn.Module | None = None, baseline="zeros", steps: int = 32,
              internal_batch_size: int | None = None, interpolate_mode: str = "bilinear",
              ) -> Tensor:
    """Attribution map ``[N, H, W]`` of ``model``'s ``target`` logit for inputs ``x``.

    ``target``: an int (same class for all images) or one class per image.
    ``method``: ``"saliency"`` | ``"ig"`` (channel-summed absolute values) or ``"gradcam"``
    (non-negative, at ``layer``, upsampled to ``H x W``). ``baseline``, ``steps`` and
    ``internal_batch_size`` configure IG (see :func:`make_baseline`).
    """
    if method in ("saliency", "ig"):
        raw = attribute_raw(model, x, target, method, baseline=baseline, steps=steps,
                            internal_batch_size=internal_batch_size)
        return raw.abs().sum(dim=1)
    if method == "gradcam":
        ca = _captum()
        x = _check_x(x).detach()
        t = _target(target, x.shape[0], x.device)
        mod = resolve_layer(model, layer)
        with eval_mode(model):
            cam = ca.LayerGradCam(model, mod).attribute(x, target=t, relu_attributions=True)
        if cam.dim() != 4:
            raise ValueError(
                f"Grad-CAM needs a layer with [N, C, h, w] output; {layer!r} gives {tuple(cam.shape)}"
            )
        cam = ca.LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]),
                                              interpolate_mode=interpolate_mode)
        return cam[:, 0].clamp_min(0.0)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def ig_attribute(model: nn.Module, x: Tensor, target, baseline="zeros", steps: int = 32, *,
                 internal_batch_size: int | None = None, relative: bool = True,
                 eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Integrated Gradients and its completeness error in one pass.

    Returns ``(attr [N, C, H, W] signed, error [N])``. ``delta = sum(IG(x)) - (F(x) - F(b))``
    comes from Captum's ``return_convergence_delta``; the error is
    ``|delta| / max(|F(x) - F(b)|, eps)`` (``relative=True``, default) or ``|delta|``.
    """
    ca = _captum()
    x = _check_x(x).detach()
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = _target(target, x.shape[0], x.device)
    b = make_baseline(x, baseline)
    with eval_mode(model):
        attr, delta = ca.IntegratedGradients(model).attribute(
            x, baselines=b, target=t, n_steps=int(steps), internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        err = delta.detach().abs().reshape(-1).to(x.dtype)
        if relative:
            with torch.no_grad():
                idx = torch.arange(x.shape[0], device=x.device)
                gap = (model(x)[idx, t] - model(b)[idx, t]).abs()
            err = err / gap.clamp_min(eps)
    return attr.detach(), err


def ig_completeness(model: nn.Module, x: Tensor, target, baseline="zeros", steps: int = 32, *,
                    internal_batch_size: int | None = None, relative: bool = True,
                    eps: float = 1e-8) -> Tensor:
    """Per-image completeness error of Integrated Gradients, ``[N]``.

    ``delta = sum(IG(x)) - (F(x) - F(b))`` comes from Captum's ``return_convergence_delta``.
    With ``relative=True`` (default) the result is ``|delta| / max(|F(x) - F(b)|, eps)``,
    otherwise ``|delta|``.
    """
    return ig_attribute(model, x, target, baseline, steps, internal_batch_size=internal_batch_size,
                        relative=relative, eps=eps)[1]


# ---------------------------------------------------------------------------------------------
# region importance


def grid_bounds(size: int, parts: int) -> list[int]:
    """Cell boundaries along one axis: ``floor(i * size / parts)`` for ``i = 0..parts``.

    Every pixel falls in exactly one cell; when ``size`` is not divisible by ``parts`` the cells
    have ``floor(size / parts)`` or ``ceil(size / parts)`` pixels (e.g. 10 pixels in 4 parts:
    2, 3, 2, 3). 8x8 digits with a 4x4 grid give 2x2-pixel cells, 32x32 images 8x8 cells.
    """
    if not 1 <= int(parts) <= int(size):
        raise ValueError(f"a grid of {parts} parts does not fit {size} pixels; use 1..{size} parts")
    return [(i * size) // parts for i in range(parts + 1)]


def _cell_matrix(size: int, parts: int, like: Tensor) -> Tensor:
    """One-hot ``[parts, size]``: row i marks the pixels of cell i."""
    b = grid_bounds(size, parts)
    m = like.new_zeros((parts, size))
    for i in range(parts):
        m[i, b[i]:b[i + 1]] = 1.0
    return m


def region_importance(attr: Tensor, grid: Sequence[int] = (4, 4), *,
                      segments: Tensor | None = None) -> Tensor:
    """Sum of ``|attr|`` per part, per image.

    ``attr``: ``[N, H, W]`` (a ``[N, 1, H, W]`` map is squeezed). With a regular ``grid``
    ``(gh, gw)`` the result is ``[N, gh * gw]``, parts in row-major order (cell ``(i, j)`` at
    index ``i * gw + j``), cell boundaries as in :func:`grid_bounds`.

    With ``segments`` (an integer label map ``[N, H, W]`` or ``[H, W]``, labels ``0..S-1``, e.g.
    from :func:`superpixels`) the result is ``[N, S]``; a label absent from an image gives NaN
    there, which the alignment metrics ignore.
    """
    if attr.dim() == 4 and attr.shape[1] == 1:
        attr = attr[:, 0]
    if attr.dim() != 3:
        raise ValueError(f"attr must be [N, H, W], got {tuple(attr.shape)}")
    a = attr.detach().abs().to(torch.float64)
    n, h, w = a.shape
    if segments is None:
        if len(grid) != 2:
            raise ValueError(f"grid must be (rows, cols), got {grid!r}")
        gh, gw = int(grid[0]), int(grid[1])
        rows, cols = _cell_matrix(h, gh, a), _cell_matrix(w, gw, a)
        return torch.einsum("ih,nhw,jw->nij", rows, a, cols).reshape(n, gh * gw).to(attr.dtype)
    seg = torch.as_tensor(segments, device=a.device).long()
    if seg.dim() == 2:
        seg = seg.expand(n, h, w)
    if tuple(seg.shape) != (n, h, w):
        raise ValueError(f"segments must be [N, H, W] = {(n, h, w)} or [H, W], got {tuple(seg.shape)}")
    if seg.numel() and int(seg.min()) < 0:
        raise ValueError("segment labels must be >= 0")
    s = int(seg.max()) + 1 if seg.numel() else 0
    flat = seg.reshape(n, -1)
    out = a.new_zeros((n, s)).scatter_add_(1, flat, a.reshape(n, -1))
    present = a.new_zeros((n, s)).scatter_add_(1, flat, torch.ones_like(a.reshape(n, -1)))
    out[present == 0] = float("nan")
    return out.to(attr.dtype)


def superpixels(images: Tensor, n_segments: int = 16, *, compactness: float = 10.0) -> Tensor:
    """SLIC superpixel labels ``[N, H, W]`` (``0..S-1``) for images ``[N, C, H, W]`` in ``[0, 1]``.

    Needs scikit-image (optional): raises ImportError naming the fix when it is missing.
    Pass the *un-normalised* images; the labels then go to ``region_importance(segments=...)``.
    """
    try:
        from skimage.segmentation import slic
    except ImportError as e:
        raise ImportError("superpixels need scikit-image: pip install scikit-image "
                          "(or use a regular grid, e.g. --grid 4 4)") from e
    import numpy as np

    x = _check_x(images).detach().cpu().numpy()
    out = []
    for img in x:
        chan = img.shape[0]
        arr = img[0] if chan == 1 else np.moveaxis(img, 0, -1)
        lab = slic(arr, n_segments=int(n_segments), compactness=float(compactness), start_label=0,
                   channel_axis=None if chan == 1 else -1)
        # relabel to 0..S-1 in order of appearance so labels are dense
        _, dense = np.unique(lab, return_inverse=True)
        out.append(dense.reshape(lab.shape))
    return torch.as_tensor(np.stack(out), dtype=torch.long)
