"""Teacher sources: what a training step knows about the teacher(s), behind one protocol.

A :class:`TeacherSource` is called as ``source(x, y, idx, epoch, step) -> TeacherOutputs`` (logits,
tapped features by layer, causal masks by layer). Two implementations:

* :class:`LiveTeacher` runs the teacher on every batch (features without gradients; masks need
  gradients w.r.t. the teacher's activations only);
* :class:`CachedTeacher` serves the outputs from a study-wide :class:`TeacherStore` and computes
  only what is missing with its live teacher.

:func:`teacher_plan` is the only interpreter of ``train.teacher_mode`` and
:func:`build_teacher_source` the only place a source is made (``kdlab.train.build`` calls it, for
the recipe's teacher and for the extra teachers of ``mtkd``, with the plan it computed once;
``mask.reuse: per-image`` included).

**The teacher cache.** A study is paired: every method of seed k sees the same data order and the
same augmentation draws (the loader seed is ``derive_seed(k, "data")``), so the teacher's logits,
tapped features and causal masks for batch (epoch e, step s) are the same for every method of that
seed. A :class:`TeacherStore` (one per study) holds them. Entries are stored per *component*
(``logits``, ``feat:<layer>``, ``mask:<layer>``), so KD fills the logits, KD+align adds the features
and masks, and the full method reuses all of them. Each component's key hashes everything its values
depend on (:func:`cache_key`): data set and split (a content fingerprint of the training tensors),
loader seed, batch size, shuffle, augmentation spec, normalisation, shard (rank/world), teacher
weights (state-dict hash, plus the checkpoint file hash when known), device type, storage precision,
the layer, and for masks the mask config. A different key is a different entry, so a stale cache is
never used; each stored epoch also keeps the batch indices, which are checked on use.

Precision: values are stored in fp16 (``teacher_mode: cache-fp16``, the default) or fp32
(``cache-fp32``). To make losses *exactly* equal with and without the cache, the live path of a
``cache-*`` run rounds the teacher outputs through the same precision (``LiveTeacher(round_to=)``).
Binary masks are exact in fp16; logits and features change by at most one fp16 rounding (2^-11).
A finite value beyond fp16's range (65504) is refused with one line naming the fix (cache-fp32).

Storage: completed epochs stay in memory while the store holds less than ``memory_mb``; beyond
that (and only when the store has a ``root`` folder) they are written to
``<root>/<component>-<key>/e<epoch>.pt`` and read back memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Protocol

import torch
from torch import nn

from kdlab.core.io import atomic_write_text
from kdlab.distill.masks import causal_masks
from kdlab.models.taps import Taps


class TeacherOutputs(NamedTuple):
    """A teacher's outputs for one batch (fp32 tensors on the batch's device)."""

    logits: Optional[torch.Tensor]
    feats: dict
    masks: dict


class TeacherSource(Protocol):
    """``(x, y, idx, epoch, step) -> TeacherOutputs``; ``teacher`` is the underlying frozen model."""

    teacher: nn.Module

    def __call__(self, x, y, idx=None, epoch: int = 0, step: int = 0) -> TeacherOutputs: ...


@dataclass(frozen=True)
class TeacherPlan:
    """What ``train.teacher_mode`` means: the storage precision of the outputs (None: fp32 live,
    unrounded), whether a study's store may serve them, and whether each method draws its own
    augmentation (``consistent``)."""

    round_to: Optional[torch.dtype]
    cached: bool
    fresh_augmentation: bool


def teacher_plan(mode: str) -> TeacherPlan:
    """Interpret ``train.teacher_mode`` (``cache-fp16 | cache-bf16 | cache-fp32 | live | consistent``)."""
    plans = {
        "cache-fp16": TeacherPlan(torch.float16, True, False),
        "cache-bf16": TeacherPlan(torch.bfloat16, True, False),
        "cache-fp32": TeacherPlan(torch.float32, True, False),
        "live": TeacherPlan(None, False, False),
        "consistent": TeacherPlan(None, False, True),
    }
    if mode not in plans:
        raise ValueError(f"train.teacher_mode '{mode}' is not one of {', '.join(plans)}")
    return plans[mode]


class _StopForward(Exception):
    """Raised by a hook to end a teacher forward after its deepest tapped layer."""


class LiveTeacher:
    """Runs the teacher on every batch: logits and tapped features without gradients, and the
    causal masks (which need gradients w.r.t. the teacher's activations only)."""

    def __init__(self, teacher: nn.Module, layers: list[str], mask_layers: list[str], mask_cfg,
                 round_to: Optional[torch.dtype] = None, compile: bool = False, amp: str = "none"):
        self.teacher = teacher.eval()
        self.amp = amp  # train.amp: the forward (logits, features) under autocast; masks stay fp32
        self._single_call: dict = {}  # layers -> each ran once in a full forward (see features)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.layers = list(layers)
        self.mask_layers = list(mask_layers)
        self.mask_cfg = mask_cfg
        self.round_to = round_to  # outputs rounded through this dtype (as a teacher cache stores them)
        self._overflow: Optional[torch.Tensor] = None  # GPU: did an fp16 rounding overflow?
        self._overflow_what = "outputs"
        self.mask_time_s = 0.0  # seconds spent in :meth:`masks` (IG / gradient x activation)
        # train.compile: the logits-only forward is compiled (a tapped forward runs eagerly: its
        # hooks are attached per call, which a compiled graph would recompile for)
        self.runner = self.teacher
        if compile and not self.layers and not self.mask_layers:
            from kdlab.models.compiled import Compiled

            self.runner = Compiled(self.teacher, "teacher")

    def _out(self, t: torch.Tensor, what: str = "outputs") -> torch.Tensor:
        # outside inference mode: a normal fp32 tensor that autograd may save, in the contiguous
        # layout losses expect (a channels-last teacher's maps), made by one copy (exact)
        if self.round_to is None:
            return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        r = t.to(self.round_to, memory_format=torch.contiguous_format)
        if self.round_to == torch.float16:  # finite values fp16 cannot hold (|v| > 65504) become inf
            over = (torch.isinf(r) & torch.isfinite(t)).any()
            if t.device.type == "cpu":
                if bool(over):
                    raise ValueError(self._range_message(what, float(t[torch.isfinite(t)].abs().max())))
            else:  # no host-device sync per step: remembered, read when the loss turns non-finite
                self._overflow = over if self._overflow is None else (self._overflow | over)
                self._overflow_what = what
        return r.float()

    @staticmethod
    def _range_message(what: str, big: Optional[float] = None) -> str:
        reach = f"reach {big:.4g}, beyond" if big is not None else "exceed"
        return (f"the teacher's {what} {reach} float16's range (65504): the teacher cache "
                f"(train.teacher_mode: cache-fp16, the default) stores them as inf; set "
                f"train.teacher_mode=cache-fp32 (or live), or use a better-trained teacher")

    def range_error(self) -> Optional[str]:
        """The one-line reason when an output rounded to fp16 overflowed on a GPU (checked lazily
        there; on the CPU it raises at once), else None."""
        if self._overflow is not None and bool(self._overflow):
            return self._range_message(self._overflow_what)
        return None

    def forward(self, x, layers) -> tuple[torch.Tensor, dict]:
        """Logits and the tapped outputs of ``layers`` (rounded like stored values)."""
        with torch.inference_mode(), self._autocast(x), Taps(self.teacher, layers, detach=True) as taps:
            logits = self.runner(x) if not layers else self.teacher(x)
            feats = {n: taps[n] for n in layers}
        return self._out(logits, "logits"), {n: self._out(f, f"{n} outputs") for n, f in feats.items()}

    def features(self, x, layers) -> dict:
        """The tapped outputs of ``layers`` only (no logits): the forward stops once every tapped
        layer has produced its output (the layers after the deepest one do not run). Safe where each
        tapped module runs once per forward: the first call runs the whole model and counts the
        calls; a model that calls a tapped module twice (weight sharing, recurrence) always runs
        whole, since its last output is the one a full forward would tap."""
        layers = list(dict.fromkeys(layers))
        mods = dict(self.teacher.named_modules())
        calls = {n: 0 for n in layers}
        stop = self._single_call.get(tuple(layers), False)

        def hook(name):
            def fn(_m, _i, _o):
                calls[name] += 1
                if stop and all(calls[n] > 0 for n in layers):
                    raise _StopForward
            return fn

        handles = []
        try:
            with torch.inference_mode(), self._autocast(x), Taps(self.teacher, layers, detach=True) as taps:
                handles = [mods[n].register_forward_hook(hook(n)) for n in layers]  # after the taps' hooks
                try:
                    self.teacher(x)
                except _StopForward:
                    pass
                feats = {n: taps[n] for n in layers}
        finally:
            for h in handles:
                h.remove()
        if tuple(layers) not in self._single_call:
            self._single_call[tuple(layers)] = all(c == 1 for c in calls.values())
        return {n: self._out(f, f"{n} outputs") for n, f in feats.items()}

    def _autocast(self, x):
        import contextlib

        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def masks(self, x, y, layers) -> dict:
        """Causal masks at ``layers`` (see :mod:`kdlab.distill.masks`), explaining the label, or
        for unlabelled samples (``y < 0``, transfer sets) the teacher's own top class."""
        if not layers:
            return {}
        t0 = time.perf_counter()
        if bool((y < 0).any()):
            with torch.inference_mode():
                top = self.teacher(x).argmax(dim=1)
            y = torch.where(y >= 0, y, top.clone())
        out = {n: self._out(m) for n, m in causal_masks(self.teacher, x, y, layers, self.mask_cfg).items()}
        self.mask_time_s += time.perf_counter() - t0
        return out

    def __call__(self, x, y, idx=None, epoch=0, step=0) -> TeacherOutputs:
        logits, feats = self.forward(x, self.layers)
        return TeacherOutputs(logits, feats, self.masks(x, y, self.mask_layers))



def load_cache_file(path: Path, root) -> dict:
    """One stored epoch of a teacher cache (memory-mapped); a truncated, empty or foreign file
    raises one line naming it and the fix."""
    try:
        ent = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torn zip, zero bytes, garbage: torch's messages name no file
        raise ValueError(f"teacher cache file {path} is corrupt ({type(e).__name__}); delete the cache "
                         f"folder {root} and re-run (it is rebuilt)") from None
    if not (isinstance(ent, dict) and {"data", "idx", "offsets"} <= set(ent)):
        raise ValueError(f"teacher cache file {path} is not a kdlab cache entry; delete the cache folder "
                         f"{root} and re-run (it is rebuilt)")
    return ent


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


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def module_fingerprint(model: torch.nn.Module) -> str:
    """A content hash of the model's state dict. Remembered per model while its tensors are
    unchanged (the same version counters: an optimiser step or ``load_state_dict`` bumps them),
    so a study's runs hash their shared teacher once."""
    state = sorted(model.state_dict().items())
    versions = tuple((k, v._version, v.data_ptr()) for k, v in state)
    try:
        memo = _FINGERPRINTS.get(model)
    except TypeError:  # not weak-referenceable
        memo = None
    if memo is not None and memo[0] == versions:
        return memo[1]
    digest = tensor_fingerprint(*[v for _, v in state])
    try:
        _FINGERPRINTS[model] = (versions, digest)
    except TypeError:
        pass
    return digest


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
        self.fill_time_s = 0.0  # seconds spent computing teacher outputs on misses (the cache's cost)
        self.expected_layers: list[str] = []  # layers whose features the study's runs will ask for

    def expect(self, layers) -> None:
        """Announce teacher layers whose tapped features some run sharing this store will ask for.

        A run whose forward pass misses a batch then also taps these layers (those the teacher
        has) in that same pass and stores them, so a later run that needs them (``kd+align``
        after ``kd``) finds them instead of running the teacher again: one teacher forward per
        batch and seed instead of one per distinct set of layers. Stored values are those the
        later run would compute itself (same batch, same teacher, same rounding)."""
        for layer in layers:
            if layer not in self.expected_layers:
                self.expected_layers.append(layer)

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
                ent = load_cache_file(p, self.root)
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
            atomic_write_text(keyfile, json.dumps(meta, indent=2, default=str))
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")  # one writer per file name
        torch.save(ent, tmp)
        os.replace(tmp, p)
        self.done[(key, epoch)] = load_cache_file(p, self.root)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "memory_mb": self.held_bytes / 2**20,
                "fill_time_s": self.fill_time_s, "root": str(self.root) if self.root else None}


