"""Response-based terms: cross-entropy on labels and Hinton's knowledge distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.distill.losses.base import BatchRecord, LossTerm, register_loss


def kl_rows(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Per row: ``KL(p_t ‖ p_s) = Σ_k p_t,k (log p_t,k − log p_s,k)`` with ``p = softmax(logits/T)``
    over the last dimension (no T² factor). The one implementation of the logit KL in kdlab."""
    log_p_s = F.log_softmax(s_logits / T, dim=-1)
    log_p_t = F.log_softmax(t_logits / T, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    The T² factor keeps the gradient scale of the soft term independent of the temperature.
    """
    return kl_rows(s_logits, t_logits, T).mean() * (T * T)


@register_loss("ce", "cross-entropy on the labels", "")
class CrossEntropy(LossTerm):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return F.cross_entropy(rec.s_logits, rec.y, label_smoothing=self.label_smoothing)


@register_loss("kd", "Hinton KD: T²·KL(softmax(t/T) ‖ softmax(s/T))",
               "Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015")
class KD(LossTerm):
    needs_teacher = True

    def __init__(self, T: float = 4.0):
        super().__init__()
        if T <= 0:
            raise ValueError("temperature T must be > 0")
        self.T = float(T)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return kd_loss(rec.s_logits, rec.teacher_logits(self.name), self.T)
