"""One distillation step of a loss term on tiny models, shared by test_losses_library.py and
test_methods_part2.py (their gradient-flow tests)."""

from __future__ import annotations

import torch

from kdlab.distill.losses import LOSSES, BatchRecord
from kdlab.models import create_model
from kdlab.models.taps import Taps


def distill_step(name: str, params: dict, *, forwards: bool = False):
    """``(term, student, teacher, loss)`` after one step of loss term ``name`` (built with
    ``params``): seed 0, a ``cnn_tiny`` student and an eval-mode ``cnn_small`` teacher (1 channel,
    10 classes), 8 random 8x8 images with labels ``arange(8) % 10``; the teacher's logits and the
    term's teacher layers are taken without gradient, the student's with; then ``term.setup(rec)``,
    ``loss = term(rec)`` and ``loss.backward()``. ``forwards``: the term may run the models
    itself, so the teacher is frozen and ``rec.extra`` holds ``forward_student`` and
    ``forward_teacher``."""
    torch.manual_seed(0)
    student = create_model("cnn_tiny", num_classes=10, in_channels=1)
    teacher = create_model("cnn_small", num_classes=10, in_channels=1).eval()
    if forwards:
        for p in teacher.parameters():
            p.requires_grad_(False)
    term = LOSSES.get(name)(**params)
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 10
    with torch.no_grad(), Taps(teacher, term.teacher_layers(), detach=True) as tt:
        t_logits = teacher(x)
        t_feats = {n: tt[n] for n in term.teacher_layers()}
    with Taps(student, term.student_layers()) as st:
        s_logits = student(x)
        s_feats = {n: st[n] for n in term.student_layers()}
    extra = {"forward_student": student, "forward_teacher": lambda v: teacher(v).detach()} if forwards else {}
    rec = BatchRecord(x=x, y=y, s_logits=s_logits, t_logits=t_logits, s_feats=s_feats, t_feats=t_feats,
                      index=torch.arange(8), extra=extra)
    term.setup(rec)
    loss = term(rec)
    loss.backward()
    return term, student, teacher, loss