class CachedTeacher:
    """A run's ``teacher_source``: ``(x, y, idx, epoch, step) -> (t_logits, t_feats, masks)``
    served from a :class:`TeacherStore`, misses computed with ``live`` (a ``LiveTeacher`` whose
    ``round_to`` is the storage dtype, so hits and misses return identical values).

    ``base_key`` is a dict of everything the outputs depend on besides the component (see
    :func:`cache_key`); ``steps`` is the number of batches per epoch.
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
            raise ValueError("CachedTeacher needs the batch indices (idx); use LiveTeacher otherwise")
        check = x.device.type == "cpu" or step == 0  # no host-device sync per step on GPUs
        got = {}
        for name, _ in self.comps:
            v = self.store.get(self.keys[name], name, epoch, step, idx, check)
            if v is not None:
                got[name] = v
        missing = [name for name, _ in self.comps if name not in got]
        if missing:
            self.store.misses += 1
            if any(not n.startswith("mask:") for n in missing):  # a forward pass runs anyway
                missing += [n for n in self._expected()
                            if self.store.get(self.keys[n], n, epoch, step, idx, check) is None]
            t0 = time.perf_counter()
            new = self._compute(x, y, missing)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            self.store.fill_time_s += time.perf_counter() - t0
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

        return TeacherOutputs(out("logits"), {l: out(f"feat:{l}") for l in self.live.layers},
                              {l: out(f"mask:{l}") for l in self.live.mask_layers})

    def range_error(self) -> Optional[str]:
        """See :meth:`LiveTeacher.range_error` (the outputs this source computed)."""
        return self.live.range_error()

    def _expected(self) -> list[str]:
        """``feat:<layer>`` of the store's expected layers this source does not tap itself (and
        the teacher has), with their keys registered."""
        names = dict(self.live.teacher.named_modules())
        out = []
        for layer in self.store.expected_layers:
            name = f"feat:{layer}"
            if layer in self.live.layers or layer not in names:
                continue
            if name not in self.keys:
                self.meta[name] = dict(self.base, component=name, layer=layer)
                self.keys[name] = _hash(self.meta[name])
            out.append(name)
        return out

    @property
    def teacher(self) -> nn.Module:
        return self.live.teacher

    @property
    def mask_time_s(self) -> float:
        """Seconds this source spent computing masks (on cache misses; hits cost none)."""
        return self.live.mask_time_s

    def _compute(self, x, y, names: list[str]) -> dict:
        """The live teacher's (rounded) values of the named components only."""
        live = self.live
        layers = [n.split(":", 1)[1] for n in names if n.startswith("feat:")]
        mlayers = [n.split(":", 1)[1] for n in names if n.startswith("mask:")]
        out = {}
        if "logits" in names:
            logits, feats = live.forward(x, layers)
            out["logits"] = logits
            out.update({f"feat:{l}": feats[l] for l in layers})
        elif layers:  # the logits are stored already: the forward stops after the deepest tapped layer
            out.update({f"feat:{l}": f for l, f in live.features(x, layers).items()})
        if mlayers:
            out.update({f"mask:{l}": m for l, m in live.masks(x, y, mlayers).items()})
        return out


