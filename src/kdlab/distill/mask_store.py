"""`MaskStore`: the causal-mask importance maps of un-augmented training images, computed once
per teacher.

A store belongs to one teacher (the hash of its state dict: weights and buffers) and one set of
attribution settings (``method``, ``steps``, ``rule``, ``reduce``). It holds, per teacher layer,
one importance map [h, w] per image (:func:`kdlab.distill.masks.importance_maps`: ``|S|`` or
``max(S, 0)`` before the top-q / normalisation step, so one store serves every ``q`` and
``kind``), keyed by the image's content (a BLAKE2b digest of its pixel bytes): the same image gets
the same stored map in every epoch, seed (the seeds' splits pick different images from the same
pool; a shared image is found by content) and method of a study. Asked for maps with another
teacher it raises ``ValueError`` (one line); other settings are another store (its file name
carries the key).

Maps are computed on demand (:meth:`MaskStore.maps`: what is missing is computed on the
un-augmented images, one batched pass per batch) and kept on the CPU in ``dtype`` (float32 by
default). With a ``root`` folder, :meth:`MaskStore.save` writes ``<root>/masks-<key>.pt``
atomically and a new store with the same key loads it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdlab.distill.masks import DEFAULT_RULE, importance_maps

SETTINGS = ("method", "steps", "rule", "reduce")


def weight_hash(model: nn.Module) -> str:
    """SHA-256 (first 20 hex digits) of a model's state dict: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def image_keys(x: torch.Tensor) -> list[bytes]:
    """One 16-byte BLAKE2b digest per image of ``x`` [N, ...] (its dtype, shape and bytes)."""
    x = x.detach().to("cpu").contiguous()
    head = f"{x.dtype}:{tuple(x.shape[1:])}".encode()
    flat = x.reshape(x.shape[0], -1).view(torch.uint8).numpy()
    return [hashlib.blake2b(head + row.tobytes(), digest_size=16).digest() for row in flat]


def mask_settings(cfg) -> dict:
    """The settings an importance map depends on, from a recipe's ``mask`` section (or a dict)."""
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    out = {k: get(k) for k in SETTINGS}
    if out["rule"] is None:
        out["rule"] = DEFAULT_RULE
    if out["method"] == "grad":  # grad × activation has no steps nor rule
        out["steps"], out["rule"] = None, None
    return out


class _Cfg:
    def __init__(self, d: dict):
        self.__dict__.update(d)


