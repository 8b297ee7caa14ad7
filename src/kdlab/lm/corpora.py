"""Text corpora, their file-level splits, and token-window loaders.

Default corpora are real text that ships with every Python, so nothing is downloaded:

* ``docs``: ``pydoc_data.topics`` (the help-topic pages of the Python documentation, ~465k
  characters of English technical prose, one document per topic);
* ``code``: the standard library's ``.py`` sources (site-packages and test folders excluded),
  one document per file, at most ``max_bytes`` of them (files taken in hash order).

A user corpus is a folder of text files (``*.txt``, ``*.md``, ``*.py`` ... any file that decodes as
UTF-8) or a ``module:function`` factory returning ``{name: text}`` or a list of texts.

Splits are by document: document ``name`` goes to train / val / test by
``sha256(salt/name) mod 10000 / 10000`` against the cumulative fractions, so the splits never share
a document and do not change when documents are added. Each split is then one token stream:
the documents' tokens joined by ``eos``.

Loaders yield dict batches ``{"ids": LongTensor[B, T+1], "mask": BoolTensor[B, T], "epoch", "step"}``
(inputs are ``ids[:, :-1]``, targets ``ids[:, 1:]``, ``mask`` marks real targets). A training
loader's ``epoch(e)`` draws ``steps`` batches of random windows, a pure function of (seed, e);
an evaluation loader covers the split in consecutive non-overlapping windows.
"""

from __future__ import annotations

import hashlib
import importlib
import sysconfig
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from kdlab.core.seeding import derive_seed

CORPORA = ("docs", "code")


def documentation_corpus() -> dict[str, str]:
    """``pydoc_data.topics``: {topic name: text} (real English documentation, offline)."""
    from pydoc_data.topics import topics

    return {k: v for k, v in sorted(topics.items()) if v.strip()}


def code_corpus(max_bytes: int = 2_000_000) -> dict[str, str]:
    """Standard-library ``.py`` files (no site-packages / tests), up to ``max_bytes`` in hash order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in "/" + rel or rel.startswith("idlelib"):
            continue
        files.append(rel)
    files.sort(key=lambda r: hashlib.sha256(r.encode()).hexdigest())
    out, total = {}, 0
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_bytes and out:
            continue
        out[rel] = text
        total += len(text)
        if total >= max_bytes:
            break
    return dict(sorted(out.items()))


def folder_corpus(path) -> dict[str, str]:
    """Every UTF-8 text file under ``path`` (recursively): {relative path: text}."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} not found; give a folder of text files, "
                                f"'docs', 'code' or 'module:function'")
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            try:
                out[p.relative_to(root).as_posix()] = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    if not out:
        raise ValueError(f"corpus folder {root} holds no UTF-8 text files; add some .txt files")
    return out


def load_corpus(spec: str, max_bytes: int = 2_000_000) -> dict[str, str]:
    """``docs`` | ``code`` | a folder | ``module:function`` -> {document name: text}."""
    if spec == "docs":
        return documentation_corpus()
    if spec == "code":
        return code_corpus(max_bytes)
    if ":" in spec and not Path(spec).exists():
        mod, fn = spec.split(":", 1)
        try:
            factory: Callable = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError):
            raise ValueError(f"corpus factory '{spec}' not found; give module:function importable "
                             f"from PYTHONPATH") from None
        got = factory()
        docs = dict(got) if isinstance(got, dict) else {f"doc{i:06d}": t for i, t in enumerate(got)}
        if not docs:
            raise ValueError(f"corpus factory '{spec}' returned no documents")
        return docs
    return folder_corpus(spec)


def split_of(name: str, fractions=(0.8, 0.1, 0.1), salt: str = "kdlab-lm") -> str:
    """``train``/``val``/``test`` for a document name, by ``sha256(salt/name)`` (see module doc)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions {fractions} must be >= 0 and sum to 1")
    u = int(hashlib.sha256(f"{salt}/{name}".encode()).hexdigest()[:8], 16) % 10000 / 10000
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def split_documents(docs: dict[str, str], fractions=(0.8, 0.1, 0.1), salt: str = "kdlab-lm") -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}
    for name, text in docs.items():
        out[split_of(name, fractions, salt)][name] = text
    for s, d in out.items():
        if not d:
            raise ValueError(f"the {s} split is empty ({len(docs)} documents); use a larger corpus "
                             f"or other split fractions")
    return out


def token_stream(docs: dict[str, str], tokenizer) -> torch.Tensor:
    """All documents' ids joined by ``eos`` (1-D int64)."""
    ids: list[int] = []
    for _, text in sorted(docs.items()):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def stream_fingerprint(stream: torch.Tensor) -> str:
    return hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:16]


