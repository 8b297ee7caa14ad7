"""Face-recognition terms: margin heads (ArcFace, CosFace), embedding KD, AdaDistill, QUD and the
QuantFace embedding match. The student's output ``rec.s_logits`` is its *embedding* and
``rec.t_logits`` the teacher's (``task: faces``, :mod:`kdlab.models.faces`); every term works on
L2-normalised embeddings. Heads (class centres) are built in ``setup`` from the number of
training identities and join the optimiser; they are used in training only.

Formulas (``ê = e/‖e‖``, ``ŵ_j = w_j/‖w_j‖``, ``cos θ_j = ê·ŵ_j``, label ``y``, scale ``s``,
margin ``m``):

* ArcFace (Deng et al., CVPR 2019): target logit ``s·cos(θ_y + m)``, others ``s·cos θ_j``, then
  cross-entropy. CosFace (Wang et al., CVPR 2018): target ``s·(cos θ_y − m)``.
* embedding KD: ``1 − cos(e_s, e_t)`` (``kind: cosine``) or ``‖ê_s − ê_t‖²`` (``kind: mse``).
* AdaDistill (Boutros et al., ECCV 2024): before each step, without gradient, every sample's
  class centre moves towards the teacher's normalised embedding,
  ``α' = clamp(cos(e_s, e_t) · cos(w_y, e_t), 1e-6, 1)``, ``w_y ← α'·w_y + (1 − α')·ê_t``;
  then ArcFace on the student with the updated centres (``s = 64``, ``m = 0.45``).
* QUD (Kolf, Damer, Boutros, BMVC 2024): no labels; with ``q = ê_s``, ``k = ê_t`` and a FIFO
  queue ``Q`` of K earlier teacher embeddings, ``CE(0, [q·k, q·Q]/τ)``; the batch's ``k`` then
  enter the queue (``K = 1024``, ``τ = 0.1``).
* QuantFace (Boutros et al. 2022): a quantised copy of a full-precision model matches the
  full-precision model's normalised embeddings, ``‖ê_q − ê_fp‖²``, on synthetic images; the
  term carries the bit widths and synthesis settings that ``task: faces`` reads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.losses.base import BatchRecord, LossTerm, register_loss


# --------------------------------------------------------------------------- pure functions
def margin_logits(cos: torch.Tensor, y: torch.Tensor, s: float, m: float, kind: str = "arc") -> torch.Tensor:
    """Scaled logits ``[B, C]`` from cosines ``cos`` with the margin on each row's target ``y``:
    ArcFace ``s·cos(θ_y + m)`` (``kind="arc"``) or CosFace ``s·(cos θ_y − m)`` (``kind="cos"``);
    other classes ``s·cos θ_j``. Rows with ``y < 0`` get no margin."""
    cos = cos.clamp(-1.0, 1.0)
    rows = torch.nonzero(y >= 0).flatten()
    out = cos.clone()
    if rows.numel():
        c = cos[rows, y[rows]]
        if kind == "arc":
            # cos(θ + m) = cos θ cos m − sin θ sin m, with sin θ = √(1 − cos²θ) >= 0 (θ in [0, π])
            t = c * math.cos(m) - torch.sqrt((1.0 - c * c).clamp_min(0.0)) * math.sin(m)
        elif kind == "cos":
            t = c - m
        else:
            raise ValueError(f"margin kind must be 'arc' or 'cos', got {kind!r}")
        out = out.index_put((rows, y[rows]), t)
    return s * out


def cosine_matrix(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` cosines between embeddings ``e`` [B, d] and class centres ``w`` [C, d]."""
    return F.normalize(e, dim=1) @ F.normalize(w, dim=1).t()


def adadistill_alpha(e_s: torch.Tensor, e_t: torch.Tensor, w_y: torch.Tensor) -> torch.Tensor:
    """``α' = clamp(cos(e_s, e_t) · cos(w_y, e_t), 1e-6, 1)`` per sample ([B])."""
    return (F.cosine_similarity(e_s, e_t, dim=1) * F.cosine_similarity(w_y, e_t, dim=1)).clamp(1e-6, 1.0)


