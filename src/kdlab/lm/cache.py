"""Sparse teacher cache: the teacher's top-k log-probabilities per token, plus its tail mass.

For every training batch (epoch e, step s) of a seeded :class:`kdlab.lm.corpora.WindowLoader`,
the teacher's next-token distribution P at each position is stored as

* ``idx``  ``[steps, B, T, k]``: the k most probable ids (int16 when the vocabulary fits, else int32),
* ``logp`` ``[steps, B, T, k]``: their log-probabilities log p_i (fp16),
* ``log_tail`` ``[steps, B, T]``: log r, r = Σ_{v ∉ top k} p_v the mass of all other ids, computed
  as a log-sum-exp over those ids (exact even for r ≪ 1e-7; fp16, floored at −80 only when empty),

one file per epoch, ``<root>/<key>/e<epoch>.pt``. The key hashes everything the values depend on:
the teacher's weights, the token stream, ``seq_len``, batch size, steps per epoch, loader seed,
``k`` and the temperature (1). A different key is a different folder, so a stale cache is never used.

Size: ``k·(s + 2) + 2`` bytes per token, s = 2 (int16 ids) when V ≤ 32,767 and s = 4 (int32 ids)
above, against ``V·2`` for dense fp16 logits (V the vocabulary): :func:`payload_bytes_per_token`;
:meth:`SparseTeacherCache.size_report` gives both and what is on disk. Error: the student is trained on the k+1
buckets (:func:`kdlab.lm.losses.bucket_logprobs`); :func:`sparse_kl_error` measures how much of the
teacher's distribution is lost, KL(P ‖ P̂) with P̂ the top-k plus the tail spread uniformly,
which is at most r·log(V − k) per token.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from kdlab.core.checkpoint import atomic_save
from kdlab.core.io import write_json
from kdlab.lm.losses import tail_logsumexp


INT16_MAX_VOCAB = 32767


def id_dtype(vocab_size: int) -> torch.dtype:
    """int16 while every id fits (V ≤ 32,767), else int32."""
    return torch.int16 if vocab_size <= INT16_MAX_VOCAB else torch.int32


def payload_bytes_per_token(k: int, vocab_size: int) -> int:
    """Bytes the cache stores per token: k ids (2 or 4 bytes, :func:`id_dtype`), k fp16
    log-probabilities and one fp16 log tail mass: k·(s + 2) + 2."""
    s = 2 if id_dtype(vocab_size) == torch.int16 else 4
    return k * (s + 2) + 2


def state_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model's state dict (exact bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def topk_entry(t_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log p of the top k, log of the tail mass r = 1 − Σ top-k p) of teacher logits."""
    logp = torch.log_softmax(t_logits.float(), -1)
    top, idx = logp.topk(k, dim=-1)
    # exact: a log-sum-exp over the ids outside the top k, not log(1 − Σ top-k p), which cancels
    # to 0 in float32 once the tail is below ~1e-7 (a confident teacher) and then sat at the floor
    return idx, top, tail_logsumexp(logp, idx)


