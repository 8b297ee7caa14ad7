"""The corruption suite: names, severities, seeding, and corrupting tensors and data sets.

- ``corrupt(x, name, severity, seed, index=None)``: ``x`` is ``[N, C, H, W]`` in ``[0, 1]``
  (before normalisation), C in {1, 3}; returns a tensor of the same shape, dtype and device.
  Image ``i`` gets its own random draws, from a generator seeded by
  ``(seed, name, severity, index[i])`` (``index`` defaults to ``0..N-1``; pass the images'
  positions in the data set so that a corrupted set does not depend on the batch size).
- ``CorruptedSet(tset, name, severity, seed)``: a `TensorSet` corrupted on the fly, in batches.
- ``load_cifar10c(folder, corruption, severity)``: the published CIFAR-10-C ``.npy`` files.
- ``STANDARD_CORRUPTIONS`` (the 15 that mCE averages), ``EXTRA_CORRUPTIONS`` (the 4 held-out
  ones), ``CORRUPTIONS`` (the 19), ``PARAMS`` and ``RANDOM_CORRUPTIONS`` describe the built-in
  suite; `corruption_names` also lists corruptions registered later
  (`kdlab.data.corruptions.ops.register_corruption`).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from kdlab.data.corruptions.ops import CORRUPTION_REGISTRY
from kdlab.data.splits import TensorSet

# ---------------------------------------------------------------------------------------------
# names and CIFAR-10-C settings

#: the 15 standard corruptions of Hendrycks & Dietterich, in the published order
STANDARD_CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTION_REGISTRY.ordered("standard"))
#: the 4 extra ones (held out for validation in the paper; reported separately here)
EXTRA_CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTION_REGISTRY.ordered("extra"))
CORRUPTIONS: tuple[str, ...] = STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

#: CIFAR-10-C parameters per severity 1..5, from make_cifar_c.py (x in [0, 1]); a live view:
#: corruptions registered later appear too
PARAMS = CORRUPTION_REGISTRY.params_view()

#: built-in corruptions that draw random numbers (the others are deterministic functions of
#: the image)
RANDOM_CORRUPTIONS: frozenset[str] = frozenset(
    n for n in CORRUPTIONS if CORRUPTION_REGISTRY.entry(n).meta["random"])

_ALIASES = {"jpeg": "jpeg_compression", "elastic": "elastic_transform"}


def corruption_names(group: str | None = None) -> list[str]:
    """Registered corruptions in registration order: all, or ``"standard"`` / ``"extra"``."""
    return CORRUPTION_REGISTRY.ordered(group)


def is_standard(name: str) -> bool:
    """Whether ``name`` is one of the 15 standard corruptions that mCE / mCA average."""
    return name in STANDARD_CORRUPTIONS


def canonical_name(name) -> str:
    """``name`` lower-cased, ``-`` as ``_``, aliases resolved (``jpeg``, ``elastic``)."""
    key = str(name).strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def _unknown(name) -> ValueError:
    return ValueError(f"unknown corruption {name!r}; choose from all, standard, extra or: "
                      f"{', '.join(corruption_names())}")


def parse_corruptions(spec: str | Sequence[str] | None) -> list[str]:
    """Corruption names from ``"all"`` (default), ``"standard"``, ``"extra"``, or names.

    ``all`` is every registered corruption (the 19 of CIFAR-10-C plus any registered later),
    ``extra`` the non-standard ones.

    Names may be given as a list and/or comma separated; ``jpeg`` and ``elastic`` are accepted
    for ``jpeg_compression`` / ``elastic_transform``. Order and duplicates follow the input.
    """
    if spec is None:
        return corruption_names()
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip().lower().replace("-", "_")
            if not part:
                continue
            if part in ("all", "standard", "extra"):
                out += corruption_names(None if part == "all" else part)
            else:
                part = canonical_name(part)
                if part not in CORRUPTION_REGISTRY:
                    raise _unknown(part)
                out.append(part)
    seen: set[str] = set()
    return [c for c in out if not (c in seen or seen.add(c))]


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
# public API


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, *,
            index=None) -> torch.Tensor:
    """Corrupt a batch ``x [N, C, H, W]`` in ``[0, 1]`` (C = 1 or 3) with CIFAR-10-C settings.

    Deterministic for ``(name, severity, seed)``: image ``i`` draws its random numbers from a
    generator seeded by ``(seed, name, severity, index[i])``; ``index`` (default ``0..N-1``)
    should be the images' positions in their data set. Returns ``x``'s dtype and device,
    clipped to ``[0, 1]``.
    """
    name = canonical_name(name)
    if name not in CORRUPTION_REGISTRY:
        raise _unknown(name)
    entry = CORRUPTION_REGISTRY.entry(name)
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
    rngs = image_rngs(seed, name, severity, index) if entry.meta["random"] else []
    k = max(1.0, min(h, w) / 32.0)
    arr = x.detach().to("cpu", torch.float64).numpy()
    out = entry.obj(arr, entry.meta["severities"][severity - 1], rngs, k)
    out = np.clip(out, 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)


class CorruptedSet:
    """A `TensorSet` corrupted on the fly: ``batches(batch_size)`` yields ``(x, y)`` with ``x``
    in ``[0, 1]`` (not normalised). Image ``i`` of the set is corrupted with ``index=i``, so the
    result does not depend on the batch size."""

    def __init__(self, base: TensorSet, name: str, severity: int, seed: int = 0):
        self.base = base
        self.name = canonical_name(name)
        if self.name not in CORRUPTION_REGISTRY:
            raise _unknown(name)
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
    name = canonical_name(corruption)
    if name not in CORRUPTION_REGISTRY:
        raise _unknown(corruption)
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
