"""Hidden-state distillation between causal LMs of different depth and width (DistilBERT / MiniLM /
TinyBERT style), registered like the divergences.

A **layer map** pairs student hidden states with teacher hidden states (``hidden_states`` indices:
0 the embeddings, l the output of block l). ``uniform`` pairs student block i (1..L_s) with teacher
block round(i·L_t / L_s), so the last blocks meet and the others are spread evenly (TinyBERT's
uniform strategy); a given map is a list of ``[student_layer, teacher_layer]`` pairs.

Each student state goes through a learned linear projection W_i (d_s -> d_t, no bias; trained with
the student, used only in training) and a registered **hidden loss** compares it with the frozen
teacher's state at every real position:

* ``mse``: mean over the d_t features of (W h_s − h_t)²;
* ``cos``: 1 − cos(W h_s, h_t) (DistilBERT's cosine embedding loss).

The term is the mean over mapped layers of the per-token mean over real positions. Adding a hidden
loss is one function with :func:`register_hidden_loss`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.core.registry import Registry

HIDDEN_LOSSES = Registry("hidden loss")


def register_hidden_loss(name: str, description: str = "", reference: str = ""):
    """Register ``fn(h_s_projected [N, d], h_t [N, d]) -> [N]`` under ``name``."""
    return lambda fn: HIDDEN_LOSSES.register(name, description=description, reference=reference)(fn)


@register_hidden_loss("mse", "mean squared error of the projected student state and the teacher state",
                      "FitNets / TinyBERT")
def hidden_mse(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    return (hs - ht).pow(2).mean(-1)


@register_hidden_loss("cos", "1 − cosine similarity of the projected student state and the teacher state",
                      "DistilBERT, Sanh et al. 2019")
def hidden_cos(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)


def layer_map(n_student: int, n_teacher: int, given: Optional[Sequence[Sequence[int]]] = None) -> list[tuple[int, int]]:
    """``[(student layer, teacher layer)]``: ``given`` checked against the depths, else uniform
    (student block i -> teacher block round(i·L_t/L_s), i = 1..L_s)."""
    if given is None:
        return [(i, int(round(i * n_teacher / n_student))) for i in range(1, n_student + 1)]
    out = []
    for pair in given:
        s, t = (int(v) for v in pair)
        if not (0 <= s <= n_student and 0 <= t <= n_teacher):
            raise ValueError(f"layer pair [{s}, {t}] is outside the student's 0..{n_student} / the teacher's "
                             f"0..{n_teacher} hidden states")
        out.append((s, t))
    if not out:
        raise ValueError("hidden.layers is empty; leave it out for the uniform map")
    return out


class HiddenDistill(nn.Module):
    """The hidden-state term: a layer map, one projection per mapped student layer and a loss."""

    def __init__(self, n_student: int, n_teacher: int, d_student: int, d_teacher: int, loss: str = "cos",
                 layers: Optional[Sequence[Sequence[int]]] = None):
        super().__init__()
        self.loss_name = loss
        self.fn = HIDDEN_LOSSES.get(loss)
        self.pairs = layer_map(n_student, n_teacher, layers)
        self.proj = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in self.pairs)

    def forward(self, hs: Sequence[torch.Tensor], ht: Sequence[torch.Tensor], mask: torch.Tensor,
                denom: Optional[float] = None) -> torch.Tensor:
        sel = mask.bool()
        vals = []
        for (i, j), w in zip(self.pairs, self.proj):
            per = self.fn(w(hs[i][sel].float()), ht[j][sel].float())
            n = float(per.numel()) if denom is None else float(denom)
            vals.append(per.sum() / max(n, 1.0))
        return torch.stack(vals).mean()
