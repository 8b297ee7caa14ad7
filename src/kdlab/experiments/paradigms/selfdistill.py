"""Self-distillation: a model taught by a frozen trained copy of itself."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdlab.core.io import write_json
from kdlab.experiments.paradigms.base import ParadigmParams, register_paradigm
from kdlab.experiments.paradigms.common import ce_only, derive, distill_loss, teacher_from, train_link
from kdlab.train.recipe import Recipe


class SelfParams(ParadigmParams):
    checkpoint: Optional[str] = None  # a trained checkpoint of the student's architecture


@register_paradigm("self", "self-distillation: a model taught by a frozen trained copy of itself",
                   "Furlanello et al. 2018; Zhang et al., Be Your Own Teacher, ICCV 2019", params=SelfParams)
def run_self(recipe: Recipe, params: SelfParams, out_dir, *, progress: bool = False, log=print) -> dict:
    """The student architecture trained with CE (or ``checkpoint``), frozen, then teaching a fresh
    copy of the same architecture with the recipe's distillation loss."""
    out_dir = Path(out_dir)
    checkpoint, res0 = params.checkpoint, None
    if checkpoint is None:
        r0 = derive(recipe, loss=ce_only(recipe), teacher=None, name=f"{recipe.name}-self-teacher")
        res0 = train_link(r0, out_dir / "teacher", progress, "self-teacher")
        checkpoint = str(out_dir / "teacher" / "best.pt")
        log(f"self-distillation teacher (same architecture): test {res0['test_acc']:.4f}")
    tsec = teacher_from(Path(checkpoint))
    if (tsec["model"], tsec["kwargs"]) != (recipe.student.model, dict(recipe.student.kwargs)):
        raise ValueError(f"self-distillation needs a checkpoint of the student's own architecture "
                         f"({recipe.student.model}), got {tsec['model']}")
    r = derive(recipe, teacher=tsec, loss=distill_loss(recipe), name=f"{recipe.name}-self")
    res = train_link(r, out_dir / "student", progress, "self-student")
    log(f"self-distilled student: test {res['test_acc']:.4f}")
    summary = {"paradigm": "self", "teacher_result": res0, "student": res,
               "train_time_s": (res0["train_time_s"] if res0 else 0.0) + res["train_time_s"]}
    write_json(out_dir / "self.json", summary)
    return summary
