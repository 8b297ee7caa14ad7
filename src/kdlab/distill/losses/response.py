"""Response-based terms: cross-entropy on labels and Hinton's knowledge distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.distill.losses.base import BatchRecord, LossTerm, register_loss


def kl_terms(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per row: ``KL(p ‖ q) = Σ_k p_k (log p_k − log q_k)`` over the last dimension, with
    0·log 0 = 0 (terms where ``p_k = 0`` count 0). The one KL implementation of the response terms
    (``kd``, ``dkd``'s two parts, ``mtkd``, DML, and the evaluation's KL to the teacher): callers
    pass the distributions they compare (softmax of logits, binary target / non-target masses,
    averaged soft targets)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def kl_rows(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Per row: ``KL(p_t ‖ p_s)`` with ``p = softmax(logits/T)`` over the last dimension (no T²
    factor), by :func:`kl_terms`."""
    log_p_s = F.log_softmax(s_logits / T, dim=-1)
    log_p_t = F.log_softmax(t_logits / T, dim=-1)
    return kl_terms(log_p_t.exp(), log_p_t, log_p_s)


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    The T² factor keeps the gradient scale of the soft term independent of the temperature.
    """
    return kl_rows(s_logits, t_logits, T).mean() * (T * T)


def standardize_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): the Z-score of every row,
    ``(z − mean(z)) / (eps + std(z))`` over the last dimension, with the unbiased (n − 1) standard
    deviation and ``eps = 1e-7`` as in the authors' code. Invariant (up to ``eps``) to ``a·z + b``
    with ``a > 0``; the KD temperature then acts as a "base temperature" on unit-variance logits."""
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (eps + std)


@register_loss("ce", "cross-entropy on the labels", "")
class CrossEntropy(LossTerm):
    needs_labels = True

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return F.cross_entropy(rec.s_logits, rec.y, label_smoothing=self.label_smoothing)


@register_loss("kd", "Hinton KD: T²·KL(softmax(t/T) ‖ softmax(s/T)); logit_stand: Z-scored logits (Sun et al. 2024)",
               "Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015; "
               "logit_stand: Sun, Ren, Li, Wang & Cao, Logit Standardization in Knowledge Distillation, CVPR 2024")
class KD(LossTerm):
    """``logit_stand: true`` Z-scores the student's and the teacher's logits per sample
    (:func:`standardize_logits`) before the temperature; the paper's setting is T = 2 (the "base
    temperature") with the KD weight 9 and CE weight 0.1. Off (the default) is the plain KD, the
    same computation as before the option existed."""

    needs_teacher = True

    def __init__(self, T: float = 4.0, logit_stand: bool = False):
        super().__init__()
        if T <= 0:
            raise ValueError("temperature T must be > 0")
        self.T = float(T)
        self.logit_stand = bool(logit_stand)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        s, t = rec.s_logits, rec.teacher_logits(self.name)
        if self.logit_stand:
            s, t = standardize_logits(s), standardize_logits(t)
        return kd_loss(s, t, self.T)


def logit_mse_loss(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Ba & Caruana (2014), logit regression: ``(1/B) Σ_b ½ ‖z_s,b − z_t,b‖²₂`` (the paper's
    ``1/(2T) Σ_t ‖g(x_t) − z_t‖²`` over a batch of B samples)."""
    return 0.5 * (s_logits - t_logits).pow(2).sum(dim=-1).mean()


@register_loss("logit_mse", "logit regression: ½‖z_s − z_t‖² per sample (teacher logits, no labels)",
               "Ba & Caruana, Do Deep Nets Really Need to be Deep?, NeurIPS 2014")
class LogitMSE(LossTerm):
    needs_teacher = True

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return logit_mse_loss(rec.s_logits, rec.teacher_logits(self.name))
