"""Decoder-only language models: kdlab's own small GPT, and HuggingFace causal LMs.

Every model here has one calling convention, ``model(ids, past=None) -> (logits, past)``:
``ids`` is ``[B, T]``, ``logits`` is ``[B, T, V]``, and ``past`` is the key/value cache to pass back
for incremental decoding (``None`` in, a fresh cache out). ``create_lm(name, vocab_size, **kw)``
builds one by name:

* ``gpt``: pre-norm transformer (LayerNorm -> causal self-attention -> residual, LayerNorm -> GELU
  MLP -> residual), rotary (``pos: rope``) or learned (``pos: learned``) positions, output layer
  tied to the token embedding, per-layer KV cache.
* ``hf``: ``transformers.AutoModelForCausalLM`` from a local folder (``path``) or from a config
  built offline (``arch: gpt2 | llama`` plus its size keys); needs ``pip install transformers``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0, device=None):
    """cos/sin tables ``[seq_len, head_dim/2]`` for angles ``pos * base^(-2i/head_dim)``."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x1, x2)`` of the last dim: ``(x1 cos - x2 sin, x1 sin + x2 cos)``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, rope: bool):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} must be a multiple of n_head {n_head}")
        self.n_head, self.rope = n_head, rope
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x, cos, sin, past: Optional[tuple] = None):
        B, T, C = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        S = k.shape[2]
        if T == 1:
            mask, causal = None, False
        elif S == T:
            mask, causal = None, True
        else:  # new queries attend to the whole cache and causally among themselves
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            causal = False
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, C)))
        x = x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))
        return x, (k, v)


class GPT(nn.Module):
    """Small decoder-only transformer (see module doc). ``max_len`` bounds positions."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_layer: int = 4, n_head: int = 4,
                 d_ff: Optional[int] = None, max_len: int = 512, pos: str = "rope", dropout: float = 0.0):
        super().__init__()
        if pos not in ("rope", "learned"):
            raise ValueError(f"pos must be rope or learned (got {pos!r})")
        self.vocab_size, self.max_len, self.pos = vocab_size, max_len, pos
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model) if pos == "learned" else None
        self.blocks = nn.ModuleList(Block(d_model, n_head, d_ff or 4 * d_model, dropout, pos == "rope")
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        hd = d_model // n_head
        cos, sin = rope_tables(max_len, hd)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for b in self.blocks:  # GPT-2 scaling of residual projections
            for lin in (b.proj, b.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor, past: Optional[list] = None):
        B, T = ids.shape
        off = 0 if past is None else past[0][0].shape[2]
        if off + T > self.max_len:
            raise ValueError(f"sequence of {off + T} tokens exceeds the model's max_len {self.max_len}; "
                             f"raise max_len in the model kwargs")
        x = self.tok(ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(off, off + T, device=ids.device))
        x = self.drop(x)
        cos, sin = self.cos[off:off + T], self.sin[off:off + T]
        new = []
        for i, b in enumerate(self.blocks):
            x, kv = b(x, cos, sin, None if past is None else past[i])
            new.append(kv)
        logits = self.ln_f(x) @ self.tok.weight.t()
        return logits, new


class HFCausalLM(nn.Module):
    """Adapter: a ``transformers`` causal LM behind the ``(ids, past) -> (logits, past)`` convention."""

    def __init__(self, vocab_size: int, path: Optional[str] = None, arch: str = "gpt2", **config):
        super().__init__()
        try:
            import transformers
        except ImportError:
            raise ImportError("model 'hf' needs transformers: pip install transformers") from None
        if path is not None:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            if self.model.config.vocab_size < vocab_size:
                raise ValueError(f"HF model at {path} has vocab {self.model.config.vocab_size} < "
                                 f"tokenizer's {vocab_size}; use its own tokenizer size")
        else:
            if arch == "gpt2":
                cfg = transformers.GPT2Config(vocab_size=vocab_size, **config)
            elif arch == "llama":
                cfg = transformers.LlamaConfig(vocab_size=vocab_size, **config)
            else:
                raise ValueError(f"hf arch must be gpt2 or llama (got {arch!r}); or give path")
            self.model = transformers.AutoModelForCausalLM.from_config(cfg)
        self.vocab_size = vocab_size

    def forward(self, ids, past=None):
        out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.logits[..., : self.vocab_size], out.past_key_values

    def forward_hidden(self, ids) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(logits, hidden states)``; hidden states ``[B, T, d]`` per layer, index 0 the embeddings
        and index L the last block's output (``transformers``' ``output_hidden_states``)."""
        out = self.model(input_ids=ids, use_cache=False, output_hidden_states=True)
        return out.logits[..., : self.vocab_size], tuple(out.hidden_states)


LM_MODELS = {"gpt": GPT, "hf": HFCausalLM}


def create_lm(name: str, vocab_size: int, **kwargs) -> nn.Module:
    """Build a language model by name (``gpt`` or ``hf``) for a tokenizer of ``vocab_size`` ids."""
    if name not in LM_MODELS:
        raise KeyError(f"unknown language model '{name}'; choose one of {sorted(LM_MODELS)}")
    try:
        return LM_MODELS[name](vocab_size, **kwargs)
    except TypeError as e:
        raise ValueError(f"model '{name}': {e}") from None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