def cache_key(loader, teacher: nn.Module, *, dataset: dict, checkpoint: Optional[str],
              device: torch.device) -> dict:
    """Everything a run's teacher outputs depend on, besides layer / mask config and precision:
    ``loader`` (a sharded or whole :class:`kdlab.data.BatchLoader`), the teacher, the data section
    (``name``, ``val_fraction``, ``label_fraction``), the teacher checkpoint file and the device."""
    from kdlab.core.checkpoint import file_hash

    ld = loader
    return {
        "version": 1,
        "dataset": dataset.get("name"), "val_fraction": dataset.get("val_fraction"),
        "label_fraction": dataset.get("label_fraction"),
        "train_data": ld.fingerprint() if hasattr(ld, "fingerprint") else tensor_fingerprint(ld.x, ld.y),
        "loader_seed": ld.seed, "batch_size": ld.batch_size, "shuffle": ld.shuffle,
        "drop_last": ld.drop_last, "augment": repr(ld.augment),
        "mean": None if ld.mean is None else ld.mean.flatten().tolist(),
        "std": None if ld.std is None else ld.std.flatten().tolist(),
        "rank": ld.rank, "world": ld.world_size,
        "teacher_weights": module_fingerprint(teacher),
        "teacher_checkpoint": file_hash(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "device": device.type,
    }


_FOLDED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def fast_teacher(teacher: nn.Module, keep=(), channels_last: bool = False, fold: bool = True) -> nn.Module:
    """The copy of a frozen teacher that a teacher source runs: BatchNorm folded into the preceding
    convolutions (:func:`kdlab.models.fold.fold_batchnorm`; layers in ``keep`` -- tapped or masked --
    keep their own outputs), optionally channels-last. The teacher itself is never edited. One
    copy per (teacher, layers, layout) is kept while the teacher lives, so a study's runs share it.
    A model that cannot be traced runs unfolded (one line on stderr says why). ``fold=False``: an
    unfolded copy (``train.fast_teacher: false`` with ``train.channels_last: true``: the teacher
    in channels-last, as loaded otherwise)."""
    import copy
    import sys

    from kdlab.models.fold import fold_batchnorm

    key = (tuple(sorted(set(keep))) if fold else None, bool(channels_last), bool(fold))
    memo = _FOLDED.setdefault(teacher, {})
    # in-place updates (an optimizer step, load_state_dict) bump tensors' version counters
    versions = tuple(t._version for t in list(teacher.parameters()) + list(teacher.buffers()))
    if key not in memo or memo[key][0] != versions:
        if fold:
            folded = fold_batchnorm(teacher, keep)
            if folded.reason:
                print(f"kdlab: teacher not folded: {folded.reason}; it runs as it is", file=sys.stderr)
            model = folded.model
        else:
            try:
                model = copy.deepcopy(teacher).eval()
            except Exception:  # noqa: BLE001 - a model that cannot be copied runs as it is
                return teacher
            for p in model.parameters():
                p.requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        memo[key] = (versions, model)
    return memo[key][1]


def build_teacher_source(teacher: nn.Module, *, plan: TeacherPlan, layers=(), mask_layers=(), mask_cfg=None,
                         store: Optional[TeacherStore] = None, loader=None, dataset: Optional[dict] = None,
                         checkpoint: Optional[str] = None, device=None, fast: bool = True,
                         channels_last: bool = False, compile: bool = False, amp: str = "none") -> TeacherSource:
    """The teacher source of a run (the only constructor of one): live, or served from ``store``
    when ``plan`` (:func:`teacher_plan`, computed once by the caller) caches and a store and the
    training ``loader`` (whose batches it keys) are given.

    ``mask.reuse: per-image`` (``mask_cfg.reuse``, with mask layers and a training loader): the
    source is built without mask layers and its masks come from each image's stored importance
    map mapped to the view (:func:`kdlab.distill.mask_reuse.per_image_source`; maps saved beside
    the store's files when it has a folder).

    ``fast`` (``train.fast_teacher``, off by default until measured): the source runs :func:`fast_teacher`'s copy of
    the teacher (BatchNorm folded, exact up to float rounding); ``channels_last``: that copy runs in
    channels-last (without ``fast``: an unfolded channels-last copy). Cache keys and per-image masks use the original teacher (same values).
    ``compile`` (``train.compile``): the teacher's logits-only forward runs through ``torch.compile``;
    ``amp`` (``train.amp``): the teacher's forward runs under autocast (bf16 / fp16) like the student's."""
    reuse = getattr(mask_cfg, "reuse", "per-view") == "per-image" and bool(mask_layers) and loader is not None
    runner = teacher
    if fast:
        keep = list(layers) + list(mask_layers) + list(getattr(store, "expected_layers", []))
        runner = fast_teacher(teacher, keep, channels_last=channels_last)
    elif channels_last:  # the teacher as loaded, in channels-last like the student (a copy)
        runner = fast_teacher(teacher, channels_last=True, fold=False)
    live = LiveTeacher(runner, list(layers), [] if reuse else list(mask_layers), mask_cfg, round_to=plan.round_to,
                       compile=compile, amp=amp)
    source = live
    if plan.cached and store is not None and loader is not None and getattr(loader, "indexed", True):
        device = torch.device(device) if device is not None else next(teacher.parameters()).device
        key = cache_key(loader, teacher, dataset=dataset or {}, checkpoint=checkpoint, device=device)
        source = CachedTeacher(live, store, key, len(loader))
    if not reuse:
        return source
    from kdlab.distill.mask_reuse import per_image_source

    return per_image_source(source, teacher, mask_layers, loader, mask_cfg, getattr(store, "root", None))
