"""The runtime: one object that knows the device, mixed precision and the process group.

:class:`Runtime` replaces every ``if dist`` of the training loop: ``autocast()``, ``backward(loss)``,
``step(optimizer, params, grad_clip, weight)`` (gradient all-reduce, then clipping, then the
optimiser step through the fp16 grad scaler), ``sync_epoch`` (metrics and BatchNorm statistics over
ranks), ``broadcast`` (identical initial weights), ``barrier()`` and ``is_main``.

Data-parallel training on PyTorch's own distributed engine (``torch.distributed``):
``torchrun --nproc_per_node=N -m kdlab distill <recipe>`` (or ``ablate``, ``train-teacher``).
:func:`from_env` joins the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with ``nccl`` on CUDA and ``gloo`` on CPU.

* Data: the training loader is sharded (`BatchLoader.shard`) with ``train.batch_size / N``
  samples per rank, so the *total* batch is the recipe's, and the ranks' batches together are
  exactly the single-process batch (same permutation, same augmentation draws).
* Gradients: :func:`all_reduce_grads` sums ``grad * local_batch`` over ranks and divides by the
  total batch, i.e. the gradient of the loss averaged over the global batch (exact for losses
  that are batch means, also when the last batch is split unevenly). Weights start identical
  (the init seed, then :func:`broadcast_modules`) and so stay identical.
* Metrics: :func:`sync_epoch` all-reduces the epoch's loss sums and sample counts, and averages
  BatchNorm running statistics, so every rank evaluates the same model and takes the same
  early-stopping decisions; validation/test sets are evaluated whole on every rank.
* Files: only rank 0 writes (checkpoints, metrics, run.json, result.json, study reports); the
  others wait at a :func:`barrier` before reading ``best.pt``.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as tdist
from torch import nn

from kdlab.core.device import resolve_device  # noqa: F401  (Runtime resolves its device; callers import it from here too)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def from_env(backend: Optional[str] = None) -> Optional[tuple[int, int]]:
    """``(rank, world_size)`` when launched by torchrun with more than one process (joining the
    process group on first call), else None."""
    if is_initialized():
        return (tdist.get_rank(), tdist.get_world_size()) if tdist.get_world_size() > 1 else None
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1 or "RANK" not in os.environ:
        return None
    return init(backend)


def init(backend: Optional[str] = None, timeout_s: float = 1800) -> tuple[int, int]:
    """Join the process group described by the environment (torchrun's variables)."""
    if not is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)  # "cuda" then means this process's GPU
        tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return tdist.get_rank(), tdist.get_world_size()


