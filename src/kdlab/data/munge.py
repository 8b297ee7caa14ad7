"""MUNGE: synthetic transfer data (Buciluă, Caruana & Niculescu-Mizil, Model Compression, KDD 2006).

Algorithm 1 of the paper, ``MUNGE(T, k, p, s)``: repeat k times — copy the table T to T'; for each
example e of T' (in order) with its nearest neighbour e' (Euclidean), for each attribute a, with
probability p swap the two examples' values:

* nominal a: ``e_a ↔ e'_a``;
* continuous a: with ``sd = |e_a − e'_a| / s``, ``e_a ← N(e'_a, sd)`` and ``e'_a ← N(e_a, sd)``
  (both drawn around the *other* example's old value, simultaneously);

and add T' to the output. Swaps are applied in place, so a later example sees the values earlier
swaps left in T'. The neighbours are found once, in the original T (the paper searches T' as it
is being modified; with small p the two differ little, and one search keeps it O(N²·d) per pass).
Images are tables whose attributes are the pixels (all continuous).
"""

from __future__ import annotations

from typing import Optional

import torch


def nearest_neighbours(x: torch.Tensor) -> torch.Tensor:
    """For each row of ``x`` [N, d], the index of its nearest other row (Euclidean; ties: lowest index)."""
    if x.shape[0] < 2:
        raise ValueError("MUNGE needs at least two examples (each needs a nearest neighbour)")
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    return d.argmin(dim=1)


def munge(x: torch.Tensor, *, k: int = 1, p: float = 0.5, s: float = 1.0,
          nominal: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``k · N`` synthetic examples from the table ``x`` [N, d] (see the module doc).

    ``p``: swap probability per attribute; ``s``: spread (sd = |e_a − e'_a| / s; larger s, less
    noise); ``nominal``: bool mask [d] of the nominal attributes (default: all continuous);
    ``generator``: the random stream (draws per example: d uniforms for the swaps, then d normals).
    """
    if x.dim() != 2:
        raise ValueError(f"munge takes a table [N, d], got shape {tuple(x.shape)}")
    if not 0.0 <= p <= 1.0 or s <= 0 or k < 1:
        raise ValueError("munge: need 0 <= p <= 1, s > 0 and k >= 1 (e.g. k: 1, p: 0.5, s: 1.0)")
    x = x.detach().to("cpu", torch.float64)
    n, d = x.shape
    nominal = torch.zeros(d, dtype=torch.bool) if nominal is None else torch.as_tensor(nominal, dtype=torch.bool)
    nn_idx = nearest_neighbours(x).tolist()
    out = []
    for _ in range(k):
        t = x.clone()
        for i in range(n):
            j = nn_idx[i]
            swap = torch.rand(d, generator=generator, dtype=torch.float64) < p
            z = torch.randn(2, d, generator=generator, dtype=torch.float64)
            e, f = t[i].clone(), t[j].clone()
            sd = (e - f).abs() / s
            new_e = torch.where(nominal, f, f + sd * z[0])
            new_f = torch.where(nominal, e, e + sd * z[1])
            t[i] = torch.where(swap, new_e, e)
            t[j] = torch.where(swap, new_f, f)
        out.append(t)
    return torch.cat(out)


def munge_images(x: torch.Tensor, *, k: int = 1, p: float = 0.5, s: float = 1.0, seed: int = 0) -> torch.Tensor:
    """MUNGE on images [N, C, H, W] in [0, 1] (pixels as continuous attributes), clamped to [0, 1];
    seeded by ``seed`` (a ``torch.Generator``)."""
    g = torch.Generator().manual_seed(int(seed))
    flat = munge(x.reshape(x.shape[0], -1), k=k, p=p, s=s, generator=g)
    return flat.clamp(0, 1).to(x.dtype).reshape(-1, *x.shape[1:])
