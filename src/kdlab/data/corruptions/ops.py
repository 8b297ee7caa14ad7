"""The corruptions, one registered function each (Hendrycks & Dietterich's CIFAR-10-C settings).

A corruption is ``fn(x, c, rngs, k) -> array``: ``x`` float64 ``[N, C, H, W]`` in ``[0, 1]`` (C = 1
or 3), ``c`` the parameter of the requested severity, ``rngs`` one numpy generator per image
(empty for a deterministic corruption), ``k = max(1, min(H, W) / 32)`` the pixel-length scale.
The result is clipped to ``[0, 1]`` by the caller (`kdlab.data.corruptions.suite.corrupt`).

Adding one is one function in one file::

    from kdlab.data.corruptions import register_corruption

    @register_corruption("invert", severities=(0.2, 0.4, 0.6, 0.8, 1.0),
                         description="blend with the negative")
    def invert(x, c, rngs, k):
        return (1 - c) * x + c * (1 - x)

``group``: ``"standard"`` (the 15 corruptions mCE averages), or ``"extra"`` (held out, reported
separately: the 4 CIFAR-10-C extras and, by default, your own); ``random=True`` when the function
draws from ``rngs``. The severities are the 5 parameters passed as ``c`` for severities 1..5.
"""

from __future__ import annotations

import io
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from kdlab.core.registry import Registry
from kdlab.data.corruptions.filters import (
    FROST_TINT,
    bilinear,
    box3,
    box_resize_matrix,
    canny,
    clipped_zoom,
    colour,
    correlate2d,
    disk_kernel,
    elastic_maps,
    equalize_hist,
    frost_texture,
    gaussian_filter,
    glass_shuffle,
    grey,
    hsv_to_rgb,
    motion_blur_batch,
    plasma_fractal,
    rgb_to_hsv,
)

GROUPS = ("standard", "extra")


