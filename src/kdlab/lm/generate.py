"""Autoregressive generation (greedy or sampled), with or without the KV cache.

Generation runs under ``torch.no_grad`` with the model in eval mode (its previous mode is restored):
no gradient ever flows through sampling. Sampling draws from ``softmax(z/τ)`` restricted to the
``top_k`` largest logits, with an explicit ``torch.Generator`` so that a run is reproducible.
With ``eos_id`` set, a row stops at its first ``eos``; later positions are ``pad_id`` and
``mask`` is False there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: Optional[int],
          generator: Optional[torch.Generator]) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    z = logits.float() / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode(step, prompts: torch.Tensor, max_new: int, *, eos_id: Optional[int] = None, pad_id: int = 0):
    """The decoding loop of :func:`generate` and of MiniLLM's mixed sampler: ``step(step_in, ids)``
    returns the next token of each row (``step_in``: the tokens fed this step, the prompts first,
    then the last token; ``ids``: everything so far). A row stops at its first ``eos_id`` (later
    tokens are ``pad_id``); the loop ends early when every row has. Returns ``(ids [B, P+max_new],
    mask [B, max_new])``, ``mask`` marking generated tokens up to and including each row's eos."""
    B = prompts.shape[0]
    ids, step_in = prompts, prompts
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    mask = torch.zeros(B, max_new, dtype=torch.bool, device=prompts.device)
    for t in range(max_new):
        nxt = step(step_in, ids)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        mask[:, t] = ~done
        if eos_id is not None:
            done = done | (nxt == eos_id)
        ids = torch.cat([ids, nxt[:, None]], 1)
        step_in = nxt[:, None]
        if eos_id is not None and bool(done.all()):
            pad = torch.full((B, max_new - t - 1), pad_id, dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, pad], 1)
            break
    return ids, mask


@torch.no_grad()
def generate(model, prompts: torch.Tensor, max_new: int, *, greedy: bool = True,
             temperature: float = 1.0, top_k: Optional[int] = None, eos_id: Optional[int] = None,
             pad_id: int = 0, use_cache: bool = True, generator: Optional[torch.Generator] = None):
    """Continue equal-length ``prompts`` ``[B, P]`` by ``max_new`` tokens.

    Returns ``(ids [B, P+max_new], mask [B, max_new])`` where ``mask`` marks generated tokens up
    to and including each row's first ``eos``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k}); leave it unset to sample from every token")
    was = model.training
    model.eval()
    try:
        past = None

        def step(step_in, ids):
            nonlocal past
            if use_cache:
                logits, past = model(step_in, past)
            else:
                logits, _ = model(ids)
            return _pick(logits[:, -1], greedy, temperature, top_k, generator)

        return decode(step, prompts, max_new, eos_id=eos_id, pad_id=pad_id)
    finally:
        model.train(was)


def generate_ragged(model, prompts: Sequence[Sequence[int]], max_new: int, *, batch_size: int = 256,
                    **kw) -> list[list[int]]:
    """Generate for prompts of different lengths (grouped by length, no padding inside a prompt);
    returns each prompt's generated ids, cut after the first ``eos``."""
    out: list[Optional[list[int]]] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    dev = next(model.parameters()).device
    for L, idx in sorted(by_len.items()):
        for a in range(0, len(idx), batch_size):
            chunk = idx[a:a + batch_size]
            x = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=dev)
            ids, mask = generate(model, x, max_new, **kw)
            for j, i in enumerate(chunk):
                out[i] = ids[j, L:][mask[j]].tolist()
    return out  # type: ignore[return-value]
