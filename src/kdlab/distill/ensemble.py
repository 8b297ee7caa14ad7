"""Ensembles as teachers: one frozen ``nn.Module`` whose output averages its members' outputs.

``combine="logits"``: ``z̄ = (1/m) Σ_i z_i`` (the mean logit). ``combine="probs"``: the mean
probability ``p̄ = (1/m) Σ_i softmax(z_i)``, returned as the logits ``log p̄`` (so that
``softmax(log p̄) = p̄``; at a KD temperature T ≠ 1 the term then softens ``log p̄``, not each member).

Being one module, an ensemble goes through the teacher cache like a single teacher: its state
dict holds every member's weights and a ``combine_code`` buffer (0 logits, 1 probs), so the cache
key's weight fingerprint changes with any member and with the averaging rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMBINE = ("logits", "probs")


def average_outputs(logits: list[torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """``mean_i z_i`` (``logits``) or ``log mean_i softmax(z_i)`` (``probs``) over members i."""
    if combine not in COMBINE:
        raise ValueError(f"teacher.ensemble must be 'logits' or 'probs', got {combine!r}")
    z = torch.stack([t.float() for t in logits])
    if combine == "logits":
        return z.mean(0)
    return torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - torch.log(torch.tensor(float(len(logits))))


class EnsembleTeacher(nn.Module):
    """Frozen members, evaluated on the same input; ``forward`` is :func:`average_outputs`."""

    def __init__(self, members: list[nn.Module], combine: str = "logits"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble teacher needs at least one member (teacher.checkpoints: [a.pt, b.pt])")
        if combine not in COMBINE:
            raise ValueError(f"teacher.ensemble must be 'logits' or 'probs', got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.register_buffer("combine_code", torch.tensor(COMBINE.index(combine)))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return average_outputs([m(x) for m in self.members], self.combine)
