"""Tokenisers for the language-model side: bytes by default, a locally trained BPE as an option.

Both map text to integer ids and back, know how many UTF-8 bytes each id stands for (for
bits per byte), and reserve two special ids: ``eos`` (end of a document / an answer) and ``pad``
(never a target). A tokenizer is saved beside a run (``tokenizer.json``) and loaded with
:func:`load_tokenizer`.

* :class:`ByteTokenizer`: ids 0..255 are the bytes of the UTF-8 text, 256 is ``eos``, 257 is
  ``pad``; nothing is unknown and nothing is trained.
* :class:`BPETokenizer`: a byte-level BPE trained with HuggingFace ``tokenizers`` (optional extra
  ``lm``: ``pip install kdlab[lm]``) on the training split only.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

from kdlab.core.io import read_json

EOS_TEXT = "<|eos|>"
PAD_TEXT = "<|pad|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens; ``vocab_size = 258`` (256 bytes + eos + pad)."""

    kind = "byte"

    def __init__(self):
        self.eos_id = 256
        self.pad_id = 257
        self.vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """Bytes each id stands for; ``eos`` counts as one byte (a document separator), pad 0."""
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[self.pad_id] = 0
        return out

    def to_dict(self) -> dict:
        return {"kind": "byte"}

    def save(self, path) -> Path:
        from kdlab.core.io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict()))


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-to-unicode table used by byte-level BPE, inverted: character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ImportError("BPE needs HuggingFace tokenizers: pip install 'kdlab[lm]' "
                          "(or use tokenizer: byte)") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (HuggingFace ``tokenizers``), trained locally; ``eos``/``pad`` are specials."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_id = self.hf.token_to_id(EOS_TEXT)
        self.pad_id = self.hf.token_to_id(PAD_TEXT)
        if self.eos_id is None or self.pad_id is None:
            raise ValueError(f"BPE tokenizer lacks {EOS_TEXT}/{PAD_TEXT}; train it with BPETokenizer.train")
        self.vocab_size = self.hf.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> "BPETokenizer":
        """Train a byte-level BPE of ``vocab_size`` ids on ``texts`` (the training split)."""
        tk = _require_tokenizers()
        if vocab_size < 300:
            raise ValueError(f"bpe vocab_size {vocab_size} is too small; use >= 300 (256 bytes + merges)")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TEXT, PAD_TEXT],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> "BPETokenizer":
        tk = _require_tokenizers()
        return cls(tk.Tokenizer.from_str(s))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.eos_id, self.pad_id)]
        return self.hf.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each id (through the byte-level alphabet); eos 1, pad 0."""
        table = _byte_level_alphabet()
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, i in self.hf.get_vocab().items():
            out[i] = sum(1 for ch in tok if ch in table)
        out[self.eos_id] = 1
        out[self.pad_id] = 0
        return out

    def to_dict(self) -> dict:
        return {"kind": "bpe", "hf": self.hf.to_str()}

    def save(self, path) -> Path:
        from kdlab.core.io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict()))


class HFTokenizer:
    """A ``transformers`` tokenizer from a local folder (``AutoTokenizer``, ``local_files_only``),
    behind kdlab's tokenizer interface; the folder's own special tokens (eos, pad: eos when unset)."""

    kind = "hf"

    def __init__(self, path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError("hf:<folder> tokenizers need transformers: pip install 'kdlab[hf]'") from None
        self.path = str(path)
        self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.vocab_size = len(self.hf)
        if self.hf.eos_token_id is None:
            raise ValueError(f"the tokenizer in {self.path} has no eos token; set eos_token in its tokenizer_config.json")
        self.eos_id = int(self.hf.eos_token_id)
        self.pad_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each id's text (special tokens count 1)."""
        special = set(self.hf.all_special_ids)
        return np.array([1 if i in special else max(1, len(self.hf.decode([i]).encode("utf-8")))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def to_dict(self) -> dict:
        return {"kind": "hf", "path": self.path}

    def save(self, path) -> Path:
        out = Path(path)
        self.hf.save_pretrained(str(out if out.suffix == "" else out.parent))
        return out


def tokenizer_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_str(d["hf"])
    if kind == "hf":
        return HFTokenizer(d["path"])
    raise ValueError(f"unknown tokenizer kind {kind!r}; use byte, bpe or hf")


def load_tokenizer(path):
    """Load a ``tokenizer.json`` written by :meth:`save` (beside a run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found; train the teacher first (kdlab lm train-teacher)")
    return tokenizer_from_dict(read_json(path, "tokenizer file", need=("kind",), fix="delete it; the next `kdlab lm` run of that folder rebuilds it"))


def build_tokenizer(spec: str, train_texts: Iterable[str] = (), vocab_size: int = 1024):
    """``byte`` or ``bpe`` (trained on ``train_texts``)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return BPETokenizer.train(train_texts, vocab_size=vocab_size)
    raise ValueError(f"tokenizer must be byte or bpe (got {spec!r})")
