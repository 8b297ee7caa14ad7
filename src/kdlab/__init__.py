"""kdlab: knowledge distillation with honest measurements.

``kdlab.fit(student, teacher, train_data=..., val_data=...)`` distils any model on any data;
``kdlab.fit_recipe("digits/kd")`` runs a recipe. Both import torch only when called (``import
kdlab`` is cheap), yet show their real signatures to ``help()`` and IDEs: the parameters below are
those of :func:`kdlab.api.fit` / :func:`kdlab.api.fit_recipe` (a test keeps them equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from kdlab.version import __version__  # noqa: F401

if TYPE_CHECKING:  # for IDEs and type checkers only: no torch at import time
    from torch import nn


def fit(student: Union["nn.Module", str], teacher: Union["nn.Module", str, None] = None, *, train_data,
        val_data=None, test_data=None, loss: Optional[Sequence[dict]] = None, train: Optional[dict] = None,
        mask: Optional[dict] = None, augment: Optional[dict] = None, normalize: Optional[tuple] = None,
        run_dir: Union[str, Path] = "runs/fit", num_classes: Optional[int] = None, num_workers: int = 0,
        progress: bool = True, resume: bool = True, callbacks=(), method: str = "fit",
        teacher_cache=None) -> dict:
    """Distil ``teacher`` into ``student`` (or train ``student`` alone) and return the result dict
    (``test_acc``, ``val_acc``, ``best_epoch``, ``train_time_s``, ...).

    ``student`` / ``teacher``: ``nn.Module`` objects, model specs (``resnet18``, ``timm:...``) or
    checkpoint paths; ``train_data`` / ``val_data`` / ``test_data``: a ``Dataset``, ``DataLoader``,
    ``TensorSet`` or ``(x, y)`` tensors; ``loss`` / ``train`` / ``mask`` / ``augment``: the recipe
    sections of the same names; ``run_dir``: the run folder (resumed when re-run). The full
    description is :func:`kdlab.api.fit`'s."""
    from kdlab.api import fit as _fit

    return _fit(student, teacher, train_data=train_data, val_data=val_data, test_data=test_data, loss=loss,
                train=train, mask=mask, augment=augment, normalize=normalize, run_dir=run_dir,
                num_classes=num_classes, num_workers=num_workers, progress=progress, resume=resume,
                callbacks=callbacks, method=method, teacher_cache=teacher_cache)


def fit_recipe(recipe, run_dir: Union[str, Path, None] = None, *, overrides: Sequence[str] = (),
               progress: bool = True, resume: bool = True, callbacks=()) -> dict:
    """Train a recipe (a path, a shipped name or a ``Recipe``) into ``run_dir`` (default
    ``runs/<name>/seed<k>``), training its missing teachers first; see :func:`kdlab.api.fit_recipe`."""
    from kdlab.api import fit_recipe as _fit_recipe

    return _fit_recipe(recipe, run_dir, overrides=overrides, progress=progress, resume=resume,
                       callbacks=callbacks)
