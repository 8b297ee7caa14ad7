"""Teacher cache: the teacher's outputs for every augmented training batch, computed once per study.

A study is paired: every method of seed k sees the same data order and the same augmentation
draws (the loader seed is ``derive_seed(k, "data")``), so the teacher's logits, tapped features
and causal masks for batch (epoch e, step s) are the same for every method of that seed. A
:class:`TeacherStore` (one per study) holds them; a :class:`TeacherCache` (one per run) is the
run's ``teacher_source``: it serves what the store has and computes the rest with the live teacher.

Entries are stored per *component* (``logits``, ``feat:<layer>``, ``mask:<layer>``), so KD fills
the logits, KD+align adds the features and masks, and the full method reuses all of them. Each
component's key hashes everything its values depend on: data set and split (a content fingerprint
of the training tensors), loader seed, batch size, shuffle, augmentation spec, normalisation,
shard (rank/world), teacher weights (state-dict hash, plus the checkpoint file hash when known),
device type, storage precision, the layer, and for masks the mask config. A different key is a
different entry, so a stale cache is never used; each stored epoch also keeps the batch indices,
which are checked on use.

Precision: values are stored in fp16 (``teacher_mode: cache-fp16``, the default) or fp32
(``cache-fp32``). To make losses *exactly* equal with and without the cache, the live path of a
``cache-*`` run rounds the teacher outputs through the same precision (:class:`kdlab.train.trainer.
LiveTeacher` with ``round_to``). Binary masks are exact in fp16; logits and features change by
at most one fp16 rounding (relative 2^-11).

Storage: completed epochs stay in memory while the store holds less than ``memory_mb``; beyond
that (and only when the store has a ``root`` folder) they are written to
``<root>/<key>/<component>/e<epoch>.pt`` and read back memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch


PRECISIONS = {"cache-fp16": torch.float16, "cache-fp32": torch.float32}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A content hash of tensors (exact bytes; CPU copies)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def module_fingerprint(model: torch.nn.Module) -> str:
    return tensor_fingerprint(*[v for _, v in sorted(model.state_dict().items())])


class TeacherStore:
    """Holds cached teacher outputs of a whole study, shared by its runs (see module doc).

    Args:
        root: folder for epochs spilled to disk (None: memory only).
        memory_mb: completed epochs are kept in memory up to this many MB, then go to disk.
    """

    def __init__(self, root: Optional[str | os.PathLike] = None, memory_mb: float = 512.0):
        self.root = Path(root) if root is not None else None
        self.memory_bytes = int(memory_mb * 2**20)
        self.held_bytes = 0
        self.done: dict[tuple, dict] = {}      # (key, epoch) -> {"data", "idx", "offsets"}
        self.pending: dict[tuple, dict] = {}   # (key, epoch) -> {step: (idx_cpu, data_cpu)}
        self.hits = 0
        self.misses = 0

    # -- paths ---------------------------------------------------------------------------------
    def _path(self, key: str, name: str, epoch: int) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        return self.root / f"{safe}-{key}" / f"e{epoch:05d}.pt"

    # -- read ----------------------------------------------------------------------------------
    def _epoch(self, key: str, name: str, epoch: int) -> Optional[dict]:
        ent = self.done.get((key, epoch))
        if ent is None and self.root is not None:
            p = self._path(key, name, epoch)
            if p.is_file():
                ent = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
                self.done[(key, epoch)] = ent  # memory-mapped: costs no memory budget
        return ent

    def get(self, key: str, name: str, epoch: int, step: int, idx: torch.Tensor, check: bool):
        """The stored CPU tensor of (component, epoch, step), or None."""
        ent = self._epoch(key, name, epoch)
        if ent is not None:
            off = ent["offsets"]
            if step + 1 >= off.numel():
                return None
            a, b = int(off[step]), int(off[step + 1])
            if check and not torch.equal(ent["idx"][a:b], idx.to("cpu")):
                raise RuntimeError(f"teacher cache entry {name} epoch {epoch} step {step} is for other "
                                   f"samples; delete the cache folder {self.root} and re-run")
            return ent["data"][a:b]
        pend = self.pending.get((key, epoch))
        if pend is not None and step in pend:
            i, d = pend[step]
            if check and not torch.equal(i, idx.to("cpu")):
                raise RuntimeError(f"teacher cache entry {name} epoch {epoch} step {step} is for other samples")
            return d
        return None

    # -- write ---------------------------------------------------------------------------------
    def put(self, key: str, name: str, meta: dict, epoch: int, step: int, steps: int,
            idx: torch.Tensor, data: torch.Tensor) -> None:
        if self._epoch(key, name, epoch) is not None:
            return
        pend = self.pending.setdefault((key, epoch), {})
        pend[step] = (idx.to("cpu"), data.to("cpu"))
        if len(pend) == steps and all(s in pend for s in range(steps)):
            self._finish(key, name, meta, epoch, steps)

    def _finish(self, key, name, meta, epoch, steps):
        pend = self.pending.pop((key, epoch))
        idx = torch.cat([pend[s][0] for s in range(steps)])
        data = torch.cat([pend[s][1] for s in range(steps)])
        sizes = torch.tensor([0] + [pend[s][0].numel() for s in range(steps)])
        ent = {"data": data, "idx": idx, "offsets": sizes.cumsum(0)}
        nbytes = data.numel() * data.element_size() + idx.numel() * 8
        if self.root is None or self.held_bytes + nbytes <= self.memory_bytes:
            self.done[(key, epoch)] = ent
            self.held_bytes += nbytes
            return
        p = self._path(key, name, epoch)
        p.parent.mkdir(parents=True, exist_ok=True)
        keyfile = p.parent / "key.json"
        if not keyfile.exists():
            keyfile.write_text(json.dumps(meta, indent=2, default=str))
        tmp = p.with_suffix(".tmp")
        torch.save(ent, tmp)
        os.replace(tmp, p)
        self.done[(key, epoch)] = torch.load(p, map_location="cpu", mmap=True, weights_only=True)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "memory_mb": self.held_bytes / 2**20,
                "root": str(self.root) if self.root else None}


class TeacherCache:
    """A run's ``teacher_source``: ``(x, y, idx, epoch, step) -> (t_logits, t_feats, masks)``
    served from a :class:`TeacherStore`, misses computed with ``live`` (a ``LiveTeacher`` whose
    ``round_to`` is the storage dtype, so hits and misses return identical values).

    ``base_key`` is a dict of everything the outputs depend on besides the component (see
    :func:`trainer_key`); ``steps`` is the number of batches per epoch.
    """

    def __init__(self, live, store: TeacherStore, base_key: dict, steps: int):
        self.live = live
        self.store = store
        self.steps = int(steps)
        self.dtype = live.round_to or torch.float32
        self.base = dict(base_key, precision=str(self.dtype))
        mask_cfg = live.mask_cfg.model_dump() if hasattr(live.mask_cfg, "model_dump") else live.mask_cfg
        self.comps = [("logits", {})]
        self.comps += [(f"feat:{l}", {"layer": l}) for l in live.layers]
        self.comps += [(f"mask:{l}", {"layer": l, "mask": mask_cfg}) for l in live.mask_layers]
        self.meta = {name: dict(self.base, component=name, **extra) for name, extra in self.comps}
        self.keys = {name: _hash(m) for name, m in self.meta.items()}
        self.check = True

    def __call__(self, x, y, idx=None, epoch=0, step=0):
        if idx is None:
            raise ValueError("TeacherCache needs the batch indices (idx); use LiveTeacher otherwise")
        check = x.device.type == "cpu" or step == 0  # no host-device sync per step on GPUs
        got = {}
        for name, _ in self.comps:
            v = self.store.get(self.keys[name], name, epoch, step, idx, check)
            if v is not None:
                got[name] = v
        missing = [name for name, _ in self.comps if name not in got]
        if missing:
            self.store.misses += 1
            new = self._compute(x, y, missing)
            for name, v in new.items():
                self.store.put(self.keys[name], name, self.meta[name], epoch, step, self.steps, idx,
                               v.to(self.dtype))
            got.update(new)
        else:
            self.store.hits += 1
        dev = x.device

        def out(name):
            v = got[name]
            return v.to(dev, non_blocking=True).float() if v.device != dev or v.dtype != torch.float32 else v

        logits = out("logits")
        feats = {l: out(f"feat:{l}") for l in self.live.layers}
        masks = {l: out(f"mask:{l}") for l in self.live.mask_layers}
        return logits, feats, masks

    def _compute(self, x, y, names: list[str]) -> dict:
        """The live teacher's (rounded) values of the named components only."""
        live = self.live
        layers = [n.split(":", 1)[1] for n in names if n.startswith("feat:")]
        mlayers = [n.split(":", 1)[1] for n in names if n.startswith("mask:")]
        out = {}
        if "logits" in names or layers:
            logits, feats = live.forward(x, layers)
            out["logits"] = logits
            out.update({f"feat:{l}": feats[l] for l in layers})
        if mlayers:
            out.update({f"mask:{l}": m for l, m in live.masks(x, y, mlayers).items()})
        return out


