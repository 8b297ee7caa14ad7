"""CIFAR-10-C style image corruptions, applied to batches of tensors on the fly.

The 15 standard corruptions of Hendrycks & Dietterich (ICLR 2019) plus their 4 extra ones, each
at 5 severities, with the CIFAR-10-C settings of ``make_cifar_c.py`` (hendrycks/robustness,
``ImageNet-C/create_c/make_cifar_c.py``) -- not the ImageNet-C ones. Everything is written with
numpy / scipy / torch (no OpenCV, ImageMagick or torchvision); JPEG uses Pillow.

- ``corrupt(x, name, severity, seed, index=None)``: ``x`` is ``[N, C, H, W]`` in ``[0, 1]``
  (before normalisation), C in {1, 3}; returns a tensor of the same shape, dtype and device.
  Image ``i`` gets its own random draws, from a generator seeded by
  ``(seed, name, severity, index[i])`` (``index`` defaults to ``0..N-1``; pass the images'
  positions in the data set so that a corrupted set does not depend on the batch size).
- ``CorruptedSet(tset, name, severity, seed)``: a `TensorSet` corrupted on the fly, in batches.
- ``load_cifar10c(folder, corruption, severity)``: the published CIFAR-10-C ``.npy`` files.

Image sizes other than 32x32 (see docs/robustness.md): constants defined as fractions of the
image (elastic, fog map, zoom factors, pixelate factor) follow the actual size; pixel-length
constants (blur sigmas and radii, glass shuffle distance, motion streaks, spatter blobs, frost
needles) are multiplied by ``max(1, size / 32)`` -- they grow on larger images and are never
shrunk below the CIFAR pixel scale, where a 0.4-pixel blur would vanish.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from kdlab.data.splits import TensorSet

# ---------------------------------------------------------------------------------------------
# names and CIFAR-10-C settings

STANDARD_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS: tuple[str, ...] = STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

#: CIFAR-10-C parameters per severity 1..5, copied from make_cifar_c.py (x in [0, 1]).
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                 # noise std
    "shot_noise": (500, 250, 100, 75, 50),                             # photons per unit
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                   # salt & pepper amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),      # radius, sigma
    "zoom_blur": tuple(np.arange(1, hi, 0.01) for hi in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),        # strength, wibbledecay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                           # added to V (HSV)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (alpha, sigma, affine) as fractions of the image size (IMSIZE * ...)
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),    # S * c0 + c1 (HSV)
}

#: corruptions that draw random numbers (the others are deterministic functions of the image)
RANDOM_CORRUPTIONS: frozenset[str] = frozenset({
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
    "motion_blur", "snow", "frost", "fog", "elastic_transform", "spatter",
})

_ALIASES = {"jpeg": "jpeg_compression", "elastic": "elastic_transform"}

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as cv2.COLOR_RGB2GRAY


def parse_corruptions(spec: str | Sequence[str] | None) -> list[str]:
    """Corruption names from ``"all"`` (default), ``"standard"``, ``"extra"``, or names.

    Names may be given as a list and/or comma separated; ``jpeg`` and ``elastic`` are accepted
    for ``jpeg_compression`` / ``elastic_transform``. Order and duplicates follow the input.
    """
    if spec is None:
        return list(CORRUPTIONS)
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip().lower().replace("-", "_")
            if not part:
                continue
            if part == "all":
                out += list(CORRUPTIONS)
            elif part == "standard":
                out += list(STANDARD_CORRUPTIONS)
            elif part == "extra":
                out += list(EXTRA_CORRUPTIONS)
            else:
                part = _ALIASES.get(part, part)
                if part not in PARAMS:
                    raise ValueError(f"unknown corruption {part!r}; choose from all, standard, "
                                     f"extra or: {', '.join(CORRUPTIONS)}")
                out.append(part)
    seen: set[str] = set()
    return [c for c in out if not (c in seen or seen.add(c))]


def _canonical(name) -> str:
    key = str(name).strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def check_severity(severity) -> int:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    return int(severity)


# ---------------------------------------------------------------------------------------------
# seeding


def image_rngs(seed: int, name: str, severity: int, index) -> list[np.random.Generator]:
    """One numpy generator per image, seeded by ``(seed, name, severity, index[i])``."""
    name_id = zlib.crc32(name.encode())
    base = [int(seed) % (1 << 63), name_id, int(severity)]
    return [np.random.default_rng(base + [int(i) % (1 << 63)]) for i in index]


# ---------------------------------------------------------------------------------------------
# array helpers (x is a float64 numpy array [N, C, H, W] unless noted)


def _border_index(idx: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map (possibly out-of-range) integer indices into ``0..n-1``.

    ``nearest``: edge replicate (a a | a b c | c c); ``reflect101``: OpenCV's default border
    (c b | a b c | b a); ``reflect``: half-sample symmetric, scipy's ``reflect``
    (b a | a b c | c b).
    """
    idx = np.asarray(idx)
    if mode == "nearest" or n == 1:
        return np.clip(idx, 0, n - 1)
    if mode == "reflect101":
        p = 2 * (n - 1)
        i = np.mod(idx, p)
        return np.where(i >= n, p - i, i)
    if mode == "reflect":
        p = 2 * n
        i = np.mod(idx, p)
        return np.where(i >= n, p - 1 - i, i)
    raise ValueError(f"unknown border mode {mode!r}")


