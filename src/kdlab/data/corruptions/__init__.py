"""CIFAR-10-C style image corruptions, applied to batches of tensors on the fly.

The 15 standard corruptions of Hendrycks & Dietterich (ICLR 2019) plus their 4 extra ones, each
at 5 severities, with the CIFAR-10-C settings of ``make_cifar_c.py`` (hendrycks/robustness,
``ImageNet-C/create_c/make_cifar_c.py``) -- not the ImageNet-C ones. Everything is written with
numpy / scipy / torch (no OpenCV, ImageMagick or torchvision); JPEG uses Pillow.

- `filters`: array helpers (borders, Gaussian, zoom, resampling, HSV, textures, Canny).
- `ops`: one registered function per corruption (``@register_corruption(name, severities=...)``);
  adding a corruption is one function in one file.
- `suite`: names, seeding, ``corrupt``, ``CorruptedSet``, ``load_cifar10c``.

Image sizes other than 32x32 (see docs/robustness.md): constants defined as fractions of the
image (elastic, fog map, zoom factors, pixelate factor) follow the actual size; pixel-length
constants (blur sigmas and radii, glass shuffle distance, motion streaks, spatter blobs, frost
needles) are multiplied by ``max(1, size / 32)`` -- they grow on larger images and are never
shrunk below the CIFAR pixel scale, where a 0.4-pixel blur would vanish.
"""

from __future__ import annotations

from kdlab.data.corruptions.filters import (
    FROST_TINT,
    LUMA,
    affine_from_points,
    box_resize_matrix,
    canny,
    clipped_zoom,
    disk_kernel,
    elastic_maps,
    frost_texture,
    gaussian_filter,
    gaussian_kernel1d,
    glass_shuffle,
    hsv_to_rgb,
    motion_blur_batch,
    motion_kernel,
    plasma_fractal,
    rgb_to_hsv,
    zoom_matrix,
)
from kdlab.data.corruptions.ops import CORRUPTION_REGISTRY, register_corruption
from kdlab.data.corruptions.suite import (
    CIFAR10C_URL,
    CIFAR100C_URL,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    PARAMS,
    RANDOM_CORRUPTIONS,
    SEVERITIES,
    STANDARD_CORRUPTIONS,
    CorruptedSet,
    canonical_name,
    check_severity,
    corrupt,
    corrupted_batches,
    corruption_names,
    image_rngs,
    is_standard,
    load_cifar10c,
    parse_corruptions,
)



def split_standard(names) -> tuple[list[str], list[str]]:
    """``(standard, extra)``: the names among the 15 standard corruptions (in the given order)
    and all the others."""
    names = list(names)
    return ([c for c in names if c in STANDARD_CORRUPTIONS],
            [c for c in names if c not in STANDARD_CORRUPTIONS])


__all__ = [
    "split_standard",
    "CORRUPTIONS", "STANDARD_CORRUPTIONS", "EXTRA_CORRUPTIONS", "SEVERITIES", "PARAMS",
    "RANDOM_CORRUPTIONS", "CorruptedSet", "corrupt", "corrupted_batches", "load_cifar10c",
    "parse_corruptions", "frost_texture", "plasma_fractal", "elastic_maps", "canny",
    "CORRUPTION_REGISTRY", "register_corruption", "corruption_names", "is_standard",
    "canonical_name", "check_severity", "image_rngs", "clipped_zoom", "zoom_matrix",
    "CIFAR10C_URL", "CIFAR100C_URL", "FROST_TINT", "LUMA", "affine_from_points",
    "box_resize_matrix", "disk_kernel", "gaussian_filter", "gaussian_kernel1d", "glass_shuffle",
    "hsv_to_rgb", "motion_blur_batch", "motion_kernel", "rgb_to_hsv",
]