class MaskStore:
    """Importance maps of un-augmented images for one teacher and one set of settings (module doc).

    Args:
        teacher: the teacher (its weight hash is taken now; the store refuses any other teacher).
        cfg: a recipe's ``mask`` section (`MaskCfg`) or a dict with its keys.
        root: folder for :meth:`save` / loading (None: memory only).
        dtype: storage dtype.
    """

    def __init__(self, teacher: nn.Module, cfg, root: Optional[str | os.PathLike] = None,
                 dtype: torch.dtype = torch.float32):
        self.teacher_hash = weight_hash(teacher)
        self.settings = mask_settings(cfg)
        blob = json.dumps({"teacher": self.teacher_hash, "mask": self.settings}, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.root = Path(root) if root is not None else None
        self.dtype = dtype
        self._checked = {id(teacher)}
        self.rows: dict[str, dict[bytes, int]] = {}
        self.data: dict[str, torch.Tensor] = {}
        self.computed = 0  # maps computed (images x layers)
        self.served = 0    # maps served from the store
        self.compute_time_s = 0.0  # seconds spent computing the maps
        self.dirty = False
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    @property
    def path(self) -> Optional[Path]:
        return None if self.root is None else self.root / f"masks-{self.key}.pt"

    # -- teacher check ----------------------------------------------------------------------------
    def check_teacher(self, teacher: nn.Module) -> None:
        """Raise ValueError unless ``teacher`` has this store's weight hash (checked once per object)."""
        if id(teacher) in self._checked:
            return
        h = weight_hash(teacher)
        if h != self.teacher_hash:
            raise ValueError(f"this mask store holds maps of teacher {self.teacher_hash}, not of teacher {h}; "
                             f"make a new MaskStore for this teacher")
        self._checked.add(id(teacher))

    # -- lookup / fill ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def _add(self, layer: str, keys: list[bytes], masks: torch.Tensor) -> None:
        rows = self.rows.setdefault(layer, {})
        masks = masks.detach().to("cpu", self.dtype)
        old = self.data.get(layer)
        need = len(rows) + len(keys)
        if old is None or old.shape[0] < need:
            cap = max(need, 2 * (0 if old is None else old.shape[0]), 64)
            new = torch.zeros((cap, *masks.shape[1:]), dtype=self.dtype)
            if old is not None:
                new[: len(rows)] = old[: len(rows)]
            self.data[layer] = old = new
        start = len(rows)
        old[start:start + len(keys)] = masks
        for i, k in enumerate(keys):
            rows[k] = start + i
        self.dirty = True

    def maps(self, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, keys: list[bytes],
             layers) -> dict:
        """Importance maps ``{layer: [B, h, w]}`` (float32, on ``x``'s device) of the
        un-augmented, normalised images ``x`` with labels ``y`` and content keys ``keys``
        (:func:`image_keys`); those not stored yet are computed with ``teacher`` (in one batch)
        and stored."""
        self.check_teacher(teacher)
        if len(keys) != x.shape[0]:
            raise ValueError(f"MaskStore.maps: {len(keys)} keys for {x.shape[0]} images")
        out = {}
        missing_by_layer = {}
        for layer in layers:
            rows = self.rows.get(layer, {})
            missing_by_layer[layer] = [i for i, k in enumerate(keys) if k not in rows]
        need = sorted({i for m in missing_by_layer.values() for i in m})
        if need:
            todo = [l for l in layers if missing_by_layer[l]]
            sel = torch.tensor(need, device=x.device)
            t0 = time.perf_counter()
            new = importance_maps(teacher, x[sel], y[sel], todo, _Cfg(self.settings))
            self.compute_time_s += time.perf_counter() - t0
            for layer, m in new.items():
                have = self.rows.get(layer, {})
                pick = [j for j, i in enumerate(need) if keys[i] not in have]
                # a key may repeat inside a batch: store it once
                seen, uniq = set(), []
                for j in pick:
                    if keys[need[j]] not in seen:
                        seen.add(keys[need[j]])
                        uniq.append(j)
                self._add(layer, [keys[need[j]] for j in uniq], m[uniq])
                self.computed += len(uniq)
        for layer in layers:
            rows = self.rows[layer]
            r = torch.tensor([rows[k] for k in keys], dtype=torch.int64)
            out[layer] = self.data[layer][r].to(device=x.device, dtype=torch.float32)
        self.served += len(keys) * len(layers) - sum(len(m) for m in missing_by_layer.values())
        return out

    # -- disk -------------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        """Write the store to ``<root>/masks-<key>.pt`` (atomic); returns the path (None: no root)."""
        if self.path is None:
            return None
        if not self.dirty and self.path.is_file():
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ent = {"teacher": self.teacher_hash, "settings": self.settings, "layers": {}}
        for layer, rows in self.rows.items():
            keys = list(rows)
            idx = torch.tensor([rows[k] for k in keys], dtype=torch.int64)
            ent["layers"][layer] = {"keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8)
                                    .view(-1, 16), "masks": self.data[layer][idx].clone()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(ent, tmp)
        os.replace(tmp, self.path)
        self.dirty = False
        return self.path

    def _load(self, path: Path) -> None:
        ent = torch.load(path, map_location="cpu", weights_only=True)
        if ent.get("teacher") != self.teacher_hash:
            raise ValueError(f"mask store file {path} holds maps of teacher {ent.get('teacher')}, not of "
                             f"teacher {self.teacher_hash}; delete it or use another mask store folder")
        if ent.get("settings") != self.settings:
            raise ValueError(f"mask store file {path} was made with settings {ent.get('settings')}, "
                             f"not {self.settings}; delete it or use another mask store folder")
        for layer, d in ent["layers"].items():
            keys = [bytes(r) for r in d["keys"].numpy()]
            self._add(layer, keys, d["masks"])
        self.dirty = False

    def stats(self) -> dict:
        return {"key": self.key, "teacher": self.teacher_hash, "maps": len(self),
                "computed": self.computed, "served": self.served, "compute_time_s": self.compute_time_s,
                "path": str(self.path) if self.path else None}


_SHARED: dict[tuple, MaskStore] = {}


def save_at_exit(store: MaskStore) -> None:
    """The ``atexit`` save of a shared store: a Ctrl-C during it ends quietly (the file is replaced
    atomically, so the old one stays; lost maps are recomputed), a failed write is one warning line."""
    try:
        store.save()
    except KeyboardInterrupt:
        pass
    except OSError as e:
        import sys

        print(f"kdlab: warning: mask store {store.path} not saved ({e.strerror or e}); its maps are "
              f"recomputed next time", file=sys.stderr)


def shared_store(teacher: nn.Module, cfg, root: Optional[str | os.PathLike] = None) -> MaskStore:
    """The process's one `MaskStore` for (teacher weights, settings, root): every run of a study
    in this process (its methods and seeds) gets the same store, so each image's map is computed
    once per teacher. Hashes the teacher's weights (once per call)."""
    key = (weight_hash(teacher), json.dumps(mask_settings(cfg), sort_keys=True), str(root))
    if key not in _SHARED:
        _SHARED[key] = MaskStore(teacher, cfg, root)
        if root is not None:  # written once, when the process ends (lost maps are recomputed)
            atexit.register(save_at_exit, _SHARED[key])
    store = _SHARED[key]
    store.check_teacher(teacher)
    return store
