"""Teacher Assistant (Mirzadeh et al., AAAI 2020): teacher -> assistant -> student."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from kdlab.core.io import write_json
from kdlab.experiments.paradigms.base import ParadigmParams, register_paradigm
from kdlab.experiments.paradigms.common import derive, distill_loss, teacher_from, train_link
from kdlab.train.recipe import Recipe


class TaParams(ParadigmParams):
    assistant: Optional[str] = None  # model name; default: sized between teacher and student


def _n_params(name: str, kwargs: dict, info) -> int:
    from kdlab.models import create_model

    m = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels, **kwargs)
    return sum(p.numel() for p in m.parameters())


def choose_assistant(recipe: Recipe, candidates: Optional[list[str]] = None) -> str:
    """The candidate model whose parameter count is closest (in log scale) to the geometric mean
    of the teacher's and the student's, among those strictly between the two."""
    from kdlab.models import list_models
    from kdlab.train.build import load_splits

    if recipe.teacher is None:
        raise ValueError("the teacher-assistant chain needs a recipe with a teacher section")
    info = load_splits(recipe).info
    n_t = _n_params(recipe.teacher.model, recipe.teacher.kwargs, info)
    n_s = _n_params(recipe.student.model, recipe.student.kwargs, info)
    lo, hi = sorted((n_s, n_t))
    target = math.sqrt(lo * hi)
    best, best_d = None, float("inf")
    for name in candidates or [n for n, _ in list_models()]:
        try:
            n = _n_params(name, {}, info)
        except Exception:  # a model that cannot take this data set's input
            continue
        if lo < n < hi and abs(math.log(n / target)) < best_d:
            best, best_d = name, abs(math.log(n / target))
    if best is None:
        raise ValueError(f"no model sized between the student ({n_s:,} params) and the teacher "
                         f"({n_t:,}); name one with --set paradigm.assistant=MODEL")
    return best


@register_paradigm("ta", "Teacher Assistant: teacher -> assistant (chosen or sized between) -> student",
                   "Mirzadeh et al., Improved Knowledge Distillation via Teacher Assistant, AAAI 2020",
                   params=TaParams, needs_teacher=True)
def run_ta(recipe: Recipe, params: TaParams, out_dir, *, progress: bool = False, log=print) -> dict:
    """The assistant is distilled from the recipe's teacher with the recipe's loss, then the
    student from the assistant's best.pt with the same loss."""
    out_dir = Path(out_dir)
    name = params.assistant or choose_assistant(recipe)
    loss = distill_loss(recipe)
    ra = derive(recipe, student={"model": name, "kwargs": {}}, loss=loss, name=f"{recipe.name}-ta-assistant")
    res_a = train_link(ra, out_dir / "assistant", progress, f"ta-assistant-{name}")
    log(f"TA assistant {name}: test {res_a['test_acc']:.4f}")
    rs = derive(recipe, teacher=teacher_from(out_dir / "assistant" / "best.pt"), loss=loss,
                name=f"{recipe.name}-ta-student")
    res_s = train_link(rs, out_dir / "student", progress, "ta-student")
    log(f"TA student {recipe.student.model}: test {res_s['test_acc']:.4f}")
    summary = {"paradigm": "ta", "assistant": name, "assistant_result": res_a, "student": res_s,
               "train_time_s": res_a["train_time_s"] + res_s["train_time_s"], "extra": {"assistant": name}}
    write_json(out_dir / "ta.json", summary)
    return summary