class CorruptionRegistry(Registry):
    """`Registry` of corruption functions that also keeps the registration order."""

    def ordered(self, group: str | None = None) -> list[str]:
        """Names in registration order, optionally of one ``group``."""
        return [n for n, e in self._entries.items() if group is None or e.meta["group"] == group]

    def params_view(self) -> "SeverityParams":
        """A read-only mapping name -> the 5 severity parameters, following the registry."""
        return SeverityParams(self)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (KeyError with the closest names if unknown)."""
        self.entry(name)
        del self._entries[name]


class SeverityParams(Mapping):
    """name -> severity parameters (a tuple of 5) of every registered corruption, in order."""

    def __init__(self, registry: CorruptionRegistry):
        self.registry = registry

    def __getitem__(self, name: str) -> tuple:
        if name not in self.registry:
            raise KeyError(name)
        return self.registry.entry(name).meta["severities"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.registry.ordered())

    def __len__(self) -> int:
        return len(self.registry.ordered())

    def __repr__(self) -> str:
        return f"SeverityParams({dict(self)!r})"


CORRUPTION_REGISTRY = CorruptionRegistry("corruption")


def register_corruption(name: str, *, severities: Sequence, group: str = "extra",
                        random: bool = False, description: str = "",
                        reference: str = "") -> Callable:
    """Decorator: register ``fn(x, c, rngs, k) -> array`` as corruption ``name``.

    ``severities``: the 5 parameters ``c`` of severities 1..5; ``group``: ``"standard"`` (counted
    in mCE / mCA / relative mCE) or ``"extra"`` (reported separately); ``random``: the function
    draws from ``rngs`` (one seeded generator per image).
    """
    sev = tuple(severities)
    if len(sev) != 5:
        raise ValueError(f"corruption {name!r}: give 5 severity parameters, got {len(sev)}")
    if group not in GROUPS:
        raise ValueError(f"corruption {name!r}: group must be one of {GROUPS}, got {group!r}")
    if not name or name != name.strip().lower().replace("-", "_"):
        raise ValueError(f"corruption name {name!r} must be lower case with underscores")
    return CORRUPTION_REGISTRY.register(name, description=description, reference=reference,
                                        severities=sev, group=group, random=bool(random))


@register_corruption("gaussian_noise", group="standard", random=True,
                     severities=(0.04, 0.06, 0.08, 0.09, 0.10),
                     description="x + N(0, sigma); sigma per severity")
def gaussian_noise(x, c, rngs, k):
    """x + N(0, c) per value."""
    noise = np.stack([r.normal(0.0, c, size=x.shape[1:]) for r in rngs])
    return x + noise


@register_corruption("shot_noise", group="standard", random=True,
                     severities=(500, 250, 100, 75, 50),
                     description="Poisson(x * lam) / lam; photons per unit lam")
def shot_noise(x, c, rngs, k):
    """Poisson(x * c) / c."""
    return np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]) / c


@register_corruption("impulse_noise", group="standard", random=True,
                     severities=(0.01, 0.02, 0.03, 0.05, 0.07),
                     description="salt & pepper on a fraction of the values")
def impulse_noise(x, c, rngs, k):
    """A fraction c of the values set to 0 or 1 (half each), per channel."""
    out = x.copy()
    for i, r in enumerate(rngs):
        flipped = r.random(x.shape[1:]) < c
        salted = r.random(x.shape[1:]) < 0.5
        out[i][flipped & salted] = 1.0
        out[i][flipped & ~salted] = 0.0
    return out


@register_corruption("defocus_blur", group="standard", random=False,
                     severities=((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
                     description="aliased disk (radius, alias sigma), reflect-101 borders")
def defocus_blur(x, c, rngs, k):
    """Correlate with `disk_kernel(c0 k, c1 k)` (cv2.filter2D, reflect-101 borders)."""
    return correlate2d(x, disk_kernel(c[0] * k, c[1] * k), "reflect101")


@register_corruption("glass_blur", group="standard", random=True,
                     severities=((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
                     description="Gaussian, 8-bit, local pixel shuffle (sigma, max delta, passes), Gaussian")
def glass_blur(x, c, rngs, k):
    """Gaussian(sigma), 8-bit floor, `glass_shuffle` c2 times, Gaussian(sigma)."""
    sigma, d, iters = c[0] * k, max(1, int(round(c[1] * k))), c[2]
    n, _, h, w = x.shape
    x = gaussian_filter(x, sigma)
    x = np.floor(np.clip(x, 0, 1) * 255 + 1e-6) / 255  # np.uint8(... * 255) in the reference
    p, q = max(h - 2 * d, 0), max(w - 2 * d, 0)
    offsets = np.stack([r.integers(-d, d, size=(iters, p, q, 2)) for r in rngs])
    for it in range(iters):
        x = glass_shuffle(x, offsets[:, it], d)
    return gaussian_filter(x, sigma)


@register_corruption("motion_blur", group="standard", random=True,
                     severities=((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
                     description="ImageMagick motion blur (radius, sigma) at an angle in [-45, 45] deg")
def motion_blur(x, c, rngs, k):
    """`motion_blur_batch` with radius c0 k, sigma c1 k, angle ~ U(-45, 45) degrees."""
    angles = [r.uniform(-45, 45) for r in rngs]
    return motion_blur_batch(x, c[0] * k, c[1] * k, angles)


@register_corruption("zoom_blur", group="standard", random=False,
                     severities=tuple(np.arange(1, hi, 0.01) for hi in (1.06, 1.11, 1.16, 1.21, 1.26)),
                     description="mean of the image and its clipped zooms (scipy.ndimage.zoom + top-left trim)")
def zoom_blur(x, c, rngs, k):
    """(x + sum_z clipped_zoom(x, z)) / (len(c) + 1) over the zoom factors z in c."""
    out = x.copy()
    for z in c:
        out += clipped_zoom(x, z)
    return out / (len(c) + 1)


@register_corruption("snow", group="standard", random=True,
                     severities=((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
               (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
               (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
                     description="zoomed, thresholded, motion-blurred flake layer on a brightened image")
def snow(x, c, rngs, k):
    """Flakes N(c0, c1), `clipped_zoom` by c2, cut below c3, motion-blurred (c4 k, c5 k, angle ~ U(-135, -45)); x -> c6 x + (1 - c6) max(x, 1.5 grey(x) + 0.5), plus the layer and the layer turned by 180 degrees."""
    n, ch, h, w = x.shape
    layer = np.stack([r.normal(c[0], c[1], size=(h, w)) for r in rngs])
    layer = clipped_zoom(layer, c[2])
    layer[layer < c[3]] = 0
    layer = np.clip(layer, 0, 1)[:, None]
    angles = [r.uniform(-135, -45) for r in rngs]
    layer = motion_blur_batch(layer, c[4] * k, c[5] * k, angles)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, grey(x) * 1.5 + 0.5)
    return x + layer + layer[:, :, ::-1, ::-1]


@register_corruption("frost", group="standard", random=True,
                     severities=((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
                     description="c0 x + c1 frost texture (procedural)")
def frost(x, c, rngs, k):
    """c0 x + c1 `frost_texture` (tinted `FROST_TINT`)."""
    n, ch, h, w = x.shape
    tex = np.stack([frost_texture(r, h, w, k) for r in rngs])[:, None]
    return c[0] * x + c[1] * tex * colour(FROST_TINT, ch)


@register_corruption("fog", group="standard", random=True,
                     severities=((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
                     description="(x + c plasma fractal) max(x) / (max(x) + c); wibble decay d")
def fog(x, c, rngs, k):
    """(x + c0 plasma) max(x) / (max(x) + c0), plasma = `plasma_fractal` with wibble decay c1."""
    n, ch, h, w = x.shape
    mapsize = max(2, 1 << (max(h, w) - 1).bit_length())
    maps = np.stack([plasma_fractal(r, mapsize, c[1])[:h, :w] for r in rngs])[:, None]
    max_val = x.reshape(n, -1).max(axis=1).reshape(n, 1, 1, 1)
    return (x + c[0] * maps) * max_val / (max_val + c[0])


@register_corruption("brightness", group="standard", random=False,
                     severities=(0.05, 0.1, 0.15, 0.2, 0.3),
                     description="V + c in HSV")
def brightness(x, c, rngs, k):
    """V + c in HSV (grey images: g + c)."""
    if x.shape[1] == 1:  # grey: R = G = B, so V is the grey value and S = 0
        return x + c
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = np.clip(hsv[:, 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


@register_corruption("contrast", group="standard", random=False,
                     severities=(0.75, 0.5, 0.4, 0.3, 0.15),
                     description="(x - mean) c + mean, per channel")
def contrast(x, c, rngs, k):
    """(x - mean) c + mean, mean per image and channel."""
    m = x.mean(axis=(2, 3), keepdims=True)
    return (x - m) * c + m


@register_corruption("elastic_transform", group="standard", random=True,
                     severities=((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
               (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
                     description="random affine, then a smooth displacement field (alpha, sigma, affine as fractions of the size)")
def elastic_transform(x, c, rngs, k):
    """Random affine (reflect-101), then a smooth displacement field (reflect), see `elastic_maps`."""
    n, ch, h, w = x.shape
    maps = [np.stack(m) for m in zip(*(elastic_maps(r, h, w, c) for r in rngs))]
    x = bilinear(x, maps[0], maps[1], "reflect101")
    return bilinear(x, maps[2], maps[3], "reflect")


@register_corruption("pixelate", group="standard", random=False,
                     severities=(0.95, 0.9, 0.85, 0.75, 0.65),
                     description="Pillow BOX resize down to floor(size f) and back")
def pixelate(x, c, rngs, k):
    """Pillow BOX resample to floor(H c) x floor(W c) and back to H x W (as matrices)."""
    h, w = x.shape[-2:]
    h2, w2 = max(1, int(h * c)), max(1, int(w * c))
    ph = box_resize_matrix(h2, h) @ box_resize_matrix(h, h2)
    pw = box_resize_matrix(w2, w) @ box_resize_matrix(w, w2)
    return ph @ x @ pw.T


@register_corruption("jpeg_compression", group="standard", random=False,
                     severities=(80, 65, 58, 50, 40),
                     description="Pillow JPEG at quality q")
def jpeg_compression(x, c, rngs, k):
    """Pillow JPEG encode + decode at quality c (mode L for grey images)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is installed with matplotlib
        raise ImportError("jpeg_compression needs Pillow: pip install pillow") from None
    u8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    out = np.empty_like(x)
    for i, img in enumerate(u8):
        pil = Image.fromarray(img[0], mode="L") if img.shape[0] == 1 else \
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), mode="RGB")
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=int(c))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert(pil.mode), dtype=np.float64) / 255
        out[i] = dec[None] if dec.ndim == 2 else dec.transpose(2, 0, 1)
    return out