def cleanup() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def _params(*modules: nn.Module):
    seen = set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def broadcast_modules(*modules: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every rank."""
    if not is_initialized():
        return
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                tdist.broadcast(t.data, src)


def all_reduce_grads(*modules: nn.Module, weight: Optional[float] = None) -> None:
    """Average the gradients of ``modules`` over ranks, in one flat all-reduce.

    With ``weight`` (this rank's batch size) each rank's gradient is weighted by it and the sum is
    divided by the total weight: the gradient of the mean loss over the global batch.
    """
    all_reduce_params(list(_params(*modules)), weight=weight)


def all_reduce_params(params, weight: Optional[float] = None) -> None:
    """:func:`all_reduce_grads` over a list of parameters."""
    if not is_initialized() or tdist.get_world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    ref = params[0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    w = float(weight) if weight is not None else 1.0
    flat = torch.cat([g.reshape(-1).float() for g in grads] +
                     [torch.full((1,), w, device=ref.device)])
    if weight is not None:
        flat[:-1].mul_(w)
    tdist.all_reduce(flat)
    total = flat[-1]
    flat = flat[:-1] / total.clamp_min(1e-12)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        new = flat[off:off + n].view_as(g).to(g.dtype)
        off += n
        if p.grad is None:
            p.grad = new.clone()
        else:
            p.grad.copy_(new)


def sync_epoch(models, n_seen, sums: dict, device) -> tuple[float, dict]:
    """All-reduce an epoch's weight total ``n_seen`` and weighted sums; average the models'
    floating-point buffers (BatchNorm running statistics) over ranks."""
    if not is_initialized():
        return n_seen, sums
    keys = list(sums)
    vec = torch.stack([torch.as_tensor(float(n_seen), device=device)] +
                      [torch.as_tensor(sums[k], device=device).float().reshape(()) for k in keys])
    tdist.all_reduce(vec)
    ws = tdist.get_world_size()
    with torch.no_grad():
        for model in models:
            for b in model.buffers():
                if b.is_floating_point():
                    tdist.all_reduce(b)
                    b.div_(ws)
    return vec[0].item(), {k: vec[1 + i] for i, k in enumerate(keys)}


def global_count(loader, step: int, local: float, world: int) -> float:
    """Samples in global batch ``step`` of a sharded loader (every rank's share together); without
    the loader's sizes, ``local · world``."""
    n, g = getattr(loader, "dataset_size", None), getattr(loader, "global_batch_size", None)
    if n is None or g is None:
        return local * world
    return float(min(g, n - step * g))


class Runtime:
    """Device, mixed precision and (optional) process group of one run.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps``.
        amp: ``none`` | ``bf16`` | ``fp16`` (fp16 uses a grad scaler on CUDA).
        dist: ``"env"`` joins torchrun's process group when launched by it; ``None`` never does;
            a ``(rank, world_size)`` tuple for a group that is already set up.
    """

    def __init__(self, device: str = "auto", amp: str = "none", dist="env"):
        self.dist = from_env() if dist == "env" else dist
        self.device = resolve_device(device)
        self.amp = amp
        if amp == "bf16":  # one line per process where the CPU only emulates bf16
            from kdlab.core.device import note_emulated_bf16

            note_emulated_bf16(self.device)
        self.scaler = torch.amp.GradScaler(enabled=amp == "fp16" and self.device.type == "cuda")
        self.ddp_params: set[int] = set()  # ids of parameters whose gradients DDP averages in backward

    @classmethod
    def from_cfg(cls, cfg, dist="env") -> "Runtime":
        """The runtime of a recipe's ``train`` section."""
        return cls(cfg.device, cfg.amp, dist)

    @property
    def rank(self) -> int:
        return self.dist[0] if self.dist else 0

    @property
    def world_size(self) -> int:
        return self.dist[1] if self.dist else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """The autocast context of ``amp`` on this device (a no-op for ``none``)."""
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def local_batch(self, batch_size: int) -> int:
        """This rank's share of a total batch."""
        if batch_size % self.world_size:
            raise ValueError(f"train.batch_size {batch_size} must be divisible by the "
                             f"{self.world_size} processes")
        return batch_size // self.world_size

    def broadcast(self, *modules: nn.Module) -> None:
        if self.dist:
            broadcast_modules(*modules)

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """``module`` in ``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, nccl on GPU).
        BatchNorm buffers are not broadcast each step: :meth:`sync_epoch` averages them per epoch.
        Without a process group the module is returned as it is."""
        if not self.dist:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        self.ddp_params.update(id(p) for p in module.parameters())
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)

    def local_loss(self, loss: torch.Tensor, weight: float, loader, step: int) -> torch.Tensor:
        """The loss this process back-propagates for global batch ``step`` of ``loader``, of which it
        holds ``weight`` samples. DDP averages the ranks' gradients equally, so under DDP each rank's
        mean loss is scaled by its share of the global batch (``weight · world / global``): the
        result is the gradient of the mean over the global batch. Otherwise ``loss`` as it is (the
        gradients are then averaged weighted by ``weight`` in :meth:`step`)."""
        if not self.ddp_params:
            return loss
        return loss * (weight * self.world_size / global_count(loader, step, weight, self.world_size))

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, opt, params, *, grad_clip: Optional[float] = None, weight: Optional[float] = None) -> None:
        """All-reduce the gradients of ``params`` that DDP does not sync in backward, weighted by
        this rank's batch ``weight`` (a plain average under DDP, whose losses :meth:`local_loss`
        scaled already), clip the global norm of ``params`` to ``grad_clip`` (after the
        all-reduce), and step ``opt`` (through the grad scaler)."""
        params = list(params)
        if self.dist:
            sync = [p for p in params if id(p) not in self.ddp_params]
            all_reduce_params(sync, weight=None if self.ddp_params else weight)
        if grad_clip:
            self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(opt)
        self.scaler.update()

    def sync_epoch(self, models, n_seen, sums: dict):
        return sync_epoch(models, n_seen, sums, self.device) if self.dist else (n_seen, sums)

    def barrier(self) -> None:
        if self.dist:
            barrier()