def _correlate1d(x: np.ndarray, w: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """Correlate along ``axis`` with the odd-length weights ``w`` (centre tap in the middle)."""
    r = len(w) // 2
    if r == 0:
        return x * w[0]
    n = x.shape[axis]
    src = _border_index(np.arange(-r, n + r), n, mode)
    xp = np.take(x, src, axis=axis)
    out = np.zeros_like(x)
    for j, wj in enumerate(w):
        if wj != 0:
            sl = [slice(None)] * x.ndim
            sl[axis] = slice(j, j + n)
            out += wj * xp[tuple(sl)]
    return out


def _correlate2d(x: np.ndarray, k: np.ndarray, mode: str) -> np.ndarray:
    """Correlate the last two axes with the 2-D kernel ``k`` (odd sizes, anchor at the centre)."""
    rh, rw = k.shape[0] // 2, k.shape[1] // 2
    h, w = x.shape[-2:]
    rows = _border_index(np.arange(-rh, h + rh), h, mode)
    cols = _border_index(np.arange(-rw, w + rw), w, mode)
    xp = x[..., rows, :][..., cols]
    out = np.zeros_like(x)
    for a in range(k.shape[0]):
        for b in range(k.shape[1]):
            if k[a, b] != 0:
                out += k[a, b] * xp[..., a:a + h, b:b + w]
    return out


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's sampled Gaussian: radius ``int(truncate * sigma + 0.5)``, sums to 1."""
    if sigma <= 0:
        return np.ones(1)
    r = int(truncate * float(sigma) + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def gaussian_filter(x: np.ndarray, sigma: float, mode: str = "nearest",
                    truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur of the last two axes (skimage.filters.gaussian: mode ``nearest``)."""
    w = gaussian_kernel1d(sigma, truncate)
    return _correlate1d(_correlate1d(x, w, x.ndim - 2, mode), w, x.ndim - 1, mode)


def _bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Sample ``x [N, C, H, W]`` at real ``rows, cols [N, H', W']`` (bilinear, border ``mode``)."""
    n, _, h, w = x.shape
    r0 = np.floor(rows)
    c0 = np.floor(cols)
    fr = (rows - r0)[:, None]
    fc = (cols - c0)[:, None]
    r0 = r0.astype(np.int64)
    c0 = c0.astype(np.int64)
    ra, rb = _border_index(r0, h, mode), _border_index(r0 + 1, h, mode)
    ca, cb = _border_index(c0, w, mode), _border_index(c0 + 1, w, mode)
    nn_ = np.arange(n)[:, None, None]

    def at(r, c):  # -> [N, C, H', W']
        return np.moveaxis(x[nn_, :, r, c], -1, 1)

    return ((1 - fr) * ((1 - fc) * at(ra, ca) + fc * at(ra, cb))
            + fr * ((1 - fc) * at(rb, ca) + fc * at(rb, cb)))


def zoom_matrix(n: int, z: float) -> np.ndarray:
    """``[n, n]`` matrix of a centre-anchored zoom by ``z`` (>= 1) with linear interpolation:
    output pixel ``i`` samples the input at ``(i - (n-1)/2) / z + (n-1)/2``."""
    m = np.zeros((n, n))
    c = (n - 1) / 2.0
    s = (np.arange(n) - c) / float(z) + c
    i0 = np.clip(np.floor(s).astype(np.int64), 0, n - 1)
    f = s - i0
    i1 = np.minimum(i0 + 1, n - 1)
    np.add.at(m, (np.arange(n), i0), 1 - f)
    np.add.at(m, (np.arange(n), i1), f)
    return m


def box_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of Pillow's BOX resampling along one axis (Resample.c:
    ``precompute_coeffs`` with the box filter, support 0.5)."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    m = np.zeros((n_out, n_in))
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        for j in range(xmin, xmax):
            t = (j - center + 0.5) / fscale
            m[xx, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        tot = m[xx].sum()
        if tot:
            m[xx] /= tot
    return m


def _grey(x: np.ndarray) -> np.ndarray:
    """``[N, 1, H, W]`` luma of an RGB batch (the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def _colour(rgb: Sequence[float], channels: int) -> np.ndarray:
    """An RGB colour as a ``[1, C, 1, 1]`` array; its luma for 1-channel images."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if channels == 1:
        rgb = np.array([float(np.dot(LUMA, rgb))])
    return rgb.reshape(1, -1, 1, 1)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv on ``[N, 3, H, W]`` (H, S, V in [0, 1])."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.max(axis=1)
    delta = v - x.min(axis=1)
    safe = np.where(delta == 0, 1.0, delta)
    s = np.where(delta == 0, 0.0, delta / np.where(v == 0, 1.0, v))
    h = np.select([b == v, g == v], [4.0 + (r - g) / safe, 2.0 + (b - r) / safe], (g - b) / safe)
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, s, v], axis=1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb on ``[N, 3, H, W]``."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.astype(np.int64) % 6
    cases = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [np.select([hi == k for k in range(6)], [c[ch] for c in cases]) for ch in range(3)]
    return np.stack(out, axis=1)


def plasma_fractal(rng: np.random.Generator, mapsize: int = 32,
                   wibbledecay: float = 3) -> np.ndarray:
    """Diamond-square height map in [0, 1] (make_cifar_c.py's ``plasma_fractal``)."""
    assert mapsize & (mapsize - 1) == 0 and mapsize >= 2
    a = np.empty((mapsize, mapsize))
    a[0, 0] = 0
    step = mapsize
    wibble = 100.0

    def wibbled_mean(arr):
        return arr / 4 + wibble * rng.uniform(-wibble, wibble, arr.shape)

    while step >= 2:
        half = step // 2
        corners = a[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq = sq + np.roll(sq, -1, axis=1)
        a[half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = a[half:mapsize:step, half:mapsize:step]
        ul = a[0:mapsize:step, 0:mapsize:step]
        lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        a[0:mapsize:step, half:mapsize:step] = wibbled_mean(lt)
        tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        a[half:mapsize:step, 0:mapsize:step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    a -= a.min()
    return a / a.max()


def motion_kernel(radius: float, sigma: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage weights: ``2*ceil(radius)+1`` one-sided Gaussian taps
    ``exp(-i^2 / (2 sigma^2))``, i = 0.., normalised to sum 1."""
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i ** 2) / (2.0 * sigma * sigma))
    return k / k.sum()


def motion_blur_batch(x: np.ndarray, radius: float, sigma: float, angles_deg) -> np.ndarray:
    """ImageMagick-style motion blur, one angle per image.

    ``out(r, c) = sum_i k_i * x(r + round(i sin a), c + round(i cos a))`` with the
    `motion_kernel` weights ``k_i`` and edge-replicated borders (ImageMagick's default virtual
    pixels; rounding as ImageMagick: ``ceil(v - 0.5)``).
    """
    n, _, h, w = x.shape
    k = motion_kernel(radius, sigma)
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64)).reshape(n, 1)
    i = np.arange(len(k)).reshape(1, -1)
    off_c = np.ceil(i * np.cos(a) - 0.5).astype(np.int64)   # [N, taps]
    off_r = np.ceil(i * np.sin(a) - 0.5).astype(np.int64)
    nn_ = np.arange(n)[:, None, None]
    out = np.zeros_like(x)
    for t, kt in enumerate(k):
        rows = np.clip(np.arange(h)[None, :] + off_r[:, t:t + 1], 0, h - 1)[:, :, None]
        cols = np.clip(np.arange(w)[None, :] + off_c[:, t:t + 1], 0, w - 1)[:, None, :]
        out += kt * np.moveaxis(x[nn_, :, rows, cols], -1, 1)
    return out


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py's ``disk``: an aliased disk (sum 1) smoothed by a 3x3 (5x5 for radius > 8)
    Gaussian of sigma ``alias_blur``; zero borders trimmed."""
    if radius <= 8:
        grid = np.arange(-8, 8 + 1)
        ks = 3
    else:
        grid = np.arange(-radius, radius + 1)
        ks = 5
    xx, yy = np.meshgrid(grid, grid)
    d = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    d /= d.sum()
    t = np.arange(ks) - (ks - 1) / 2
    g = np.exp(-(t ** 2) / (2 * alias_blur ** 2))
    g /= g.sum()
    d = _correlate1d(_correlate1d(d, g, 0, "reflect101"), g, 1, "reflect101")
    nz = np.argwhere(np.abs(d) > 1e-15)
    c = d.shape[0] // 2
    r = int(np.abs(nz - c).max()) if len(nz) else 0
    return d[c - r:c + r + 1, c - r:c + r + 1]


# ---------------------------------------------------------------------------------------------
# the corruptions: fn(x [N,C,H,W] float64, c, rngs, k) -> array; k = max(1, size/32)


def _gaussian_noise(x, c, rngs, k):
    noise = np.stack([r.normal(0.0, c, size=x.shape[1:]) for r in rngs])
    return x + noise


def _shot_noise(x, c, rngs, k):
    return np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]) / c


def _impulse_noise(x, c, rngs, k):
    out = x.copy()
    for i, r in enumerate(rngs):
        flipped = r.random(x.shape[1:]) < c
        salted = r.random(x.shape[1:]) < 0.5
        out[i][flipped & salted] = 1.0
        out[i][flipped & ~salted] = 0.0
    return out


def _speckle_noise(x, c, rngs, k):
    noise = np.stack([r.normal(0.0, c, size=x.shape[1:]) for r in rngs])
    return x + x * noise


def _gaussian_blur(x, c, rngs, k):
    return gaussian_filter(x, c * k)


def glass_shuffle(x: np.ndarray, offsets: np.ndarray, d: int,
                  vectorized: bool | None = None) -> np.ndarray:
    """One pass of glass blur's local pixel shuffle.

    ``offsets [N, P, Q, 2]`` holds ``(dx, dy)`` in ``[-d, d)`` for the positions
    ``h = H-d .. d+1`` (P of them, descending) and ``w = W-d .. d+1`` (Q, descending).
    The reference visits them in that order and does ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``
    on numpy views of RGB pixels, which copies ``x[h', w']`` into ``x[h, w]`` and leaves
    ``x[h', w']`` as it was; this reproduces that. For ``d == 1`` every source precedes its
    target in the visiting order, so all copies read original values and run at once.
    """
    n, _, h, w = x.shape
    hs = np.arange(h - d, d, -1)
    ws = np.arange(w - d, d, -1)
    if len(hs) == 0 or len(ws) == 0:
        return x.copy()
    dx, dy = offsets[..., 0], offsets[..., 1]
    out = x.copy()
    nn_ = np.arange(n)
    if vectorized is None:
        vectorized = d == 1
    if vectorized:
        src_r = hs[None, :, None] + dy
        src_c = ws[None, None, :] + dx
        vals = np.moveaxis(x[nn_[:, None, None], :, src_r, src_c], -1, 1)  # [N, C, P, Q]
        out[:, :, hs[:, None], ws[None, :]] = vals
        return out
    for p, hh in enumerate(hs):
        for q, ww in enumerate(ws):
            out[nn_, :, hh, ww] = out[nn_, :, hh + dy[:, p, q], ww + dx[:, p, q]]
    return out


def _glass_blur(x, c, rngs, k):
    sigma, d, iters = c[0] * k, max(1, int(round(c[1] * k))), c[2]
    n, _, h, w = x.shape
    x = gaussian_filter(x, sigma)
    x = np.floor(np.clip(x, 0, 1) * 255 + 1e-6) / 255  # np.uint8(... * 255) in the reference
    p, q = max(h - 2 * d, 0), max(w - 2 * d, 0)
    offsets = np.stack([r.integers(-d, d, size=(iters, p, q, 2)) for r in rngs])
    for it in range(iters):
        x = glass_shuffle(x, offsets[:, it], d)
    return gaussian_filter(x, sigma)


def _defocus_blur(x, c, rngs, k):
    return _correlate2d(x, disk_kernel(c[0] * k, c[1] * k), "reflect101")


def _motion_blur(x, c, rngs, k):
    angles = [r.uniform(-45, 45) for r in rngs]
    return motion_blur_batch(x, c[0] * k, c[1] * k, angles)


def _zoom_blur(x, c, rngs, k):
    h, w = x.shape[-2:]
    out = x.copy()
    for z in c:
        out += zoom_matrix(h, z) @ x @ zoom_matrix(w, z).T
    return out / (len(c) + 1)


def _snow(x, c, rngs, k):
    n, ch, h, w = x.shape
    layer = np.stack([r.normal(c[0], c[1], size=(h, w)) for r in rngs])
    layer = zoom_matrix(h, c[2]) @ layer @ zoom_matrix(w, c[2]).T
    layer[layer < c[3]] = 0
    layer = np.clip(layer, 0, 1)[:, None]
    angles = [r.uniform(-135, -45) for r in rngs]
    layer = motion_blur_batch(layer, c[4] * k, c[5] * k, angles)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + layer + layer[:, :, ::-1, ::-1]


#: RGB tint of the procedural frost texture (bluish white, like the frost photographs)
FROST_TINT = (0.82, 0.92, 1.0)


def frost_texture(rng: np.random.Generator, h: int, w: int, k: float = 1.0) -> np.ndarray:
    """A procedural frost texture ``[h, w]`` in [0, 1] (stands in for the frost photographs).

    A multi-octave haze (smoothed Gaussian noise at scales 4k, 2k and k pixels) plus ice
    needles: about one seed per 40 k^2 pixels, each a straight needle through a random point
    at a random angle, 6k..20k pixels long in all, with side branches at +-60 degrees
    (hexagonal ice) every ~2k pixels, drawn with random brightness and softened by a
    0.5k-pixel Gaussian. Mean about 0.55, standard deviation about 0.2.
    """
    haze = np.zeros((h, w))
    for scale, amp in ((4.0, 1.0), (2.0, 0.5), (1.0, 0.25)):
        layer = gaussian_filter(rng.normal(size=(h, w)), scale * k, mode="reflect")
        haze += amp * layer / (layer.std() + 1e-12)
    haze = (haze - haze.min()) / (np.ptp(haze) + 1e-12)

    n = max(2, int(round(h * w / (40.0 * k * k))))
    y0, x0 = rng.uniform(0, h, n), rng.uniform(0, w, n)
    ang = rng.uniform(0, np.pi, n)
    length = rng.uniform(3, 10, n) * k
    bright = rng.uniform(0.5, 1.0, n)
    nb = 5
    tb = np.arange(1, nb + 1)[None, :] * 2 * k * rng.uniform(0.7, 1.0, (n, nb))  # [n, nb]
    segs = [(y0, x0, ang, length, bright), (y0, x0, ang + np.pi, length, bright)]
    for direction in (0.0, np.pi):
        by = y0[:, None] + np.sin(ang + direction)[:, None] * tb
        bx = x0[:, None] + np.cos(ang + direction)[:, None] * tb
        blen = np.where(tb < length[:, None], (length[:, None] - tb) * 0.45, 0.0)
        for side in (np.pi / 3, -np.pi / 3):
            segs.append((by.ravel(), bx.ravel(), np.repeat(ang + direction + side, nb),
                         blen.ravel(), np.repeat(bright * 0.8, nb)))
    sy, sx, sa, sl, sb = (np.concatenate(parts) for parts in zip(*segs))
    t = np.arange(0, float(sl.max()) + 0.5, 0.5)[None, :]
    rr = np.round(sy[:, None] + np.sin(sa)[:, None] * t).astype(np.int64)
    cc = np.round(sx[:, None] + np.cos(sa)[:, None] * t).astype(np.int64)
    ok = (t < sl[:, None]) & (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    vals = np.broadcast_to(sb[:, None], ok.shape)[ok]
    flat = np.zeros(h * w)
    np.maximum.at(flat, rr[ok] * w + cc[ok], vals)
    needles = gaussian_filter(flat.reshape(h, w), 0.5 * k, mode="reflect")
    needles = needles / (needles.max() + 1e-12)
    return np.clip(0.2 + 0.3 * haze + 0.6 * needles, 0, 1)


def _frost(x, c, rngs, k):
    n, ch, h, w = x.shape
    tex = np.stack([frost_texture(r, h, w, k) for r in rngs])[:, None]
    return c[0] * x + c[1] * tex * _colour(FROST_TINT, ch)


def _fog(x, c, rngs, k):
    n, ch, h, w = x.shape
    mapsize = max(2, 1 << (max(h, w) - 1).bit_length())
    maps = np.stack([plasma_fractal(r, mapsize, c[1])[:h, :w] for r in rngs])[:, None]
    max_val = x.reshape(n, -1).max(axis=1).reshape(n, 1, 1, 1)
    return (x + c[0] * maps) * max_val / (max_val + c[0])


def _brightness(x, c, rngs, k):
    if x.shape[1] == 1:  # grey: R = G = B, so V is the grey value and S = 0
        return x + c
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = np.clip(hsv[:, 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


def _saturate(x, c, rngs, k):
    if x.shape[1] == 1:  # grey analogue: spread of the grey values about the image mean
        m = x.mean(axis=(2, 3), keepdims=True)
        d = x - m
        return m + d * c[0] + c[1] * np.sign(d)
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = np.clip(hsv[:, 1] * c[0] + c[1], 0, 1)
    return hsv_to_rgb(hsv)


def _contrast(x, c, rngs, k):
    m = x.mean(axis=(2, 3), keepdims=True)
    return (x - m) * c + m


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M with ``dst = M @ [src; 1]`` for 3 point pairs (cv2.getAffineTransform)."""
    a = np.concatenate([src, np.ones((3, 1))], axis=1)
    return np.linalg.solve(a, dst).T


def elastic_maps(rng: np.random.Generator, h: int, w: int, c) -> tuple[np.ndarray, ...]:
    """Sampling positions of one elastic transform: ``(rows_a, cols_a, rows_e, cols_e)``,
    each ``[h, w]``. Step 1 (random affine) samples the image at ``(rows_a, cols_a)``; step 2
    (elastic) samples step 1's result at ``(rows_e, cols_e)``. ``c`` holds (alpha, sigma,
    affine) as fractions of the image size."""
    size = min(h, w)
    alpha, sigma, aff = c[0] * size, c[1] * size, c[2] * size
    cx, cy = float(w // 2), float(h // 2)
    sq = size // 3
    pts1 = np.array([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]])
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    pts2 = pts1 + rng.uniform(-aff, aff, size=(3, 2))
    m = np.vstack([affine_from_points(pts1, pts2), [0, 0, 1]])
    inv = np.linalg.inv(m)  # warpAffine samples the source at M^-1 (x, y)
    cols_a = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    rows_a = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    dx = gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    return rows_a, cols_a, yy + dy, xx + dx


def _elastic_transform(x, c, rngs, k):
    n, ch, h, w = x.shape
    maps = [np.stack(m) for m in zip(*(elastic_maps(r, h, w, c) for r in rngs))]
    x = _bilinear(x, maps[0], maps[1], "reflect101")
    return _bilinear(x, maps[2], maps[3], "reflect")


def _pixelate(x, c, rngs, k):
    h, w = x.shape[-2:]
    h2, w2 = max(1, int(h * c)), max(1, int(w * c))
    ph = box_resize_matrix(h2, h) @ box_resize_matrix(h, h2)
    pw = box_resize_matrix(w2, w) @ box_resize_matrix(w, w2)
    return ph @ x @ pw.T


def _jpeg_compression(x, c, rngs, k):
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


def canny(img: np.ndarray, low: float = 50, high: float = 150) -> np.ndarray:
    """Edges of uint8 images ``[..., H, W]`` like cv2.Canny(img, low, high): 3x3 Sobel
    (replicated border), L1 magnitude, non-maximum suppression in 4 directions, hysteresis
    with 8-connected components (per image)."""
    from scipy import ndimage

    f = img.astype(np.float64)
    d, s = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    ax_r, ax_c = f.ndim - 2, f.ndim - 1
    gx = _correlate1d(_correlate1d(f, d, ax_c, "nearest"), s, ax_r, "nearest")
    gy = _correlate1d(_correlate1d(f, d, ax_r, "nearest"), s, ax_c, "nearest")
    mag = np.abs(gx) + np.abs(gy)
    h, w = mag.shape[-2:]
    pad = [(0, 0)] * (f.ndim - 2) + [(1, 1), (1, 1)]
    mp = np.pad(mag, pad)

    def nb(dr, dc):
        return mp[..., 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]

    ax, ay = np.abs(gx), np.abs(gy)
    horiz = ay < ax * math.tan(math.pi / 8)
    vert = ay > ax * math.tan(3 * math.pi / 8)
    same_sign = np.sign(gx) * np.sign(gy) >= 0
    keep_h = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    keep_v = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    keep_d = np.where(same_sign, (mag > nb(-1, -1)) & (mag > nb(1, 1)),
                      (mag > nb(-1, 1)) & (mag > nb(1, -1)))
    keep = np.where(horiz, keep_h, np.where(vert, keep_v, keep_d)) & (mag > low)
    strong = keep & (mag > high)
    structure = np.zeros((3,) * f.ndim, dtype=bool)
    structure[(1,) * (f.ndim - 2)] = True  # 8-connected within an image, never across images
    labels, _ = ndimage.label(keep, structure=structure)
    good = np.unique(labels[strong])
    return np.isin(labels, good[good > 0])


def _equalize_hist(img: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist on a uint8 image."""
    hist = np.bincount(img.ravel(), minlength=256)
    total = img.size
    first = int(np.flatnonzero(hist)[0])
    if hist[first] == total:
        return np.full_like(img, first)
    scale = 255.0 / (total - hist[first])
    lut = np.zeros(256)
    lut[first + 1:] = np.cumsum(hist[first + 1:]) * scale
    lut = np.clip(np.round(lut), 0, 255).astype(np.uint8)
    return lut[img]


def _box3(a: np.ndarray) -> np.ndarray:
    """cv2.blur(a, (3, 3)) on the last two axes (3x3 mean, reflect-101 border)."""
    w = np.full(3, 1 / 3)
    return _correlate1d(_correlate1d(a, w, a.ndim - 2, "reflect101"), w, a.ndim - 1, "reflect101")


def _spatter(x, c, rngs, k):
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
        dist = _box3(dist).astype(np.uint8)
        dist = np.stack([_equalize_hist(d) for d in dist]).astype(np.float64)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        dist = np.clip(np.round(_correlate2d(dist, ker, "reflect101")), 0, 255)
        dist = np.round(_box3(dist))
        m = lq.astype(np.float64) * dist
        top = m.reshape(n, -1).max(axis=1).reshape(n, 1, 1)
        m = np.where(top > 0, m / np.where(top > 0, top, 1.0) * c[4], 0.0)
        return x + m[:, None] * _colour((175 / 255, 238 / 255, 238 / 255), ch)
    # mud
    m = gaussian_filter((liquid > c[3]).astype(np.float64), c[4] * k)
    m[m < 0.8] = 0
    m = m[:, None]
    return x * (1 - m) + _colour((63 / 255, 42 / 255, 20 / 255), ch) * m


_FUNCS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise, "defocus_blur": _defocus_blur, "glass_blur": _glass_blur,
    "motion_blur": _motion_blur, "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost,
    "fog": _fog, "brightness": _brightness, "contrast": _contrast,
    "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression, "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur, "spatter": _spatter, "saturate": _saturate,
}
assert tuple(_FUNCS) == tuple(PARAMS) and set(_FUNCS) == set(CORRUPTIONS)


# ---------------------------------------------------------------------------------------------
# public API


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, *,
            index=None) -> torch.Tensor:
    """Corrupt a batch ``x [N, C, H, W]`` in ``[0, 1]`` (C = 1 or 3) with CIFAR-10-C settings.

    Deterministic for ``(name, severity, seed)``: image ``i`` draws its random numbers from a
    generator seeded by ``(seed, name, severity, index[i])``; ``index`` (default ``0..N-1``)
    should be the images' positions in their data set. Returns ``x``'s dtype and device,
    clipped to ``[0, 1]``.
    """
    name = _canonical(name)
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; choose from: {', '.join(CORRUPTIONS)}")
    severity = check_severity(severity)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("corrupt() needs a float tensor [N, C, H, W] with values in [0, 1]")
    n, ch, h, w = x.shape
    if ch not in (1, 3):
        raise ValueError(f"corruptions work on 1- or 3-channel images, got {ch} channels")
    index = np.arange(n) if index is None else np.asarray(
        index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
    if len(index) != n:
        raise ValueError(f"index has {len(index)} entries for a batch of {n} images")
    if n == 0:
        return x.clone()
    rngs = image_rngs(seed, name, severity, index) if name in RANDOM_CORRUPTIONS else []
    k = max(1.0, min(h, w) / 32.0)
    arr = x.detach().to("cpu", torch.float64).numpy()
    out = _FUNCS[name](arr, PARAMS[name][severity - 1], rngs, k)
    out = np.clip(out, 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)


class CorruptedSet:
    """A `TensorSet` corrupted on the fly: ``batches(batch_size)`` yields ``(x, y)`` with ``x``
    in ``[0, 1]`` (not normalised). Image ``i`` of the set is corrupted with ``index=i``, so the
    result does not depend on the batch size."""

    def __init__(self, base: TensorSet, name: str, severity: int, seed: int = 0):
        self.base = base
        self.name = _canonical(name)
        if self.name not in PARAMS:
            raise ValueError(f"unknown corruption {name!r}; choose from: {', '.join(CORRUPTIONS)}")
        self.severity = check_severity(severity)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return (f"CorruptedSet({self.name}, severity={self.severity}, seed={self.seed}, "
                f"n={len(self)})")

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        stop = min(stop, len(self))
        x = corrupt(self.base.x[start:stop], self.name, self.severity, self.seed,
                    index=np.arange(start, stop))
        return x, self.base.y[start:stop]

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.batch(start, start + batch_size)

    def materialize(self, batch_size: int = 512) -> TensorSet:
        """The whole corrupted set as a `TensorSet`."""
        xs = [xb for xb, _ in self.batches(batch_size)]
        x = torch.cat(xs) if xs else self.base.x[:0].clone()
        return TensorSet(x, self.base.y.clone())


def corrupted_batches(tset: TensorSet, name: str, severity: int, seed: int = 0,
                      batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Generator form of `CorruptedSet`: ``(x_corrupted, y)`` batches of ``tset``."""
    return CorruptedSet(tset, name, severity, seed).batches(batch_size)


# ---------------------------------------------------------------------------------------------
# published CIFAR-10-C / CIFAR-100-C files

CIFAR10C_URL = "https://zenodo.org/record/2535967"
CIFAR100C_URL = "https://zenodo.org/record/3555552"


def load_cifar10c(folder, corruption: str, severity: int) -> TensorSet:
    """One corruption x severity of the published CIFAR-10-C (or CIFAR-100-C) arrays.

    ``folder`` holds ``<corruption>.npy`` (``[50000, 32, 32, 3]`` uint8: the 10000 test images
    at severity 1, then 2, .. 5) and ``labels.npy``. Returns the ``severity`` block as a
    `TensorSet` (``x`` float ``[10000, 3, 32, 32]`` in [0, 1]).
    """
    name = _canonical(corruption)
    if name not in PARAMS:
        raise ValueError(
            f"unknown corruption {corruption!r}; choose from: {', '.join(CORRUPTIONS)}")
    severity = check_severity(severity)
    folder = Path(folder)
    path, lpath = folder / f"{name}.npy", folder / "labels.npy"
    for p in (path, lpath):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: download CIFAR-10-C.tar from {CIFAR10C_URL} (CIFAR-100-C: "
                f"{CIFAR100C_URL}) and unpack it so that {folder}/{name}.npy and "
                f"{folder}/labels.npy exist")
    data = np.load(path, mmap_mode="r")
    labels = np.load(lpath, mmap_mode="r")
    if data.ndim != 4 or data.shape[-1] != 3 or data.shape[0] % 5:
        raise ValueError(f"{path} has shape {data.shape}; expected [5*N, H, W, 3] uint8 "
                         f"(re-download it from {CIFAR10C_URL})")
    per = data.shape[0] // 5
    if labels.shape[0] not in (per, 5 * per):
        raise ValueError(f"{lpath} has {labels.shape[0]} labels for {data.shape[0]} images")
    lo, hi = (severity - 1) * per, severity * per
    block = np.asarray(data[lo:hi])
    y = np.asarray(labels[lo:hi] if labels.shape[0] == 5 * per else labels[:])
    x = torch.from_numpy(block.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    return TensorSet(x, torch.from_numpy(y.astype(np.int64)))


__all__ = [
    "CORRUPTIONS", "STANDARD_CORRUPTIONS", "EXTRA_CORRUPTIONS", "SEVERITIES", "PARAMS",
    "RANDOM_CORRUPTIONS", "CorruptedSet", "corrupt", "corrupted_batches", "load_cifar10c",
    "parse_corruptions", "frost_texture", "plasma_fractal", "elastic_maps", "canny",
]