def reconstruct(idx: torch.Tensor, logp: torch.Tensor, log_tail: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense log P̂: the k stored ids keep their probability, the tail mass r is spread uniformly
    over the other V − k ids."""
    k = idx.shape[-1]
    out = (log_tail.float() - math.log(vocab_size - k)).unsqueeze(-1).expand(*idx.shape[:-1], vocab_size).clone()
    out.scatter_(-1, idx.long(), logp.float())
    return out


def sparse_kl_error(p_logp: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token KL(P ‖ P̂) in nats between a dense teacher log P and its top-k reconstruction."""
    idx, top, lt = topk_entry(p_logp, k)
    q = reconstruct(idx, top, lt, p_logp.shape[-1])
    return (p_logp.exp() * (p_logp - q)).sum(-1)


@torch.no_grad()
def cache_error_report(teacher, loader, k: int) -> dict:
    """Over every real target of ``loader`` (an evaluation loader): the teacher's mean tail mass
    r outside its top k, and the mean KL(P‖P̂) (nats/token) lost by keeping only the top k."""
    was = teacher.training
    teacher.eval()
    kl = tail = n = 0.0
    dev = next(teacher.parameters()).device
    for b in loader.epoch(0):
        logp = torch.log_softmax(teacher(b["ids"][:, :-1].to(dev))[0].float(), -1)
        m = b["mask"].to(dev).float()
        _, _, lt = topk_entry(logp, k)
        kl += float((sparse_kl_error(logp, k) * m).sum())
        tail += float((lt.exp() * m).sum())
        n += float(m.sum())
    teacher.train(was)
    return {"k": k, "mean_tail_mass": tail / max(n, 1.0), "kl_teacher_to_topk_nats": kl / max(n, 1.0)}


def load_cache_file(path: Path) -> dict:
    """One epoch file of the sparse teacher cache; a damaged one (a killed write, a full disk)
    raises one line naming it and the fix instead of torch's zip-reader message."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torn zip, truncated file, not a torch file
        raise ValueError(f"teacher cache file {path} is damaged ({type(e).__name__}); delete it (it is "
                         f"rebuilt from the teacher on the next run)") from None


class SparseTeacherCache:
    """Top-k teacher cache for one (teacher, training loader, k); see module doc."""

    def __init__(self, root, teacher_fp: str, loader_fp: dict, k: int, vocab_size: int):
        if k < 1 or k >= vocab_size:
            raise ValueError(f"top_k must be in [1, {vocab_size - 1}] (got {k})")
        self.k, self.vocab_size = k, vocab_size
        self.meta = {"teacher": teacher_fp, "loader": loader_fp, "k": k, "temperature": 1.0,
                     "vocab_size": vocab_size, "format": 2}  # 2: exact tail mass
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / f"topk{k}-{key}"
        self._mem: dict[int, dict] = {}
        self.build_time_s = 0.0

    def path(self, epoch: int) -> Path:
        return self.dir / f"e{epoch:05d}.pt"

    def has(self, epoch: int) -> bool:
        return epoch in self._mem or self.path(epoch).is_file()

    @torch.no_grad()
    def build(self, teacher, loader, epochs: int, device="cpu", log=None) -> "SparseTeacherCache":
        """Run the teacher once over every training batch of ``epochs`` epochs (skips epochs on disk).
        ``build_time_s`` holds the seconds this call spent; ``log`` gets a line before and after."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "key.json", self.meta)
        was = teacher.training
        teacher.eval()
        itype = id_dtype(self.vocab_size)
        todo = [e for e in range(epochs) if not self.path(e).is_file()]
        t0 = time.perf_counter()
        if todo and log:
            log(f"teacher cache: running the teacher over {len(todo)} epoch(s) of training batches (top-{self.k}) "
                f"-> {self.dir}")
        for e in todo:
            idxs, lps, lts = [], [], []
            for b in loader.epoch(e):
                logits, _ = teacher(b["ids"][:, :-1].to(device))
                i, lp, lt = topk_entry(logits, self.k)
                idxs.append(i.to("cpu", itype))
                lps.append(lp.to("cpu", torch.float16))
                lts.append(lt.to("cpu", torch.float16))
            ent = {"idx": torch.stack(idxs), "logp": torch.stack(lps), "log_tail": torch.stack(lts)}
            atomic_save(ent, self.path(e))
        self.build_time_s = time.perf_counter() - t0
        if todo and log:
            log(f"teacher cache: built in {self.build_time_s:.1f}s")
        teacher.train(was)
        return self

    def get(self, epoch: int, step: int):
        """(idx, logp, log_tail) of one training batch; KeyError when the epoch was not built."""
        if epoch not in self._mem:
            p = self.path(epoch)
            if not p.is_file():
                raise KeyError(f"teacher cache has no epoch {epoch} at {self.dir}; build it for all epochs")
            self._mem[epoch] = load_cache_file(p)
        ent = self._mem[epoch]
        return ent["idx"][step], ent["logp"][step], ent["log_tail"][step]

    def size_report(self) -> dict:
        """Bytes on disk against dense fp16 logits for the same tokens."""
        files = sorted(self.dir.glob("e*.pt"))
        sparse = sum(f.stat().st_size for f in files)
        tokens = payload = 0
        for f in files:
            ent = load_cache_file(f)
            tokens += ent["log_tail"].numel()
            payload += sum(t.numel() * t.element_size() for t in ent.values())
        dense = tokens * self.vocab_size * 2
        return {"tokens": tokens, "k": self.k, "vocab_size": self.vocab_size, "sparse_bytes": sparse,
                "payload_bytes": payload, "dense_fp16_bytes": dense,
                "ratio": sparse / dense if dense else float("nan"),
                "bytes_per_token_sparse": sparse / max(tokens, 1),
                "payload_bytes_per_token": payload / max(tokens, 1),
                "formula_bytes_per_token": payload_bytes_per_token(self.k, self.vocab_size),
                "bytes_per_token_dense": 2 * self.vocab_size}
