"""The training loss of torchvision's detectors (``tv_fcos``, ``tv_retinanet``) as a loss term, and
which detection terms work with them.

* ``tv_det`` — the detector's own losses as torchvision computes them in training mode
  (``FCOS.compute_loss`` / ``RetinaNet.compute_loss``), from the student's output and the batch's
  targets converted to torchvision's list of dicts
  (:func:`kdlab.models.tv_detection.to_torchvision_targets`): FCOS = sigmoid focal loss + GIoU loss
  + centerness BCE, RetinaNet = sigmoid focal loss + L1 on the box deltas, each per foreground
  point / anchor, summed with weight 1 each (torchvision's training reference sums them).

With a torchvision detector as student or teacher, the feature terms ``det_fitnets`` and ``fgd``
work (they read the FPN maps tapped at ``p3``..``p5``, whatever head follows). ``gfl``, ``ld`` and
``det_kd`` read a GFL head's output (per-edge box distributions, GFL's point layout and assignment);
:func:`check_detector_terms` refuses them in one line before anything is trained.
"""

from __future__ import annotations

from kdlab.distill.losses.base import BatchRecord, LossTerm, register_loss
from kdlab.distill.losses.detection import record_layout
from kdlab.models.tv_detection import is_tv_detector, to_torchvision_targets

#: the registered torchvision detectors
TV_MODELS = ("tv_fcos", "tv_retinanet")
#: terms that need kdlab's GFL head, and why
GFL_ONLY = {"gfl": "is gfl_det's own loss (train a torchvision detector with tv_det)",
            "ld": "distils per-edge box distributions, which FCOS / RetinaNet heads do not have",
            "det_kd": "reads GFL's class logits on GFL's point layout and assignment"}


@register_loss("tv_det", "a torchvision detector's own training loss (FCOS: focal + GIoU + centerness; "
                         "RetinaNet: focal + L1), computed by torchvision from the kdlab targets",
               "Tian et al., FCOS, ICCV 2019; Lin et al., Focal Loss (RetinaNet), ICCV 2017; torchvision")
class TVDetLoss(LossTerm):
    """The sum of torchvision's losses of a ``tv_fcos`` / ``tv_retinanet`` student (no options)."""

    needs_labels = True

    def parts(self, rec: BatchRecord) -> dict:
        lay = record_layout(rec)
        if not hasattr(lay, "tv_loss"):
            raise ValueError("loss term tv_det trains a torchvision detector (student.model: tv_fcos or "
                             "tv_retinanet); for gfl_det use term gfl")
        return lay.tv_loss(rec.s_logits, to_torchvision_targets(rec.y))

    def forward(self, rec: BatchRecord):
        return sum(self.parts(rec).values())


def _is_tv(model) -> bool:
    return model in TV_MODELS if isinstance(model, str) else is_tv_detector(model)


def check_detector_terms(student, teacher, term_names) -> None:
    """Refuse (ValueError, one line) terms that cannot run on these detectors: ``gfl`` / ``ld`` /
    ``det_kd`` when the student or teacher is a torchvision detector, ``tv_det`` when the student
    is not one. ``student`` / ``teacher``: models, or their recipe names (``tv_fcos``, ...; a
    check before anything is built or trained); ``teacher`` None when there is none."""
    names = {str(n).split("#")[0] for n in term_names}
    tv_s, tv_t = _is_tv(student), teacher is not None and _is_tv(teacher)
    if tv_s or tv_t:
        who = "student" if tv_s else "teacher"
        for n in [n for n in GFL_ONLY if n in names]:
            raise ValueError(f"loss term {n} is not available with a torchvision detector as {who}: it {GFL_ONLY[n]}; "
                             f"use tv_det (the detector's loss), fgd or det_fitnets")
    if "tv_det" in names and not tv_s:
        raise ValueError(f"loss term tv_det trains a torchvision detector (student.model: tv_fcos or tv_retinanet), "
                         f"not {student if isinstance(student, str) else type(student).__name__}; for gfl_det "
                         f"use term gfl")
