"""Array helpers of the corruptions: filters, resampling, colour spaces, procedural textures.

Everything works on float64 numpy arrays ``x [N, C, H, W]`` (unless a docstring says otherwise)
and reproduces the library calls of ``make_cifar_c.py`` (Hendrycks & Dietterich) with numpy /
scipy only: OpenCV's borders and filters, skimage's Gaussian and HSV, ImageMagick's motion blur,
Pillow's BOX resampling and scipy.ndimage.zoom's geometry (`clipped_zoom`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as cv2.COLOR_RGB2GRAY

#: RGB tint of the procedural frost texture (bluish white, like the frost photographs)
FROST_TINT = (0.82, 0.92, 1.0)


def border_index(idx: np.ndarray, n: int, mode: str) -> np.ndarray:
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


def correlate1d(x: np.ndarray, w: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """Correlate along ``axis`` with the odd-length weights ``w`` (centre tap in the middle)."""
    r = len(w) // 2
    if r == 0:
        return x * w[0]
    n = x.shape[axis]
    src = border_index(np.arange(-r, n + r), n, mode)
    xp = np.take(x, src, axis=axis)
    out = np.zeros_like(x)
    for j, wj in enumerate(w):
        if wj != 0:
            sl = [slice(None)] * x.ndim
            sl[axis] = slice(j, j + n)
            out += wj * xp[tuple(sl)]
    return out


def correlate2d(x: np.ndarray, k: np.ndarray, mode: str) -> np.ndarray:
    """Correlate the last two axes with the 2-D kernel ``k`` (odd sizes, anchor at the centre)."""
    rh, rw = k.shape[0] // 2, k.shape[1] // 2
    h, w = x.shape[-2:]
    rows = border_index(np.arange(-rh, h + rh), h, mode)
    cols = border_index(np.arange(-rw, w + rw), w, mode)
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
    return correlate1d(correlate1d(x, w, x.ndim - 2, mode), w, x.ndim - 1, mode)


def bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Sample ``x [N, C, H, W]`` at real ``rows, cols [N, H', W']`` (bilinear, border ``mode``)."""
    n, _, h, w = x.shape
    r0 = np.floor(rows)
    c0 = np.floor(cols)
    fr = (rows - r0)[:, None]
    fc = (cols - c0)[:, None]
    r0 = r0.astype(np.int64)
    c0 = c0.astype(np.int64)
    ra, rb = border_index(r0, h, mode), border_index(r0 + 1, h, mode)
    ca, cb = border_index(c0, w, mode), border_index(c0 + 1, w, mode)
    nn_ = np.arange(n)[:, None, None]

    def at(r, c):  # -> [N, C, H', W']
        return np.moveaxis(x[nn_, :, r, c], -1, 1)

    return ((1 - fr) * ((1 - fc) * at(ra, ca) + fc * at(ra, cb))
            + fr * ((1 - fc) * at(rb, ca) + fc * at(rb, cb)))


def zoom_matrix(n: int, z: float) -> np.ndarray:
    """``[n, n]`` matrix of a centre-anchored zoom by ``z`` (>= 1) with linear interpolation:
    output pixel ``i`` samples the input at ``(i - (n-1)/2) / z + (n-1)/2``. (zoom_blur and snow
    used this before they switched to the reference's geometry, `clipped_zoom`; kept for
    comparison.)"""
    m = np.zeros((n, n))
    c = (n - 1) / 2.0
    s = (np.arange(n) - c) / float(z) + c
    i0 = np.clip(np.floor(s).astype(np.int64), 0, n - 1)
    f = s - i0
    i1 = np.minimum(i0 + 1, n - 1)
    np.add.at(m, (np.arange(n), i0), 1 - f)
    np.add.at(m, (np.arange(n), i1), f)
    return m

def clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
    """make_cifar_c.py's ``clipped_zoom`` on the last two axes of ``x``, batched.

    With ``H`` the image height: crop the central ``ch = ceil(H / z)`` rows (first row
    ``(H - ch) // 2``), zoom them with ``scipy.ndimage.zoom(order=1)`` -- whose output has
    ``round(ch * z)`` rows and samples the crop at ``i * (ch - 1) / (round(ch * z) - 1)`` --
    and keep ``H`` rows from ``(round(ch * z) - H) // 2`` on (the "top-left trim"); the same
    for the columns. Rounding the output size makes the zoom about a point up to 1 px
    top-left of the centre and turns factors with ``round(ch * z) == ch == H`` into no-ops
    (1.01 on 32 px).
    """
    from scipy.ndimage import zoom

    h, w = x.shape[-2:]
    ch, cw = int(np.ceil(h / z)), int(np.ceil(w / z))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    out = zoom(crop, (1,) * (x.ndim - 2) + (z, z), order=1)
    th, tw = (out.shape[-2] - h) // 2, (out.shape[-1] - w) // 2
    return out[..., th:th + h, tw:tw + w]


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


def grey(x: np.ndarray) -> np.ndarray:
    """``[N, 1, H, W]`` luma of an RGB batch (the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def colour(rgb: Sequence[float], channels: int) -> np.ndarray:
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
    d = correlate1d(correlate1d(d, g, 0, "reflect101"), g, 1, "reflect101")
    nz = np.argwhere(np.abs(d) > 1e-15)
    c = d.shape[0] // 2
    r = int(np.abs(nz - c).max()) if len(nz) else 0
    return d[c - r:c + r + 1, c - r:c + r + 1]


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


def canny(img: np.ndarray, low: float = 50, high: float = 150) -> np.ndarray:
    """Edges of uint8 images ``[..., H, W]`` like cv2.Canny(img, low, high): 3x3 Sobel
    (replicated border), L1 magnitude, non-maximum suppression in 4 directions, hysteresis
    with 8-connected components (per image)."""
    from scipy import ndimage

    f = img.astype(np.float64)
    d, s = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    ax_r, ax_c = f.ndim - 2, f.ndim - 1
    gx = correlate1d(correlate1d(f, d, ax_c, "nearest"), s, ax_r, "nearest")
    gy = correlate1d(correlate1d(f, d, ax_r, "nearest"), s, ax_c, "nearest")
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


def equalize_hist(img: np.ndarray) -> np.ndarray:
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


def box3(a: np.ndarray) -> np.ndarray:
    """cv2.blur(a, (3, 3)) on the last two axes (3x3 mean, reflect-101 border)."""
    w = np.full(3, 1 / 3)
    return correlate1d(correlate1d(a, w, a.ndim - 2, "reflect101"), w, a.ndim - 1, "reflect101")
