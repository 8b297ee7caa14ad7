"""One run of a recipe of any task (``kdlab distill`` / ``train-teacher`` on a non-classification
recipe): the task's shared work (its teacher trained when missing), then the run, resumed when
unfinished, with the task's headline metrics printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from kdlab.tasks.base import get_task


def run_task_recipe(recipe, out: Optional[str] = None, *, progress: bool = True, resume: bool = True,
                    method: str = "", log: Callable = print) -> dict:
    """Train ``recipe`` (its ``task``) into ``out`` (default ``runs/<name>/seed<k>``); the result dict."""
    task = get_task(recipe.task)
    out = Path(out or f"runs/{recipe.name}/seed{recipe.train.seed}")
    ctx = task.prepare_study({recipe.name: recipe}, out, progress=progress, log=log)
    log(f"{recipe.task}: {recipe.name}: {recipe.student.model} -> {out}")
    if (out / "result.json").exists() and resume:
        log("  (finished earlier: its checked result is reused; --restart trains it again)")
    res = task.train(recipe, out, context=ctx, method=method or recipe.name, progress=progress, resume=resume)
    keys = [f"{s}_{m.name}" for m in task.metrics for s in ("val", "test")] + ["best_epoch", "epochs_run"]
    log(json.dumps({k: res[k] for k in keys if k in res}))
    log(f"checkpoint: {out / 'best.pt'}")
    return res
