"""Contrastive representation distillation (CRD, Tian, Krishnan & Isola, ICLR 2020)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.base import BatchRecord, LossTerm, layer_pairs, register_loss


def crd_critic(v: torch.Tensor, u: torch.Tensor, tau: float, n_neg: int, n_data: int,
               Z: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The NCE critic ``h(v, u) = e / (e + N/M)`` with ``e = exp(v·u/τ) / Z`` (row-wise dot products
    of [..., d] tensors): the probability that (v, u) came from the joint, with N negatives drawn
    uniformly from M data points (noise probability 1/M each). Z = 1 is the paper's eq. (10); the
    term uses the authors' code's constant ``Z = M · mean(exp(v·u/τ))`` estimated on the first
    batch, which makes the unnormalised density average 1/M (without it the N/M term is negligible
    and the loss is badly scaled)."""
    e = torch.exp((v * u).sum(-1) / tau) / Z
    return e / (e + n_neg / n_data)


def crd_nce_loss(anchor: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float,
                 n_data: int, Z: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``−E[log h(anchor, pos)] − Σ_{k=1..N} E[log(1 − h(anchor, neg_k))]`` averaged over the batch.
    anchor, pos: [B, d]; neg: [B, N, d] (all L2-normalised)."""
    n = neg.shape[1]
    h_pos = crd_critic(anchor, pos, tau, n, n_data, Z)
    h_neg = crd_critic(anchor.unsqueeze(1), neg, tau, n, n_data, Z)
    eps = 1e-7
    return -(torch.log(h_pos + eps) + torch.log(1 - h_neg + eps).sum(1)).mean()


def _flat(f: torch.Tensor) -> torch.Tensor:
    if f.dim() == 4:
        f = F.adaptive_avg_pool2d(f, 1)
    return f.flatten(1)


@register_loss("crd", "contrastive representation distillation: NCE critic with a memory bank of N negatives",
               "Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020")
class CRD(LossTerm):
    """Student and teacher features (``layers: [[s, t]]``, globally average-pooled) go through
    linear embedding heads g_S, g_T (built in setup, trained with the student) and are
    L2-normalised. Two memory banks of size M = ``n_data`` (the training set size, or
    ``rec.extra['n_data']``) hold each sample's latest student / teacher embedding, updated with
    momentum 0.5. For every anchor, N = ``n_neg`` negatives are indices drawn uniformly from the
    other training samples. Loss = NCE(teacher anchor vs student bank) + NCE(student anchor vs
    teacher bank), with the critic ``h = e^{v·u/τ} / (e^{v·u/τ} + N/M)``, τ = 0.07.

    ``positives``: ``instance`` (default; the anchor's own bank entry, no labels read) or ``label``
    (the authors' "relax" mode: a training sample of the anchor's class, drawn uniformly, needs the
    training labels ``rec.extra['train_labels']``). With a transfer set, label positives are drawn
    for the labelled anchors only; unlabelled anchors keep their instance positive."""

    needs_teacher = True

    def __init__(self, layers=None, feat_dim: int = 128, n_neg: int = 16384, tau: float = 0.07,
                 momentum: float = 0.5, n_data: Optional[int] = None, positives: str = "instance"):
        super().__init__()
        if positives not in ("instance", "label"):
            raise ValueError("crd: positives must be 'instance' or 'label'")
        self.positives = positives
        self.class_start: Optional[torch.Tensor] = None
        if layers is None:
            raise ValueError("crd needs the embedding layers: layers: [[student_layer, teacher_layer]] "
                             "(e.g. the last stages [[stage3, layer4]])")
        self.pairs = layer_pairs(layers, "crd")
        if len(self.pairs) != 1:
            raise ValueError("crd takes exactly one layer pair: layers: [[student_layer, teacher_layer]]")
        if feat_dim < 1 or n_neg < 1 or tau <= 0 or not 0 <= momentum < 1:
            raise ValueError("crd: need feat_dim >= 1, n_neg >= 1, tau > 0, 0 <= momentum < 1")
        if n_data is not None and n_neg > n_data - 1:
            raise ValueError(f"crd: n_neg={n_neg} negatives need at least n_neg + 1 = {n_neg + 1} training "
                             f"samples but n_data={n_data}; lower n_neg")
        self.feat_dim, self.n_neg, self.tau, self.momentum = int(feat_dim), int(n_neg), float(tau), float(momentum)
        self.n_data = n_data
        self.embed_s: Optional[nn.Module] = None
        self.embed_t: Optional[nn.Module] = None

    def _check(self, batch: int) -> None:
        m = self.n_data
        if batch > m:
            raise ValueError(f"crd: batch of {batch} is larger than the memory bank (n_data={m}); "
                             f"set n_data to the training-set size or lower train.batch_size")
        if self.n_neg > m - 1:
            raise ValueError(f"crd: n_neg={self.n_neg} negatives need more than n_data={m} samples; "
                             f"lower n_neg below {m}")

    def setup(self, probe: BatchRecord) -> None:
        if self.n_data is None:
            self.n_data = probe.extra.get("n_data")
        if self.n_data is None:
            raise ValueError("crd needs the training-set size for its memory bank: set n_data: <N>")
        self.n_data = int(self.n_data)
        self._check(probe.s_logits.shape[0])
        if probe.index is None:
            raise ValueError("crd needs the batch's dataset indices (rec.index) for its memory bank")
        s, t = self.pairs[0]
        fs, ft = _flat(probe.s_feats[s]), _flat(probe.t_feats[t])
        dev = fs.device
        self.embed_s = nn.Linear(fs.shape[1], self.feat_dim).to(dev)
        self.embed_t = nn.Linear(ft.shape[1], self.feat_dim).to(dev)
        std = 1.0 / math.sqrt(self.feat_dim / 3)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("memory_s", F.normalize((torch.rand(self.n_data, self.feat_dim, generator=g) * 2 - 1) * std, dim=1).to(dev))
        self.register_buffer("memory_t", F.normalize((torch.rand(self.n_data, self.feat_dim, generator=g) * 2 - 1) * std, dim=1).to(dev))
        self.register_buffer("Z", torch.full((2,), -1.0, device=dev))  # (student side, teacher side); set on the first batch
        if self.positives == "label":
            labels = probe.extra.get("train_labels")
            if labels is None:
                raise ValueError("crd positives: label needs the training labels (an in-memory training set); "
                                 "use positives: instance")
            self.set_labels(torch.as_tensor(labels).to(dev))

    def set_labels(self, labels: torch.Tensor) -> None:
        """Index the training labels by class: ``class_order`` (indices sorted by label, unlabelled
        ones excluded), ``class_start`` / ``class_count`` per class."""
        lab = labels >= 0
        if not bool(lab.any()):
            raise ValueError("crd positives: label needs labelled training samples; use positives: instance")
        order = torch.argsort(labels * lab + (~lab) * (int(labels.max()) + 1), stable=True)
        k = int(labels.max()) + 1
        counts = torch.bincount(labels[lab], minlength=k)
        self.class_order = order[: int(lab.sum())]
        self.class_count = counts
        self.class_start = torch.cumsum(counts, 0) - counts

    def label_positives(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """For labelled anchors (y >= 0): a uniformly drawn training index of class y (global torch
        RNG); for unlabelled ones: their own index."""
        lab = y >= 0
        yc = y.clamp_min(0)
        r = torch.rand(idx.shape[0], device=idx.device)
        pick = self.class_start[yc] + (r * self.class_count[yc]).long().clamp_max(self.class_count[yc] - 1)
        return torch.where(lab, self.class_order[pick], idx)

    def negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, N] indices drawn uniformly from {0..M−1} \\ {idx_b} (global torch RNG)."""
        r = torch.randint(0, self.n_data - 1, (idx.shape[0], self.n_neg), device=idx.device)
        return r + (r >= idx.view(-1, 1)).long()

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        if self.embed_s is None:
            self.setup(rec)
        self._check(rec.s_logits.shape[0])
        idx = rec.index
        if idx is None:
            raise ValueError("crd needs the batch's dataset indices (rec.index)")
        if int(idx.max()) >= self.n_data:
            raise ValueError(f"crd: dataset index {int(idx.max())} >= n_data={self.n_data}; "
                             f"set n_data to the training-set size")
        s, t = self.pairs[0]
        v_s = F.normalize(self.embed_s(_flat(rec.s_feats[s]).float()), dim=1)
        v_t = F.normalize(self.embed_t(_flat(rec.t_feats[t]).float()), dim=1)
        neg = self.negatives(idx)
        pos = idx if self.positives == "instance" else self.label_positives(idx, rec.y)
        mem_s, mem_t = self.memory_s.detach(), self.memory_t.detach()
        if bool((self.Z < 0).any()):  # Z = M · mean exp(v·u/τ) over the first batch's pairs, then fixed
            with torch.no_grad():
                z_t = torch.exp((v_t.unsqueeze(1) * mem_s[neg]).sum(-1) / self.tau).mean() * self.n_data
                z_s = torch.exp((v_s.unsqueeze(1) * mem_t[neg]).sum(-1) / self.tau).mean() * self.n_data
                self.Z.copy_(torch.stack([z_s, z_t]))
        # teacher anchor against the student bank, student anchor against the teacher bank
        loss = crd_nce_loss(v_t, mem_s[pos], mem_s[neg], self.tau, self.n_data, self.Z[1]) \
            + crd_nce_loss(v_s, mem_t[pos], mem_t[neg], self.tau, self.n_data, self.Z[0])
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                m = self.momentum
                self.memory_s[idx] = F.normalize(m * self.memory_s[idx] + (1 - m) * v_s.detach(), dim=1)
                self.memory_t[idx] = F.normalize(m * self.memory_t[idx] + (1 - m) * v_t.detach(), dim=1)
        return loss