class WindowLoader:
    """Random windows of ``seq_len + 1`` tokens for training (``steps`` batches an epoch).

    ``epoch(e)`` depends only on (seed, e): the window starts come from a generator seeded with
    ``derive_seed(seed, "lm-windows", e)``.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int):
        if stream.numel() < seq_len + 2:
            raise ValueError(f"token stream of {stream.numel()} ids is shorter than seq_len {seq_len}; "
                             f"lower lm.seq_len")
        self.stream, self.seq_len, self.batch_size, self.steps, self.seed = stream, seq_len, batch_size, steps, seed

    def __len__(self) -> int:
        return self.steps

    def starts(self, e: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "lm-windows", e))
        hi = self.stream.numel() - self.seq_len - 1
        return torch.randint(0, hi + 1, (self.steps, self.batch_size), generator=g)

    def epoch(self, e: int):
        st = self.starts(e)
        ar = torch.arange(self.seq_len + 1)
        for s in range(self.steps):
            ids = self.stream[st[s][:, None] + ar]
            yield {"ids": ids, "mask": torch.ones(ids.shape[0], self.seq_len, dtype=torch.bool),
                   "epoch": e, "step": s}

    def fingerprint(self) -> dict:
        return {"stream": stream_fingerprint(self.stream), "seq_len": self.seq_len,
                "batch_size": self.batch_size, "steps": self.steps, "seed": self.seed}


class EvalLoader:
    """Consecutive non-overlapping windows covering the split (at most ``max_tokens`` targets).

    The last window is padded with ``pad``; its padded targets are masked out.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, pad_id: int,
                 max_tokens: Optional[int] = None):
        n = stream.numel() - 1 if max_tokens is None else min(stream.numel() - 1, max_tokens)
        nwin = -(-n // seq_len)
        ids = torch.full((nwin, seq_len + 1), pad_id, dtype=torch.long)
        mask = torch.zeros(nwin, seq_len, dtype=torch.bool)
        for w in range(nwin):
            a = w * seq_len
            b = min(a + seq_len + 1, n + 1)
            ids[w, : b - a] = stream[a:b]
            mask[w, : b - a - 1] = True
        self.ids, self.mask, self.batch_size = ids, mask, batch_size

    def __len__(self) -> int:
        return -(-self.ids.shape[0] // self.batch_size)

    def epoch(self, e: int = 0):
        for s, a in enumerate(range(0, self.ids.shape[0], self.batch_size)):
            yield {"ids": self.ids[a:a + self.batch_size], "mask": self.mask[a:a + self.batch_size],
                   "epoch": e, "step": s}

    def __iter__(self):
        return self.epoch(0)


def corpus_streams(spec: str, tokenizer_spec: str = "byte", *, vocab_size: int = 1024,
                   max_bytes: int = 2_000_000, fractions=(0.8, 0.1, 0.1), tokenizer=None):
    """Load a corpus, split it by document, build (or reuse) the tokenizer on the train split.

    Returns ``(tokenizer, {"train"|"val"|"test": 1-D id stream}, {split: n_bytes})``.
    """
    from kdlab.lm.tokenizers import build_tokenizer

    parts = split_documents(load_corpus(spec, max_bytes), fractions)
    if tokenizer is None:
        tokenizer = build_tokenizer(tokenizer_spec, parts["train"].values(), vocab_size)
    streams = {s: token_stream(d, tokenizer) for s, d in parts.items()}
    nbytes = {s: int(sum(len(t.encode("utf-8")) + 1 for t in d.values())) for s, d in parts.items()}
    return tokenizer, streams, nbytes


def token_bytes_tensor(tokenizer) -> torch.Tensor:
    return torch.as_tensor(np.asarray(tokenizer.token_bytes()), dtype=torch.float64)