@torch.no_grad()
def adadistill_update(w: torch.Tensor, e_s: torch.Tensor, e_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """In place, without gradient: ``w_y ← α'·w_y + (1 − α')·ê_t`` for every sample (a class seen
    several times in the batch takes its last sample's update, computed from the centre before the
    batch). Returns α' [B]."""
    e_s, e_t = e_s.detach().float(), e_t.detach().float()
    alpha = adadistill_alpha(e_s, e_t, w[y].float())
    new = alpha.view(-1, 1) * w[y].float() + (1 - alpha.view(-1, 1)) * F.normalize(e_t, dim=1)
    last = {}
    for i, c in enumerate(y.tolist()):
        last[c] = i
    idx = torch.tensor(list(last.values()), dtype=torch.long, device=w.device)
    w[y[idx]] = new[idx].to(w.dtype)
    return alpha


def qud_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """``mean_i CE(0, [q_i·k_i, q_i·Q]/τ)`` with ``q``, ``k`` [B, d] and ``queue`` [K, d]
    (all already normalised)."""
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.t()
    logits = torch.cat([pos, neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def embedding_distance(e_s: torch.Tensor, e_t: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``mean(1 − cos(e_s, e_t))`` (``cosine``) or ``mean ‖ê_s − ê_t‖²`` (``mse``)."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(e_s, e_t, dim=1)).mean()
    if kind == "mse":
        return (F.normalize(e_s, dim=1) - F.normalize(e_t, dim=1)).pow(2).sum(1).mean()
    raise ValueError(f"kind must be 'cosine' or 'mse', got {kind!r}")


def check_same_size(e_s: torch.Tensor, e_t: torch.Tensor, who: str, proj_hint: bool = False) -> None:
    """One line naming the fix when student and teacher embeddings differ in size."""
    if e_t is None:
        raise ValueError(f"'{who}' needs the teacher's embeddings, but the run has no teacher")
    if e_s.shape[1] != e_t.shape[1]:
        fix = " or give the term proj: true (a learned linear projection)" if proj_hint else ""
        raise ValueError(f"'{who}': the student's embeddings have {e_s.shape[1]} dimensions and the teacher's "
                         f"{e_t.shape[1]}; set student.kwargs.embedding_size: {e_t.shape[1]}{fix}")


def num_identities(rec: BatchRecord) -> int:
    """The number of training identities of a run (the objective puts it in ``rec.extra``)."""
    n = rec.extra.get("num_classes")
    if n is None:
        labels = rec.extra.get("train_labels")
        if labels is None:
            raise ValueError("a margin head needs the number of training identities (run it with task: faces)")
        n = int(labels.max()) + 1
    return int(n)


# --------------------------------------------------------------------------- terms
class MarginHead(LossTerm):
    """Class centres ``W`` [C, d] (normal init, sd 0.01) built from the first batch. A head sets
    ``kind`` (the margin's form) and ``default_m`` (the margin when the recipe gives no ``m``)."""

    needs_labels = True
    kind = "arc"
    default_m = 0.5

    def __init__(self, s: float = 64.0, m: Optional[float] = None):
        super().__init__()
        if s <= 0:
            raise ValueError(f"s must be positive, got {s}")
        m = self.default_m if m is None else m
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise ValueError(f"m needs a number (the margin), got {m!r}")
        self.s, self.m = float(s), float(m)
        self.weight = None

    def setup(self, probe: BatchRecord) -> None:
        if self.weight is None:
            d = probe.s_logits.shape[1]
            g = torch.Generator().manual_seed(0)
            w = torch.randn(num_identities(probe), d, generator=g) * 0.01
            self.weight = nn.Parameter(w.to(probe.s_logits.device))

    def logits(self, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return margin_logits(cosine_matrix(e, self.weight), y, self.s, self.m, self.kind)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return F.cross_entropy(self.logits(rec.s_logits, rec.y), rec.y)


@register_loss("arcface", "ArcFace margin head: CE over s·cos(θ_y + m) / s·cos θ_j (training only)",
               "Deng et al., ArcFace: Additive Angular Margin Loss for Deep Face Recognition, CVPR 2019")
class ArcFaceLoss(MarginHead):
    kind, default_m = "arc", 0.5


@register_loss("cosface", "CosFace margin head: CE over s·(cos θ_y − m) / s·cos θ_j (training only)",
               "Wang et al., CosFace: Large Margin Cosine Loss for Deep Face Recognition, CVPR 2018")
class CosFaceLoss(MarginHead):
    kind, default_m = "cos", 0.35


@register_loss("embed_kd", "embedding KD: 1 − cos(e_s, e_t) or ‖ê_s − ê_t‖² on normalised embeddings",
               "e.g. Shi et al. 2021; the embedding-level baseline of AdaDistill (ECCV 2024)")
class EmbeddingKD(LossTerm):
    needs_teacher = True

    def __init__(self, kind: str = "cosine", proj: bool = False):
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"kind must be 'cosine' or 'mse', got {kind!r}")
        self.kind, self.proj = kind, bool(proj)
        self.projection = None

    def setup(self, probe: BatchRecord) -> None:
        e_s, e_t = probe.s_logits, probe.t_logits
        if self.proj and e_t is not None and e_s.shape[1] != e_t.shape[1] and self.projection is None:
            self.projection = nn.Linear(e_s.shape[1], e_t.shape[1], bias=False).to(e_s.device)
        if self.projection is None:
            check_same_size(e_s, e_t, "embed_kd", proj_hint=True)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        e_s = rec.s_logits if self.projection is None else self.projection(rec.s_logits)
        return embedding_distance(e_s, rec.teacher_logits("embed_kd").float(), self.kind)


@register_loss("adadistill", "AdaDistill: ArcFace whose class centres move towards the teacher's embeddings "
                             "(α' = clamp(cos(e_s,e_t)·cos(w_y,e_t), 1e-6, 1))",
               "Boutros et al., AdaDistill: Adaptive Knowledge Distillation for Deep Face Recognition, ECCV 2024")
class AdaDistillLoss(MarginHead):
    needs_teacher = True
    kind, default_m = "arc", 0.45

    def __init__(self, s: float = 64.0, m: Optional[float] = None):
        super().__init__(s, m)
        self.last_alpha = float("nan")

    def setup(self, probe: BatchRecord) -> None:
        check_same_size(probe.s_logits, probe.t_logits, "adadistill")
        super().setup(probe)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        e_t = rec.teacher_logits("adadistill").float()
        alpha = adadistill_update(self.weight.data, rec.s_logits, e_t, rec.y)
        self.last_alpha = float(alpha.mean())
        return F.cross_entropy(self.logits(rec.s_logits, rec.y), rec.y)


@register_loss("qud", "QUD: label-free contrastive KD, CE to q·k over [q·k, q·queue]/τ with a FIFO queue "
                      "of teacher embeddings",
               "Kolf, Damer, Boutros, QUD: Unsupervised Knowledge Distillation for Deep Face Recognition, "
               "BMVC 2024")
class QUDLoss(LossTerm):
    needs_teacher = True

    def __init__(self, queue_size: int = 1024, tau: float = 0.1):
        super().__init__()
        if int(queue_size) < 1 or tau <= 0:
            raise ValueError(f"queue_size must be >= 1 and tau > 0, got {queue_size}, {tau}")
        self.queue_size, self.tau = int(queue_size), float(tau)
        self.register_buffer("queue", torch.zeros(0, 0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def setup(self, probe: BatchRecord) -> None:
        check_same_size(probe.s_logits, probe.t_logits, "qud")
        if self.queue.numel() == 0:  # random unit vectors until teacher embeddings replace them
            g = torch.Generator().manual_seed(0)
            q = F.normalize(torch.randn(self.queue_size, probe.t_logits.shape[1], generator=g), dim=1)
            self.queue = q.to(probe.t_logits.device)

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """FIFO: the batch's keys overwrite the oldest entries (wrapping around)."""
        n = min(k.shape[0], self.queue_size)
        idx = (int(self.ptr) + torch.arange(n, device=k.device)) % self.queue_size
        self.queue[idx] = k[-n:].to(self.queue.dtype)
        self.ptr.fill_((int(self.ptr) + n) % self.queue_size)

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        q = F.normalize(rec.s_logits, dim=1)
        k = F.normalize(rec.teacher_logits("qud").float(), dim=1)
        loss = qud_loss(q, k, self.queue.clone(), self.tau)
        if self.training:
            self.enqueue(k)
        return loss


@register_loss("quantface", "QuantFace: a quantised copy of the full-precision model matches its normalised "
                            "embeddings (‖ê_q − ê_fp‖²) on synthetic images (task: faces)",
               "Boutros, Damer, Kuijper, QuantFace: Towards Lightweight Face Recognition by Synthetic Data "
               "Low-bit Quantization, ICPR 2022")
class QuantFaceLoss(LossTerm):
    """The loss is :func:`embedding_distance` (``mse``); ``weight_bits``/``act_bits`` (2..16),
    ``n_synthetic`` images synthesised from the full-precision model (BN-statistics inversion,
    ``inversion_iters`` Adam steps, drawn from ``synthetic_seed``: one synthetic set for every run
    seed, which then varies the training order) are read by ``task: faces``, which builds the
    quantised student from the teacher checkpoint and trains it on the synthetic images only."""

    needs_teacher = True

    def __init__(self, weight_bits: int = 6, act_bits: int = 6, n_synthetic: int = 1024,
                 inversion_iters: int = 200, calib_batches: int = 8, synthetic_seed: int = 0):
        super().__init__()
        for name, b in (("weight_bits", weight_bits), ("act_bits", act_bits)):
            if not 2 <= int(b) <= 16:
                raise ValueError(f"{name} must be from 2 to 16, got {b}")
        if int(n_synthetic) < 2 or int(inversion_iters) < 0 or int(calib_batches) < 1:
            raise ValueError("n_synthetic must be >= 2, inversion_iters >= 0 and calib_batches >= 1")
        self.weight_bits, self.act_bits = int(weight_bits), int(act_bits)
        self.n_synthetic, self.inversion_iters = int(n_synthetic), int(inversion_iters)
        self.calib_batches = int(calib_batches)
        self.synthetic_seed = int(synthetic_seed)

    def setup(self, probe: BatchRecord) -> None:
        check_same_size(probe.s_logits, probe.t_logits, "quantface")

    def forward(self, rec: BatchRecord) -> torch.Tensor:
        return embedding_distance(rec.s_logits, rec.teacher_logits("quantface").float(), "mse")

