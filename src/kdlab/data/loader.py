"""`BatchLoader`: a deterministic in-memory batch iterator over a `TensorSet`.

The whole set lives as one tensor on ``device``; batches are gathered by index, augmented on
whole batches (`kdlab.data.augment`) and normalised. No worker processes.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from kdlab.data.augment import AugmentParams, AugmentSpec, apply_params, draw_params
from kdlab.data.splits import TensorSet
from kdlab.core.seeding import derive_seed


class BatchLoader:
    """Batches ``(x_norm, y, idx)`` of a `TensorSet`, a pure function of ``(seed, epoch)``.

    Args:
        tset: the data; ``x`` float ``[N, C, H, W]`` in ``[0, 1]``, ``y`` int64 ``[N]``.
        batch_size: samples per batch (per rank when sharded).
        shuffle: visit samples in a random order each epoch (else in index order).
        seed: run seed; epoch ``e`` uses ``torch.Generator().manual_seed(derive_seed(seed,
            "loader", e))`` (on the CPU) for, in this order, the permutation (``randperm(N)``,
            only when ``shuffle``) and the augmentation draws of all N epoch positions
            (`kdlab.data.augment.draw_params`). So ``epoch(e)`` gives the same batches every
            time it is called, whatever the device, and different epochs differ.
        augment: `AugmentSpec` or None; applied to each batch before normalisation.
        mean, std: per-channel normalisation ``(x - mean) / std`` (None: no normalisation).
        drop_last: drop the final incomplete batch.
        device: where the data tensors and yielded batches live.

    ``epoch(e)`` yields ``(x_norm, y, idx)``: ``x_norm`` float ``[B, C, H, W]``, ``y`` int64
    ``[B]`` and ``idx`` int64 ``[B]``, the indices into ``tset`` of the batch's samples, all on
    ``device``. Without ``drop_last`` every index appears exactly once per epoch.

    Distributed training, ``shard(rank, world_size)``: returns a loader over the same tensors
    whose epochs are the interleaved slices of the single-process epoch with batch size
    ``batch_size * world_size``. Global batch ``k`` covers epoch positions
    ``[k*G, min((k+1)*G, N))`` with ``G = batch_size * world_size``; rank ``r`` takes positions
    ``k*G + r, k*G + r + world_size, ...`` of it (so ``batch_size`` samples per rank), with the
    same permutation and the same per-position augmentation draws on every rank. Hence the ranks'
    batches ``k`` together are exactly batch ``k`` of ``BatchLoader(tset, G, ...)`` with the
    same seed, augmented identically. Every rank has ``len(loader)`` = number of global batches.
    With ``drop_last=False`` the last global batch may be short, and then ranks get fewer
    (possibly zero) samples in it; use ``drop_last=True`` when every step must have full batches.
    """

    def __init__(
        self,
        tset: TensorSet,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: AugmentSpec | None = None,
        mean,
        std,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.device = torch.device(device)
        self.x = tset.x.to(self.device)
        self.y = tset.y.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = augment if (augment is not None and augment.active) else None
        self.drop_last = bool(drop_last)
        self.rank = 0
        self.world_size = 1
        c = self.x.shape[1]
        self.mean = self.std = None
        if mean is not None or std is not None:
            if mean is None or std is None:
                raise ValueError("BatchLoader: give both mean and std, or neither")
            if len(mean) != c or len(std) != c:
                raise ValueError(
                    f"BatchLoader: mean/std have {len(mean)}/{len(std)} values, data has {c} channels"
                )
            self.mean = torch.tensor(mean, dtype=self.x.dtype, device=self.device).reshape(1, c, 1, 1)
            self.std = torch.tensor(std, dtype=self.x.dtype, device=self.device).reshape(1, c, 1, 1)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def dataset_size(self) -> int:
        return int(self.y.shape[0])

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n, g = self.dataset_size, self.global_batch_size
        return n // g if self.drop_last else math.ceil(n / g)

    # -- sharding ----------------------------------------------------------------------------
    def shard(self, rank: int, world_size: int) -> "BatchLoader":
        """This loader's slice for ``rank`` of ``world_size`` (see the class docstring)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        new = object.__new__(BatchLoader)
        new.__dict__.update(self.__dict__)  # shares the data tensors, no copy
        new.rank, new.world_size = int(rank), int(world_size)
        return new

    # -- iteration ---------------------------------------------------------------------------
    def epoch_plan(self, e: int) -> tuple[torch.Tensor, AugmentParams | None]:
        """The epoch's permutation ``[N]`` and per-position augmentation draws (CPU tensors)."""
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(self.seed, "loader", e))
        n = self.dataset_size
        perm = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        params = draw_params(n, self.augment, g) if self.augment is not None else None
        return perm, params

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(x_norm, y, idx)`` for epoch ``e``; see the class docstring."""
        perm, params = self.epoch_plan(e)
        perm = perm.to(self.device)
        if params is not None:
            params = params.to(self.device)
        n, g = self.dataset_size, self.global_batch_size
        for k in range(len(self)):
            start = k * g
            pos = torch.arange(start + self.rank, min(start + g, n), self.world_size, device=self.device)
            idx = perm[pos]
            x = self.x[idx]
            if params is not None:
                x = apply_params(x, self.augment, params.select(pos))
            if self.mean is not None:
                x = (x - self.mean) / self.std
            yield x, self.y[idx], idx

    def __repr__(self) -> str:
        shard = f", rank={self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return (
            f"BatchLoader(n={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}{shard}, device={self.device})"
        )
