"""Tests of kdlab.data.corruptions (CIFAR-10-C style corruptions).

Expected values are worked out by hand from the formulas of make_cifar_c.py (Hendrycks &
Dietterich) or come from independent implementations (scipy.ndimage, matplotlib, Pillow).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab.data import corruptions as C
from kdlab.data.corruptions import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    PARAMS,
    RANDOM_CORRUPTIONS,
    SEVERITIES,
    STANDARD_CORRUPTIONS,
    CorruptedSet,
    corrupt,
    load_cifar10c,
    parse_corruptions,
)
from kdlab.data.splits import TensorSet


def natural_images(n: int, ch: int, size: int, seed: int = 1) -> torch.Tensor:
    """1/f ("pink") noise images, mean 0.45, std ~0.2: the power spectrum of natural images."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    fr = np.hypot(f[:, None], f[None, :])
    fr[0, 0] = 1.0
    spec = (rng.normal(size=(n, ch, size, size)) + 1j * rng.normal(size=(n, ch, size, size))) / fr
    a = np.real(np.fft.ifft2(spec))
    a = a - a.mean(axis=(2, 3), keepdims=True)
    if ch == 3:  # mostly shared luminance, some colour
        a = 0.7 * a[:, :1] / a[:, :1].std() + 0.3 * a / a.std()
    a = a / a.std(axis=(1, 2, 3), keepdims=True)
    return torch.tensor(np.clip(0.45 + 0.2 * a, 0, 1), dtype=torch.float32)


RGB = natural_images(8, 3, 32)
GREY = natural_images(8, 1, 8, seed=2)
SHAPES = {"32x32x3": RGB, "8x8x1": GREY}


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


# ------------------------------------------------------------------ names
def test_names_and_settings():
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19
    assert STANDARD_CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression")
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert CORRUPTIONS == STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS
    assert all(len(PARAMS[c]) == 5 for c in CORRUPTIONS)
    # a few CIFAR-10-C constants (make_cifar_c.py), severity 1 and 5
    assert PARAMS["gaussian_noise"][0] == 0.04 and PARAMS["gaussian_noise"][4] == 0.10
    assert PARAMS["motion_blur"][0] == (6, 1) and PARAMS["motion_blur"][4] == (9, 2.5)
    assert PARAMS["saturate"][4] == (2.5, 0.2)
    assert PARAMS["jpeg_compression"] == (80, 65, 58, 50, 40)
    # zoom factors are np.arange(1, hi, 0.01) as in the reference; float rounding makes the
    # first two include their end point (1.06: 7 factors, 1.11: 12) and the others not
    assert [len(z) for z in PARAMS["zoom_blur"]] == [7, 12, 16, 21, 26]
    assert PARAMS["zoom_blur"][4][-1] == pytest.approx(1.25)


def test_parse_corruptions():
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions(["standard"]) == list(STANDARD_CORRUPTIONS)
    assert parse_corruptions("extra") == list(EXTRA_CORRUPTIONS)
    assert parse_corruptions(["jpeg,elastic", "fog", "fog"]) == [
        "jpeg_compression", "elastic_transform", "fog"]
    with pytest.raises(ValueError, match="unknown corruption"):
        parse_corruptions("rain")