def trainer_key(trainer) -> dict:
    """Everything a run's teacher outputs depend on, besides layer / mask config and precision."""
    from kdlab.core.checkpoint import file_hash

    ld = trainer.train_loader
    tc = trainer.recipe.teacher
    ckpt = tc.checkpoint if tc is not None else None
    d = trainer.recipe.data
    return {
        "version": 1,
        "dataset": d.name, "val_fraction": d.val_fraction, "label_fraction": d.label_fraction,
        "train_data": tensor_fingerprint(ld.x, ld.y),
        "loader_seed": ld.seed, "batch_size": ld.batch_size, "shuffle": ld.shuffle,
        "drop_last": ld.drop_last, "augment": repr(ld.augment),
        "mean": None if ld.mean is None else ld.mean.flatten().tolist(),
        "std": None if ld.std is None else ld.std.flatten().tolist(),
        "rank": ld.rank, "world": ld.world_size,
        "teacher_weights": module_fingerprint(trainer.teacher_source.teacher),
        "teacher_checkpoint": file_hash(ckpt) if ckpt and Path(ckpt).is_file() else None,
        "device": trainer.device.type,
    }


def attach_cache(trainer, store: TeacherStore) -> None:
    """Wrap the trainer's live teacher source in a :class:`TeacherCache` (cache-* modes only)."""
    from kdlab.train.trainer import LiveTeacher

    if not isinstance(trainer.teacher_source, LiveTeacher):
        return
    if trainer.cfg.teacher_mode not in PRECISIONS:
        return
    trainer.teacher_source = TeacherCache(trainer.teacher_source, store, trainer_key(trainer),
                                          len(trainer.train_loader))
