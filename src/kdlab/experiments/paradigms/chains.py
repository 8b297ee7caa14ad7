"""Paradigms that chain ordinary runs of kdlab.train.trainer.train: Born-Again Networks, Teacher
Assistant and self-distillation. Each link is a normal run folder (best.pt, result.json, ...),
so an interrupted chain resumes where it stopped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from kdlab.core.checkpoint import load_model
from kdlab.core.config import Recipe
from kdlab.experiments.paradigms.common import ce_only, derive, distill_loss, student_section, teacher_from


def _train(recipe, run_dir, progress, method):
    from kdlab.train.trainer import train

    return train(recipe, run_dir, progress=progress, method=method)


@torch.no_grad()
def ensemble_accuracy(checkpoints: list, recipe: Recipe, split: str = "test") -> float:
    """Top-1 of the ensemble that averages the models' softmax outputs."""
    from kdlab.data import BatchLoader, load_dataset

    d = recipe.data
    splits = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction,
                          label_fraction=d.label_fraction, seed=recipe.train.seed)
    tset = getattr(splits, split)
    loader = BatchLoader(tset, 512, shuffle=False, mean=splits.info.mean, std=splits.info.std)
    probs, ys = None, []
    for ck in checkpoints:
        model, _ = load_model(ck)
        ps = []
        ys = []
        for x, y, _ in loader.epoch(0):
            ps.append(torch.softmax(model(x), 1))
            ys.append(y)
        p = torch.cat(ps)
        probs = p if probs is None else probs + p
    return (probs.argmax(1) == torch.cat(ys)).float().mean().item()


def run_ban(recipe: Recipe, out_dir, *, generations: int = 2, progress: bool = False, log=print) -> dict:
    """Born-Again Networks: gen0 = the recipe's student trained with CE; gen i (1..k) = the same
    architecture taught by gen i−1's best.pt with the recipe's distillation loss (0.1·CE + 0.9·KD
    when the recipe has none); plus the test accuracy of the ensemble of generations 1..k."""
    if generations < 1:
        raise ValueError("BAN needs generations >= 1 (e.g. --generations 2)")
    out_dir = Path(out_dir)
    st = student_section(recipe)
    gen0 = derive(recipe, loss=ce_only(recipe), teacher=None, name=f"{recipe.name}-ban-gen0")
    rows = [{"generation": 0, **_train(gen0, out_dir / "gen0", progress, "ban-gen0")}]
    log(f"BAN gen 0: test {rows[-1]['test_acc']:.4f}")
    loss = distill_loss(recipe)
    for g in range(1, generations + 1):
        r = derive(recipe, student=st, teacher=teacher_from(out_dir / f"gen{g - 1}" / "best.pt"),
                   loss=loss, name=f"{recipe.name}-ban-gen{g}")
        rows.append({"generation": g, **_train(r, out_dir / f"gen{g}", progress, f"ban-gen{g}")})
        log(f"BAN gen {g}: test {rows[-1]['test_acc']:.4f}")
    cks = [str(out_dir / f"gen{g}" / "best.pt") for g in range(1, generations + 1)]
    ens = ensemble_accuracy(cks, recipe)
    log(f"BAN ensemble of generations 1..{generations}: test {ens:.4f}")
    summary = {"paradigm": "ban", "generations": rows, "ensemble_test_acc": ens}
    (out_dir / "ban.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _n_params(name: str, kwargs: dict, info) -> int:
    from kdlab.models import create_model

    m = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels, **kwargs)
    return sum(p.numel() for p in m.parameters())


def choose_assistant(recipe: Recipe, candidates: Optional[list[str]] = None) -> str:
    """The candidate model whose parameter count is closest (in log scale) to the geometric mean
    of the teacher's and the student's, among those strictly between the two."""
    from kdlab.data import load_dataset
    from kdlab.models import list_models

    if recipe.teacher is None:
        raise ValueError("the teacher-assistant chain needs a recipe with a teacher section")
    d = recipe.data
    info = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction).info
    n_t = _n_params(recipe.teacher.model, recipe.teacher.kwargs, info)
    n_s = _n_params(recipe.student.model, recipe.student.kwargs, info)
    lo, hi = sorted((n_s, n_t))
    target = math.sqrt(lo * hi)
    names = candidates or [n for n, _ in list_models()]
    best, best_d = None, float("inf")
    for name in names:
        try:
            n = _n_params(name, {}, info)
        except Exception:  # a model that cannot take this data set's input
            continue
        if lo < n < hi and abs(math.log(n / target)) < best_d:
            best, best_d = name, abs(math.log(n / target))
    if best is None:
        raise ValueError(f"no model sized between the student ({n_s:,} params) and the teacher "
                         f"({n_t:,}); name one with --assistant")
    return best


def run_ta(recipe: Recipe, out_dir, *, assistant: Optional[str] = None, progress: bool = False,
           log=print) -> dict:
    """Teacher Assistant: the assistant is distilled from the recipe's teacher with the recipe's
    loss, then the student from the assistant's best.pt with the same loss."""
    from kdlab.experiments.study import ensure_teacher

    out_dir = Path(out_dir)
    ensure_teacher(recipe, progress=progress, log=log)
    name = assistant or choose_assistant(recipe)
    loss = distill_loss(recipe)
    ra = derive(recipe, student={"model": name, "kwargs": {}}, loss=loss, name=f"{recipe.name}-ta-assistant")
    res_a = _train(ra, out_dir / "assistant", progress, f"ta-assistant-{name}")
    log(f"TA assistant {name}: test {res_a['test_acc']:.4f}")
    rs = derive(recipe, teacher=teacher_from(out_dir / "assistant" / "best.pt"), loss=loss,
                name=f"{recipe.name}-ta-student")
    res_s = _train(rs, out_dir / "student", progress, "ta-student")
    log(f"TA student {recipe.student.model}: test {res_s['test_acc']:.4f}")
    summary = {"paradigm": "ta", "assistant": name, "assistant_result": res_a, "student_result": res_s}
    (out_dir / "ta.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_self(recipe: Recipe, out_dir, *, checkpoint: Optional[str] = None, progress: bool = False,
             log=print) -> dict:
    """Self-distillation: the student architecture trained with CE (or ``checkpoint``), frozen,
    then teaching a fresh copy of the same architecture with the recipe's distillation loss."""
    out_dir = Path(out_dir)
    if checkpoint is None:
        r0 = derive(recipe, loss=ce_only(recipe), teacher=None, name=f"{recipe.name}-self-teacher")
        res0 = _train(r0, out_dir / "teacher", progress, "self-teacher")
        checkpoint = str(out_dir / "teacher" / "best.pt")
        log(f"self-distillation teacher (same architecture): test {res0['test_acc']:.4f}")
    else:
        res0 = None
    tsec = teacher_from(Path(checkpoint))
    if (tsec["model"], tsec["kwargs"]) != (recipe.student.model, dict(recipe.student.kwargs)):
        raise ValueError(f"self-distillation needs a checkpoint of the student's own architecture "
                         f"({recipe.student.model}), got {tsec['model']}")
    r = derive(recipe, teacher=tsec, loss=distill_loss(recipe), name=f"{recipe.name}-self")
    res = _train(r, out_dir / "student", progress, "self-student")
    log(f"self-distilled student: test {res['test_acc']:.4f}")
    summary = {"paradigm": "self", "teacher_result": res0, "student_result": res}
    (out_dir / "self.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