@register_corruption("speckle_noise", group="extra", random=True,
                     severities=(0.06, 0.1, 0.12, 0.16, 0.2),
                     description="x + x N(0, sigma)")
def speckle_noise(x, c, rngs, k):
    """x + x N(0, c)."""
    noise = np.stack([r.normal(0.0, c, size=x.shape[1:]) for r in rngs])
    return x + x * noise


@register_corruption("gaussian_blur", group="extra", random=False,
                     severities=(0.4, 0.6, 0.7, 0.8, 1),
                     description="Gaussian of sigma (nearest borders)")
def gaussian_blur(x, c, rngs, k):
    """Gaussian of sigma c k (skimage default borders: nearest)."""
    return gaussian_filter(x, c * k)


@register_corruption("spatter", group="extra", random=True,
                     severities=((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
               (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
               (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
                     description="water drops (severities 1-3) or mud (4-5)")
def spatter(x, c, rngs, k):
    """Water drops (c5 = 0) shaded by the distance to their edges, or mud blobs (c5 = 1)."""
    from scipy import ndimage

    n, ch, h, w = x.shape
    liquid = np.stack([r.normal(c[0], c[1], size=(h, w)) for r in rngs])
    liquid = gaussian_filter(liquid, c[2] * k)
    liquid[liquid < c[3]] = 0
    if c[5] == 0:  # water drops, shaded by the distance to their edges
        lq = np.clip(liquid * 255, 0, 255).astype(np.uint8)
        free = ~canny(lq)
        if free.all():
            dist = np.full((n, h, w), 20.0)
        else:  # distance to the nearest edge of the same image (other images are >= 100 away)
            dist = np.minimum(ndimage.distance_transform_edt(free, sampling=(100.0, 1.0, 1.0)), 20)
        dist = box3(dist).astype(np.uint8)
        dist = np.stack([equalize_hist(d) for d in dist]).astype(np.float64)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        dist = np.clip(np.round(correlate2d(dist, ker, "reflect101")), 0, 255)
        dist = np.round(box3(dist))
        m = lq.astype(np.float64) * dist
        top = m.reshape(n, -1).max(axis=1).reshape(n, 1, 1)
        m = np.where(top > 0, m / np.where(top > 0, top, 1.0) * c[4], 0.0)
        return x + m[:, None] * colour((175 / 255, 238 / 255, 238 / 255), ch)
    # mud
    m = gaussian_filter((liquid > c[3]).astype(np.float64), c[4] * k)
    m[m < 0.8] = 0
    m = m[:, None]
    return x * (1 - m) + colour((63 / 255, 42 / 255, 20 / 255), ch) * m


@register_corruption("saturate", group="extra", random=False,
                     severities=((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
                     description="S c0 + c1 in HSV")
def saturate(x, c, rngs, k):
    """S c0 + c1 in HSV (grey images: spread about the image mean, see docs)."""
    if x.shape[1] == 1:  # grey analogue: spread of the grey values about the image mean
        m = x.mean(axis=(2, 3), keepdims=True)
        d = x - m
        return m + d * c[0] + c[1] * np.sign(d)
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = np.clip(hsv[:, 1] * c[0] + c[1], 0, 1)
    return hsv_to_rgb(hsv)
