"""Loaders over any ``torch.utils.data.Dataset`` or ``DataLoader``, with the same protocol as the
in-memory :class:`kdlab.data.BatchLoader`: ``epoch(e)`` yields ``(x, y, idx)`` and ``len()`` is the
number of batches.

* :class:`DatasetLoader` streams a map-style dataset (items ``(image, label)``, images float
  ``[C, H, W]`` in ``[0, 1]``): the epoch's permutation and augmentation draws are exactly those of a
  ``BatchLoader`` with the same seed (``derive_seed(seed, "loader", e)``), samples are read in
  batches by a ``DataLoader`` (``num_workers`` processes), augmented as whole batches on the device
  and normalised there. Memory holds one batch (per worker), never the data set. Sharding for
  distributed training takes rank r's interleaved slice of every global batch (what
  ``DistributedSampler`` does, with kdlab's seeded order).
* :class:`UserLoader` wraps a user's ``DataLoader`` as it is (its own order and transforms): batches
  ``(x, y)`` get ``idx = None``, so a teacher runs live (no cache); ``sampler.set_epoch(e)`` is called
  when the sampler has it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import torch

from kdlab.core.seeding import derive_seed
from kdlab.data.augment import AugmentSpec, apply_params, draw_params


def _item_xy(item):
    if isinstance(item, dict):
        return item.get("pixel_values", item.get("image", item.get("x"))), item.get("labels", item.get("label", item.get("y")))
    return item[0], item[1]


def _collate(items):
    xs, ys = zip(*(_item_xy(it) for it in items))
    x = torch.stack([torch.as_tensor(v) for v in xs]).float()
    y = torch.as_tensor([int(v) for v in ys], dtype=torch.int64)
    return x, y


class BatchPositions(torch.utils.data.Sampler):
    """Yields the dataset indices of an epoch's batches (one list per batch)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class DatasetLoader:
    """Batches ``(x_norm, y, idx)`` streamed from a map-style ``dataset``; see the module doc.

    Args mirror :class:`kdlab.data.BatchLoader`, plus ``num_workers`` (decoding processes).
    ``collate`` turns a batch's items into ``(x, y)``; a subclass whose items are not
    ``(image, label)`` replaces it (e.g. :class:`kdlab.data.coco.BoxDatasetLoader`).
    """

    indexed = True
    collate = staticmethod(_collate)

    def __init__(self, dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 augment: Optional[AugmentSpec] = None, mean=None, std=None, drop_last: bool = False,
                 device="cpu", num_workers: int = 0):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        try:
            n = len(dataset)
        except TypeError:
            raise ValueError("DatasetLoader needs a map-style Dataset (with __len__ and __getitem__); "
                             "pass an iterable dataset inside your own DataLoader instead") from None
        if n == 0:
            raise ValueError("the data set is empty (0 samples); give at least one batch of samples")
        self.dataset = dataset
        self.n = n
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = augment if (augment is not None and augment.active) else None
        self.drop_last = bool(drop_last)
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.rank, self.world_size = 0, 1
        self.mean = None if mean is None else torch.tensor(mean).reshape(1, -1, 1, 1).to(self.device)
        self.std = None if std is None else torch.tensor(std).reshape(1, -1, 1, 1).to(self.device)

    @property
    def dataset_size(self) -> int:
        return self.n

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        g = self.global_batch_size
        return self.n // g if self.drop_last else math.ceil(self.n / g)

    def shard(self, rank: int, world_size: int) -> "DatasetLoader":
        """Rank ``rank``'s interleaved slice of every global batch (see the module doc)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        new = object.__new__(type(self))
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_held"})
        new.rank, new.world_size = int(rank), int(world_size)
        return new

    def epoch_plan(self, e: int):
        """The epoch's permutation and per-position augmentation draws (as ``BatchLoader``'s)."""
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(self.seed, "loader", e))
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        params = draw_params(self.n, self.augment, g) if self.augment is not None else None
        return perm, params

    def _data_loader(self, batches):
        """The ``DataLoader`` reading ``batches``. With workers it is made once and kept: its worker
        processes persist across epochs (``persistent_workers``; each epoch only hands the sampler
        its batches, which the main process reads) and prefetch 4 batches each; on CUDA its batches
        come in pinned memory, copied to the device asynchronously."""
        pin = self.device.type == "cuda"
        if self.num_workers == 0:
            return torch.utils.data.DataLoader(self.dataset, batch_sampler=BatchPositions(batches),
                                               collate_fn=self.collate, pin_memory=pin)
        held = self.__dict__.get("_held")
        if held is None:
            sampler = BatchPositions(batches)
            dl = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate,
                                             num_workers=self.num_workers, pin_memory=pin,
                                             persistent_workers=True, prefetch_factor=4)
            held = self.__dict__["_held"] = (sampler, dl)
        held[0].batches = batches
        return held[1]

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        perm, params = self.epoch_plan(e)
        g = self.global_batch_size
        positions = [torch.arange(k * g + self.rank, min((k + 1) * g, self.n), self.world_size)
                     for k in range(len(self))]
        batches = [perm[p].tolist() for p in positions]
        dl = self._data_loader(batches)
        for pos, idx, (x, y) in zip(positions, batches, dl):
            x = x.to(self.device, non_blocking=True)
            if params is not None:
                x = apply_params(x, self.augment, params.select(pos).to(self.device))
            if self.mean is not None:
                x = (x - self.mean) / self.std
            yield x, y.to(self.device), torch.as_tensor(idx, device=self.device)

    def fingerprint(self) -> str:
        """What the teacher cache keys a streamed data set by: its type, size and first/last items."""
        h = hashlib.sha256(f"{type(self.dataset).__qualname__}:{self.n}".encode())
        for i in (0, self.n - 1):
            x, y = _item_xy(self.dataset[i])
            h.update(torch.as_tensor(x).float().contiguous().numpy().tobytes())
            h.update(str(int(y)).encode())
        return h.hexdigest()[:20]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.n}, batch_size={self.batch_size}, batches={len(self)}, "
                f"shuffle={self.shuffle}, augment={self.augment}, workers={self.num_workers})")


class UserLoader:
    """A user's ``DataLoader`` in kdlab's loader protocol (see the module doc)."""

    indexed = False

    def __init__(self, loader, device="cpu", mean=None, std=None):
        self.loader = loader
        self.device = torch.device(device)
        self.mean = None if mean is None else torch.tensor(mean).reshape(1, -1, 1, 1).to(self.device)
        self.std = None if std is None else torch.tensor(std).reshape(1, -1, 1, 1).to(self.device)
        self.batch_size = loader.batch_size or 1

    def __len__(self) -> int:
        return len(self.loader)

    def shard(self, rank: int, world_size: int) -> "UserLoader":
        raise ValueError("a user DataLoader cannot be sharded by kdlab; give its Dataset (kdlab then "
                         "shards it) or use a DistributedSampler in your DataLoader")

    def epoch(self, e: int):
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(e)
        for batch in self.loader:
            x, y = (batch[0], batch[1]) if not isinstance(batch, dict) else _item_xy(batch)
            x = torch.as_tensor(x).float().to(self.device)
            if self.mean is not None:
                x = (x - self.mean) / self.std
            yield x, torch.as_tensor(y).long().to(self.device), None


def as_loader(data, batch_size: int, *, shuffle: bool, seed: int, augment=None, mean=None, std=None,
              device="cpu", num_workers: int = 0):
    """Any supported data in kdlab's loader protocol: a ``TensorSet`` (in memory), a map-style
    ``Dataset`` (streamed), a ``DataLoader`` (as it is), or an ``(x, y)`` pair of tensors."""
    from kdlab.data.loader import BatchLoader
    from kdlab.data.splits import TensorSet

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = TensorSet(data[0].float(), data[1].long())
    if isinstance(data, TensorSet):
        return BatchLoader(data, batch_size, shuffle=shuffle, seed=seed, augment=augment, mean=mean,
                           std=std, device=device)
    if isinstance(data, torch.utils.data.DataLoader):
        return UserLoader(data, device=device, mean=mean, std=std)
    if isinstance(data, torch.utils.data.Dataset):
        return DatasetLoader(data, batch_size, shuffle=shuffle, seed=seed, augment=augment, mean=mean,
                             std=std, device=device, num_workers=num_workers)
    raise ValueError(f"unsupported data of type {type(data).__name__}; give a torch Dataset, a DataLoader, "
                     f"a kdlab TensorSet or an (x, y) pair of tensors")


def first_batch(loader, what: str = "training data"):
    """The first batch of ``loader.epoch(0)``; a loader that yields none (an empty data set or
    DataLoader) raises one line naming ``what`` instead of a bare ``StopIteration``."""
    batch = next(iter(loader.epoch(0)), None)
    if batch is None:
        raise ValueError(f"the {what} yields no batch (it is empty); give at least one sample")
    return batch