def test_bad_input():
    with pytest.raises(ValueError, match="severity"):
        corrupt(RGB, "fog", 6)
    with pytest.raises(ValueError, match="severity"):
        corrupt(RGB, "fog", 0)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        corrupt(torch.rand(2, 2, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(RGB, "rain", 1)
    with pytest.raises(ValueError, match="index"):
        corrupt(RGB, "fog", 1, index=[0, 1])


# ------------------------------------------------------------------ every corruption
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption(name, shape):
    x = SHAPES[shape]
    dist = {}
    for s in SEVERITIES:
        y = corrupt(x, name, s, seed=0)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        dist[s] = mad(y, x)
        if name == "zoom_blur" and shape == "8x8x1" and s == 1:
            # as in make_cifar_c.py: scipy.ndimage.zoom rounds 8 * z (z <= 1.06) back to 8
            # rows, so every zoom of severity 1 is the identity on 8 px (see test_zoom_blur_*)
            assert dist[s] < 1e-6
            continue
        assert dist[s] > 1e-3, f"{name} severity {s} does not change the image"
        # deterministic for a seed
        assert torch.equal(corrupt(x, name, s, seed=0), y)
    other = corrupt(x, name, 3, seed=1)
    if name in RANDOM_CORRUPTIONS:
        assert not torch.equal(other, corrupt(x, name, 3, seed=0))
    else:  # deterministic corruptions ignore the seed
        assert torch.equal(other, corrupt(x, name, 3, seed=0))
    if name != "elastic_transform":  # see test_elastic_severity_is_local_distortion
        assert dist[1] < dist[5], f"{name}: severity 1 {dist[1]:.4f} vs 5 {dist[5]:.4f}"


@pytest.mark.parametrize("name", sorted(RANDOM_CORRUPTIONS))
def test_per_image_draws_and_batch_independence(name):
    x = RGB[:1].repeat(4, 1, 1, 1)  # four copies of one image
    y = corrupt(x, name, 5, seed=3)
    assert not torch.equal(y[0], y[1]), "images of a batch must get independent draws"
    # an image's corruption depends on its index, not on the batch it is in
    part = corrupt(x[2:4], name, 5, seed=3, index=[2, 3])
    assert torch.equal(part, y[2:4])


def test_corrupted_set_batches_match_whole():
    tset = TensorSet(RGB, torch.arange(8) % 3)
    cs = CorruptedSet(tset, "shot_noise", 2, seed=5)
    assert len(cs) == 8
    whole = corrupt(RGB, "shot_noise", 2, seed=5)
    xs, ys = zip(*cs.batches(3))
    assert [len(b) for b in xs] == [3, 3, 2]
    assert torch.equal(torch.cat(xs), whole) and torch.equal(torch.cat(ys), tset.y)
    mat = cs.materialize(batch_size=5)
    assert torch.equal(mat.x, whole) and torch.equal(mat.y, tset.y)
    assert list(C.corrupted_batches(tset, "shot_noise", 2, 5, batch_size=8))[0][0].equal(whole)


# ------------------------------------------------------------------ noise
def test_gaussian_noise_std():
    x = torch.full((8, 3, 32, 32), 0.5)
    for s, c in zip(SEVERITIES, (0.04, 0.06, 0.08, 0.09, 0.10)):
        d = corrupt(x, "gaussian_noise", s) - x  # 0.5 is >= 5 sigma from 0 and 1: no clipping
        assert abs(float(d.mean())) < 0.003
        assert float(d.std()) == pytest.approx(c, rel=0.03)


def test_shot_noise_is_poisson():
    # Poisson(x c) / c has mean x and std sqrt(x / c): at x = 0.5, c = 50 -> std 0.1
    x = torch.full((8, 3, 32, 32), 0.5)
    y = corrupt(x, "shot_noise", 5)
    assert float(y.mean()) == pytest.approx(0.5, abs=0.003)
    assert float(y.std()) == pytest.approx(math.sqrt(0.5 / 50), rel=0.03)
    # values are multiples of 1 / c
    assert torch.allclose(y * 50, torch.round(y * 50), atol=1e-4)


def test_impulse_noise_fraction():
    x = torch.full((8, 3, 32, 32), 0.5)
    for s, amount in zip(SEVERITIES, (0.01, 0.02, 0.03, 0.05, 0.07)):
        y = corrupt(x, "impulse_noise", s)
        changed = (y != x)
        assert float(changed.float().mean()) == pytest.approx(amount, abs=0.004)
        # changed values are salt (1) or pepper (0), about half each
        assert torch.all((y[changed] == 0) | (y[changed] == 1))
        salt = float((y[changed] == 1).float().mean())
        assert 0.4 < salt < 0.6


def test_speckle_noise_is_multiplicative():
    x = torch.full((8, 3, 32, 32), 0.4)
    d = corrupt(x, "speckle_noise", 5) - x  # x + x * N(0, 0.2): std 0.4 * 0.2 = 0.08
    assert float(d.std()) == pytest.approx(0.08, rel=0.03)
    zeros = torch.zeros(2, 3, 8, 8)
    assert torch.equal(corrupt(zeros, "speckle_noise", 5), zeros)


# ------------------------------------------------------------------ blurs
def test_gaussian_blur_matches_scipy():
    from scipy import ndimage

    for s, sigma in zip(SEVERITIES, (0.4, 0.6, 0.7, 0.8, 1.0)):
        ref = ndimage.gaussian_filter(RGB.double().numpy(), sigma=(0, 0, sigma, sigma),
                                      mode="nearest", truncate=4.0)
        got = corrupt(RGB, "gaussian_blur", s).double().numpy()
        assert np.allclose(got, np.clip(ref, 0, 1), atol=1e-6)


def test_defocus_kernel_by_hand():
    # severity 1: radius 0.3 -> the disk is the centre pixel alone; alias blur = 3x3 Gaussian
    # with sigma 0.4: 1-D weights (e, 1, e)/(1 + 2e), e = exp(-1 / (2 * 0.4^2)) = 0.0439369
    k = C.disk_kernel(0.3, 0.4)
    e = math.exp(-1 / 0.32)
    assert k.shape == (3, 3)
    assert k[1, 1] == pytest.approx(1 / (1 + 2 * e) ** 2, rel=1e-9)  # 0.844966
    assert k[0, 0] == pytest.approx(e * e / (1 + 2 * e) ** 2, rel=1e-9)
    # severity 5: radius 1.5 -> 3x3 square disk (1 + 1 <= 2.25), 9 pixels of 1/9 each,
    # blurred by sigma 0.1 (neighbour weight exp(-50) ~ 0): centre block stays 1/9
    k5 = C.disk_kernel(1.5, 0.1)
    assert k5.sum() == pytest.approx(1.0)
    c = k5.shape[0] // 2
    assert np.allclose(k5[c - 1:c + 2, c - 1:c + 2], 1 / 9, atol=1e-12)
    # a constant image is unchanged by any blur
    flat = torch.full((2, 3, 32, 32), 0.3)
    for name in ("defocus_blur", "gaussian_blur", "zoom_blur", "motion_blur", "glass_blur"):
        assert torch.allclose(corrupt(flat, name, 5), flat, atol=2 / 255), name


def test_motion_kernel_and_direction_by_hand():
    # radius 6 -> 2*6+1 = 13 taps, sigma 1: k_i = exp(-i^2/2) / sum; the sum is
    # 1 + 0.606531 + 0.135335 + 0.011109 + 0.000335 + 0.0000037 + ... = 1.753314
    k = C.motion_kernel(6, 1)
    assert len(k) == 13
    assert k[0] == pytest.approx(1 / 1.753314, rel=1e-5)  # 0.570348
    assert k[1] == pytest.approx(math.exp(-0.5) / 1.753314, rel=1e-5)
    x = np.zeros((1, 1, 9, 20))
    x[0, 0, 4, 10] = 1.0
    # angle 0: out(r, c) = sum_i k_i x(r, c + i): the impulse shows at columns 10 - i
    out = C.motion_blur_batch(x, 6, 1, [0.0])[0, 0]
    assert np.allclose(out[4, 4:11][::-1], k[:7]) and out.sum() == pytest.approx(1.0)
    assert np.count_nonzero(out[[0, 1, 2, 3, 5, 6, 7, 8]]) == 0
    # angle 90: out(r, c) = sum_i k_i x(r + i, c): rows 4 - i (the rest falls off the image)
    out = C.motion_blur_batch(x, 6, 1, [90.0])[0, 0]
    assert np.allclose(out[:5, 10][::-1], k[:5])


def test_zoom_matrix():
    assert np.allclose(C.zoom_matrix(8, 1.0), np.eye(8))
    m = C.zoom_matrix(32, 1.25)
    assert np.allclose(m.sum(axis=1), 1.0)
    # the centre (15.5) is fixed: output pixel 0 samples 15.5 - 15.5 / 1.25 = 3.1
    assert m[0, 3] == pytest.approx(0.9) and m[0, 4] == pytest.approx(0.1)


def test_glass_shuffle_reproduces_reference_loop():
    """The reference swaps RGB pixels as numpy views -- which copies; compare literally."""
    rng = np.random.default_rng(0)
    img = rng.random((10, 12, 3))  # H, W, C as in make_cifar_c.py
    d = 1
    offsets = rng.integers(-d, d, size=(10 - 2 * d, 12 - 2 * d, 2))
    ref = img.copy()
    for p, h in enumerate(range(10 - d, d, -1)):
        for q, w in enumerate(range(12 - d, d, -1)):
            dx, dy = offsets[p, q]
            h_prime, w_prime = h + dy, w + dx
            ref[h, w], ref[h_prime, w_prime] = ref[h_prime, w_prime], ref[h, w]
    x = img.transpose(2, 0, 1)[None]
    for vec in (True, False):
        got = C.glass_shuffle(x, offsets[None], d, vectorized=vec)[0].transpose(1, 2, 0)
        assert np.array_equal(got, ref)


# ------------------------------------------------------------------ weather
def test_fog_formula():
    # fog: (x + c0 * plasma) * max(x) / (max(x) + c0), plasma from the image's own generator
    x = torch.full((1, 1, 32, 32), 0.6, dtype=torch.float64)
    c0, decay = PARAMS["fog"][2]
    rng = C.image_rngs(7, "fog", 3, [0])[0]
    plasma = C.plasma_fractal(rng, 32, decay)
    assert plasma.min() == 0.0 and plasma.max() == 1.0
    want = np.clip((0.6 + c0 * plasma) * 0.6 / (0.6 + c0), 0, 1)
    assert np.allclose(corrupt(x, "fog", 3, seed=7)[0, 0].numpy(), want)


def test_frost_is_a_weighted_sum():
    # frost: c0 * x + c1 * texture, and the texture depends on the seed and index only
    x = 0.5 * RGB
    for s in SEVERITIES:
        c0, c1 = PARAMS["frost"][s - 1]
        on_black = corrupt(torch.zeros_like(x), "frost", s, seed=2)
        assert float(on_black.max()) <= c1 + 1e-6
        assert torch.allclose(corrupt(x, "frost", s, seed=2) - c0 * x, on_black, atol=1e-6)
    tex = np.stack([C.frost_texture(np.random.default_rng(i), 32, 32) for i in range(8)])
    assert 0.4 < tex.mean() < 0.65 and tex.std() > 0.1


def test_snow_only_brightens():
    for s in SEVERITIES:
        assert torch.all(corrupt(RGB, "snow", s) >= RGB - 1e-6)


def test_spatter_water_and_mud():
    for s in (1, 2, 3):  # water: x + m * turquoise, m >= 0
        assert torch.all(corrupt(RGB, "spatter", s) >= RGB - 1e-6)
    white = torch.ones(8, 3, 32, 32, dtype=torch.float64)
    mud = torch.tensor([63, 42, 20], dtype=torch.float64).reshape(3, 1, 1) / 255
    for s in (4, 5):  # mud: x (1 - m) + brown m; on white, 1 - out = m (1 - brown)
        y = corrupt(white, "spatter", s, seed=1)
        m = (1 - y) / (1 - mud)
        assert float(m.max()) > 0.8  # some mud
        assert torch.allclose(m[:, 0], m[:, 1]) and torch.allclose(m[:, 0], m[:, 2])
        assert torch.all((m[:, 0] == 0) | (m[:, 0] >= 0.8 - 1e-9))  # m < 0.8 is cut to 0


# ------------------------------------------------------------------ digital
def test_brightness_on_grey_by_hand():
    # a grey pixel has S = 0 and V = g, so adding c to V gives g + c (clipped at 1)
    for s, c in zip(SEVERITIES, (0.05, 0.1, 0.15, 0.2, 0.3)):
        for ch in (1, 3):
            x = torch.tensor([0.2, 0.5, 0.9]).reshape(1, 1, 1, 3).repeat(1, ch, 1, 1)
            want = torch.tensor([0.2 + c, 0.5 + c, min(0.9 + c, 1.0)]).reshape(1, 1, 1, 3)
            assert torch.allclose(corrupt(x, "brightness", s), want.expand_as(x), atol=1e-6)


def test_brightness_and_saturate_on_a_colour_by_hand():
    # (0.5, 0.25, 0.25): V = 0.5, S = 0.5, H = 0 (red)
    def t(*v):
        return torch.tensor(v, dtype=torch.float64)

    x = t(0.5, 0.25, 0.25).reshape(1, 3, 1, 1)
    # brightness 5: V = 0.8 -> (V, V(1-S), V(1-S)) = (0.8, 0.4, 0.4)
    assert torch.allclose(corrupt(x, "brightness", 5).flatten(), t(0.8, 0.4, 0.4))
    # saturate 1: S = 0.5 * 0.3 = 0.15 -> (0.5, 0.425, 0.425)
    assert torch.allclose(corrupt(x, "saturate", 1).flatten(), t(0.5, 0.425, 0.425))
    # saturate 4: S = 0.5 * 2 + 0.1 -> clipped to 1 -> (0.5, 0, 0)
    assert torch.allclose(corrupt(x, "saturate", 4).flatten(), t(0.5, 0.0, 0.0))


def test_hsv_matches_matplotlib():
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    x = RGB[:2].double().numpy()
    hsv = C.rgb_to_hsv(x)
    want = rgb_to_hsv(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert np.allclose(hsv, want)
    back = hsv_to_rgb(want.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert np.allclose(C.hsv_to_rgb(hsv), back)
    assert np.allclose(C.hsv_to_rgb(hsv), x)


def test_saturate_grey_analogue_by_hand():
    # 1 channel: m + (g - m) c0 + c1 sign(g - m), m = image mean = 0.5
    x = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64).reshape(1, 1, 2, 2)
    s1 = corrupt(x, "saturate", 1).flatten()  # c = (0.3, 0)
    assert torch.allclose(s1, torch.tensor([0.41, 0.47, 0.53, 0.59], dtype=torch.float64))
    s5 = corrupt(x, "saturate", 5).flatten()  # c = (2.5, 0.2): 0.5 -/+ (0.75 + 0.2), 0.5 -/+ 0.45
    assert torch.allclose(s5, torch.tensor([0.0, 0.05, 0.95, 1.0], dtype=torch.float64))


def test_contrast_formula_by_hand():
    # (x - mean) * c + mean per channel; channel means 0.4, 0.5, 0.5
    x = torch.tensor([[[0.0, 0.2], [0.4, 1.0]], [[0.5, 0.5], [0.5, 0.5]],
                      [[0.0, 1.0], [1.0, 0.0]]]).unsqueeze(0)
    y = corrupt(x, "contrast", 1)  # c = 0.75
    assert torch.allclose(y[0, 0], torch.tensor([[0.1, 0.25], [0.4, 0.85]]))
    assert torch.allclose(y[0, 1], x[0, 1])
    assert torch.allclose(y[0, 2], torch.tensor([[0.125, 0.875], [0.875, 0.125]]))
    y5 = corrupt(x, "contrast", 5)  # c = 0.15: 0.4 - 0.06, 0.4 - 0.03, 0.4, 0.4 + 0.09
    assert torch.allclose(y5[0, 0], torch.tensor([[0.34, 0.37], [0.4, 0.49]]))


def test_pixelate():
    flat = torch.full((2, 3, 32, 32), 0.37)
    for s in SEVERITIES:  # box averages of a constant are the constant
        assert torch.allclose(corrupt(flat, "pixelate", s), flat, atol=1e-6)
    # severity 5 on 32 px: int(32 * 0.65) = 20 px; BOX down then BOX up, as Pillow does
    PIL = pytest.importorskip("PIL.Image")
    img = RGB[0, 0].numpy()
    small = PIL.fromarray(img, mode="F").resize((20, 20), PIL.BOX)
    want = np.asarray(small.resize((32, 32), PIL.BOX))
    got = corrupt(RGB[:1], "pixelate", 5)[0, 0].numpy()
    assert np.allclose(got, want, atol=1e-5)
    # 8 px: int(8 * 0.95) = 7
    small = PIL.fromarray(GREY[0, 0].numpy(), mode="F").resize((7, 7), PIL.BOX)
    want = np.asarray(small.resize((8, 8), PIL.BOX))
    assert np.allclose(corrupt(GREY[:1], "pixelate", 1)[0, 0].numpy(), want, atol=1e-5)


def test_jpeg():
    y = corrupt(RGB, "jpeg_compression", 3)
    assert torch.allclose(y * 255, torch.round(y * 255), atol=1e-4)  # 8-bit decoded
    flat = torch.full((1, 3, 16, 16), 128 / 255)  # a flat block survives JPEG
    assert float((corrupt(flat, "jpeg_compression", 5) - flat).abs().max()) <= 1 / 255 + 1e-6


def test_elastic_constant_image_and_local_distortion():
    flat = torch.full((2, 3, 32, 32), 0.6)
    for s in SEVERITIES:  # resampling a constant (reflected borders) gives the constant
        assert torch.allclose(corrupt(flat, "elastic_transform", s), flat, atol=1e-6)


@pytest.mark.parametrize("size", [32, 8])
def test_elastic_severity_is_local_distortion(size):
    """CIFAR-10-C's elastic severity 1 is a pure random affine (corner jitter 0.08 * size)
    that shrinks as the severity grows, while the local (non-affine) displacement grows, so
    the pixel distance does not order it; the measured distance here is the RMS non-affine
    part of the displacement field (pixels)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    design = np.stack([xx.ravel(), yy.ravel(), np.ones(size * size)], axis=1)

    def non_affine(sev: int) -> float:
        res = []
        for i in range(8):
            _, _, re, ce = C.elastic_maps(np.random.default_rng(i), size, size,
                                          PARAMS["elastic_transform"][sev - 1])
            for disp in (re - yy, ce - xx):
                coef, *_ = np.linalg.lstsq(design, disp.ravel(), rcond=None)
                res.append(disp.ravel() - design @ coef)
        return float(np.sqrt(np.mean(np.square(res))))

    assert non_affine(1) == pytest.approx(0.0, abs=1e-9)
    assert non_affine(5) > 0.1


# ------------------------------------------------------------------ published CIFAR-10-C
def test_load_cifar10c_tiny_file(tmp_path):
    n = 4
    data = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
    for s in range(5):
        data[s * n:(s + 1) * n] = 10 * (s + 1)  # severity s+1 block holds the value 10 (s+1)
    data[2 * n + 1, 0, 0] = (255, 0, 51)  # one marked pixel in severity 3, image 1
    labels = np.tile(np.arange(n, dtype=np.uint8), 5)
    np.save(tmp_path / "fog.npy", data)
    np.save(tmp_path / "labels.npy", labels)
    ts = load_cifar10c(tmp_path, "fog", 3)
    assert ts.x.shape == (n, 3, 32, 32) and ts.x.dtype == torch.float32
    assert ts.y.dtype == torch.int64 and ts.y.tolist() == [0, 1, 2, 3]
    assert float(ts.x[0].mean()) == pytest.approx(30 / 255)
    assert ts.x[1, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])  # channels last -> first
    # labels.npy with one block only is accepted too
    np.save(tmp_path / "labels.npy", labels[:n])
    assert load_cifar10c(tmp_path, "fog", 5).y.tolist() == [0, 1, 2, 3]
    with pytest.raises(FileNotFoundError, match="2535967"):
        load_cifar10c(tmp_path, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(tmp_path, "fog", 6)


# ------------------------------------------------------------------ zoom blur as make_cifar_c.py
def _reference_zoom_blur(img_hwc: np.ndarray, severity: int) -> np.ndarray:
    """zoom_blur as make_cifar_c.py computes it, restated for one H x W x C image: float32
    image; for each factor z of np.arange(1, hi, 0.01): take the central ceil(H / z) square
    (first row (H - ceil(H / z)) // 2), scipy.ndimage.zoom it by (z, z, 1) with order 1, keep H
    rows and columns from (zoomed size - H) // 2 on; average the image and all the zooms."""
    from scipy.ndimage import zoom

    hi = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
    img = img_hwc.astype(np.float32)
    h = img.shape[0]
    acc = np.zeros_like(img)
    factors = np.arange(1, hi, 0.01)
    for z in factors:
        side = int(np.ceil(h / z))
        first = (h - side) // 2
        zoomed = zoom(img[first:first + side, first:first + side], (z, z, 1), order=1)
        cut = (zoomed.shape[0] - h) // 2
        acc += zoomed[cut:cut + h, cut:cut + h]
    return np.clip((img + acc) / (len(factors) + 1), 0, 1)


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("shape", ["32x32x3", "8x8x1"])
def test_zoom_blur_matches_the_original_algorithm(severity, shape):
    x = SHAPES[shape][:3]
    got = corrupt(x, "zoom_blur", severity).numpy()
    for i in range(len(x)):
        want = _reference_zoom_blur(x[i].numpy().transpose(1, 2, 0), severity)
        assert np.allclose(got[i].transpose(1, 2, 0), want, atol=2e-6)


def test_clipped_zoom_geometry_by_hand():
    # 6x6 image whose rows are 0, 0.1, .., 0.5 and z = 1.25: crop ceil(6 / 1.25) = 5 rows from
    # row (6 - 5) // 2 = 0; scipy zooms 5 rows to round(6.25) = 6, sampling the crop at
    # i * (5 - 1) / (6 - 1) = 0.8 i; trim (6 - 6) // 2 = 0. So row i becomes 0.08 i: the zoom is
    # anchored at the top-left corner, where a zoom about the centre would give 0.08 i + 0.05.
    x = np.repeat((np.arange(6) / 10.0)[:, None], 6, axis=1)[None, None]
    out = C.clipped_zoom(x, 1.25)[0, 0]
    assert np.allclose(out, np.repeat((0.08 * np.arange(6))[:, None], 6, axis=1))
    # 8 px and every severity-1 factor (<= 1.06): ceil(8 / z) = 8 and round(8 z) = 8, so
    # scipy samples the crop at i * 7 / 7 = i: the identity
    y = np.random.default_rng(0).random((1, 1, 8, 8))
    for z in PARAMS["zoom_blur"][0]:
        assert np.allclose(C.clipped_zoom(y, z), y)
