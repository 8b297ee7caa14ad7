"""Helpers shared by the paradigms: recipe surgery and teacher-checkpoint plumbing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdlab.train.recipe import Recipe


def derive(recipe: Recipe, *, student: Optional[dict] = None, teacher: Optional[dict] = "keep",
           loss: Optional[list] = None, name: Optional[str] = None, mask_off: bool = True) -> Recipe:
    """A copy of ``recipe`` with the student / teacher / loss sections replaced (masks off)."""
    sections = {k: v for k, v in (("student", student), ("loss", loss), ("name", name)) if v}
    if teacher != "keep":
        sections["teacher"] = teacher
    if mask_off:
        sections["mask"] = None
    return recipe.derive(**sections)


def ce_only(recipe: Recipe) -> list:
    return [{"term": "ce", "weight": 1.0}]


def distill_loss(recipe: Recipe) -> list:
    """The recipe's loss if it distils (has a teacher term), else the standard 0.1·CE + 0.9·KD(T=4)."""
    from kdlab.distill.losses import build_terms

    loss = [t.model_dump() for t in recipe.loss]
    if any(term.needs_teacher for _, _, term in build_terms(recipe.loss)):
        return loss
    return [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0}]


def teacher_from(ckpt: Path) -> dict:
    """A recipe ``teacher`` section pointing at a kdlab model checkpoint."""
    from kdlab.core.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    return {"model": ck["model_name"], "kwargs": dict(ck.get("model_kwargs") or {}),
            "checkpoint": str(ckpt), "recipe": None}


def student_section(recipe: Recipe) -> dict:
    return {"model": recipe.student.model, "kwargs": dict(recipe.student.kwargs)}


def train_link(recipe: Recipe, run_dir, progress: bool, method: str) -> dict:
    """One run of a chain (a normal run folder: resumes, skips when finished)."""
    from kdlab.train.build import train

    return train(recipe, run_dir, progress=progress, method=method)
