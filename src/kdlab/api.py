"""The Python entry points: distil any ``nn.Module`` on any data, or run a recipe.

    import kdlab
    result = kdlab.fit(student, teacher, train_data=train_ds, val_data=val_ds, test_data=test_ds,
                       loss=[{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4}],
                       train={"epochs": 10, "optimizer": "adamw", "lr": 1e-3}, run_dir="runs/mine")

Nothing is registered globally, so calling it twice in a notebook is safe. The result dict has the
keys of ``result.json`` (``val_acc``, ``test_acc``, ``best_epoch``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

DEFAULT_KD = [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0}]


def _model(m, num_classes, in_channels, what: str):
    from kdlab.models.adapters import load_model
    from kdlab.models.adapters import adapt_outputs, build_model

    if isinstance(m, nn.Module):
        return adapt_outputs(m), None
    if isinstance(m, (str, Path)) and str(m).endswith((".pt", ".pth")) and Path(m).is_file():
        model, ck = load_model(m)
        return adapt_outputs(model), {"model_name": ck["model_name"], "model_kwargs": ck.get("model_kwargs", {})}
    if isinstance(m, str):
        if num_classes is None:
            raise ValueError(f"{what} '{m}' is built by name: give num_classes=N (or data with a .classes list)")
        return build_model(m, num_classes, in_channels), {"model_name": m, "model_kwargs": {}}
    raise ValueError(f"{what} must be an nn.Module, a model name or a checkpoint path, got {type(m).__name__}")


def fit(student: Union[nn.Module, str], teacher: Union[nn.Module, str, None] = None, *, train_data,
        val_data=None, test_data=None, loss: Optional[Sequence[dict]] = None, train: Optional[dict] = None,
        mask: Optional[dict] = None, augment: Optional[dict] = None, normalize: Optional[tuple] = None,
        run_dir: Union[str, Path] = "runs/fit", num_classes: Optional[int] = None, num_workers: int = 0,
        progress: bool = True, resume: bool = True, callbacks=(), method: str = "fit",
        teacher_cache=None) -> dict:
    """Distil ``teacher`` into ``student`` (or train ``student`` alone) and return the result dict.

    The arguments become a recipe (its ``loss``, ``train``, ``mask`` and ``data.augment``
    sections) built by :func:`kdlab.train.build.build_run` with the given models and data, like
    every run: ``train.teacher_mode`` is honoured (``cache-fp16``, the default, rounds the teacher's
    outputs to fp16 as a cached study run does; ``live`` keeps them fp32).

    Args:
        student, teacher: ``nn.Module`` objects (outputs may be tensors, tuples, dicts or HF
            ``ModelOutput``), model specs (``resnet18``, ``timm:...``, ``module:function``), or
            kdlab checkpoint paths (teacher).
        train_data, val_data, test_data: ``Dataset`` (streamed), ``DataLoader`` (used as is),
            ``TensorSet`` or an ``(x, y)`` tensor pair. Images are float ``[C, H, W]`` in [0, 1]
            (any size, any channels), labels ints. ``val_data`` selects the best epoch.
        loss: weighted terms as in a recipe (default: CE alone, or 0.1·CE + 0.9·KD(T=4) with a
            teacher). See ``kdlab losses``.
        train: the recipe's ``train`` section (epochs, batch_size, optimizer, lr, schedule,
            teacher_mode, ...).
        mask: the recipe's ``mask`` section (masked terms).
        augment: ``{"crop_pad": p, "flip": bool, "randaugment": k, "magnitude": m}`` batched
            augmentation on tensors (:mod:`kdlab.data.augment`).
        normalize: ``(mean, std)`` per channel, applied after augmentation (None: as given).
        run_dir: the run folder (checkpoints, metrics, result.json; resumes when re-run).
        teacher_cache: a :class:`kdlab.distill.teachers.TeacherStore` shared by several calls on the
            same data and seed (with a ``cache-*`` teacher_mode, the teacher's outputs are computed
            once and served to the later calls).
    """
    from kdlab.core.checkpoint import atomic_save, load_checkpoint
    from pydantic import ValidationError

    from kdlab.core.config import MaskCfg, TermCfg, TrainCfg, check_loss_numbers, describe_error
    from kdlab.train.recipe import Recipe
    from kdlab.core.seeding import derive_seed, seed_everything
    from kdlab.data.splits import DatasetInfo, Splits, TensorSet
    from kdlab.distill.losses import build_terms
    from kdlab.models.adapters import export_program
    from kdlab.train.build import build_run, trainer_for
    from kdlab.train.runtime import Runtime

    try:
        cfg = TrainCfg(**(train or {}))
    except ValidationError as e:
        raise ValueError(f"kdlab.fit: train.{describe_error(e)}") from None
    runtime = Runtime.from_cfg(cfg)
    mean, std = normalize if normalize is not None else (None, None)
    pair = lambda d: TensorSet(d[0].float(), d[1].long()) if _is_pair(d) else d  # noqa: E731
    train_data, val_data, test_data = pair(train_data), pair(val_data), pair(test_data)
    for what, data in (("train_data", train_data), ("val_data", val_data), ("test_data", test_data)):
        if data is not None and _size(data) == 0:
            raise ValueError(f"kdlab.fit: {what} is empty (0 samples); give at least one sample")
    shape = _input_shape(train_data)
    if num_classes is None:
        ds = getattr(train_data, "dataset", train_data)
        num_classes = len(ds.classes) if hasattr(ds, "classes") else None
    seed_everything(derive_seed(cfg.seed, "init"))
    s_model, s_spec = _model(student, num_classes, shape[0], "student")
    s_model = s_model.to(runtime.device)
    t_model = None
    if teacher is not None:
        t_model, _ = _model(teacher, num_classes, shape[0], "teacher")
    terms_cfg = [TermCfg.model_validate(t) for t in (loss or (DEFAULT_KD if teacher is not None else [{"term": "ce"}]))]
    check_loss_numbers(terms_cfg, "kdlab.fit")
    terms = build_terms(terms_cfg)
    if any(t.needs_teacher for _, _, t in terms) and t_model is None:
        raise ValueError("these loss terms need a teacher: pass teacher=... to kdlab.fit")
    mask_cfg = MaskCfg(**mask) if mask else None
    if any(t.needs_masks for _, _, t in terms) and mask_cfg is None:
        raise ValueError("a masked loss term needs mask={...} (e.g. mask={'method': 'grad'})")
    with torch.no_grad():
        was = s_model.training
        s_model.eval()
        n_out = s_model(torch.zeros(1, *shape, device=runtime.device)).shape[1]
        s_model.train(was)
    data_name = type(getattr(train_data, "dataset", train_data)).__name__
    meta = {"model_name": s_spec["model_name"] if s_spec else None,
            "model_kwargs": s_spec["model_kwargs"] if s_spec else {},
            "num_classes": int(n_out), "in_channels": int(shape[0]), "input_shape": list(shape),
            "dataset": data_name, "normalize": [list(mean), list(std)] if mean is not None else None}
    info = DatasetInfo(name=data_name, num_classes=int(n_out), in_channels=int(shape[0]), image_size=tuple(shape[1:]),
                       mean=mean, std=std, classes=())
    model_name = meta["model_name"] or type(s_model).__qualname__
    recipe = Recipe(name=method, student={"model": model_name},
                    teacher=None if t_model is None else {"model": teacher if isinstance(teacher, str) else type(t_model).__qualname__},
                    data={"augment": augment or {}, "num_workers": num_workers}, train=cfg.model_dump(),
                    loss=[t.model_dump() for t in terms_cfg], mask=mask_cfg)
    run = build_run(recipe, splits=Splits(train=train_data, val=val_data, test=test_data, info=info),
                    teacher=t_model, store=teacher_cache, runtime=runtime, student=s_model, meta=meta)
    identity = {"api": "fit", "student": s_spec or type(s_model).__qualname__,
                "teacher": None if teacher is None else (teacher if isinstance(teacher, str) else type(t_model).__qualname__),
                "loss": [t.model_dump() for t in terms_cfg], "train": cfg.model_dump(mode="json"),
                "mask": mask_cfg.model_dump() if mask_cfg else None, "augment": augment, "normalize": meta["normalize"],
                "input_shape": list(shape)}
    trainer = trainer_for(run, run_dir, progress=progress, method=method, callbacks=callbacks, identity=identity,
                          info={"model": model_name})
    result = trainer.fit(resume=resume)
    best = Path(run_dir) / "best.pt"
    if s_spec is None and runtime.is_main and best.is_file():  # rebuildable without the user's code
        ck = load_checkpoint(best)
        if ck.get("program") is None:
            ck["program"] = export_program(s_model, torch.zeros(2, *shape))
            atomic_save(ck, best)
    return result


def _is_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def _input_shape(data) -> tuple:
    """``[C, H, W]`` of the samples of any data ``kdlab.fit`` takes (its first batch)."""
    from kdlab.data.streaming import as_loader, first_batch

    x, _, _ = first_batch(as_loader(data, 1, shuffle=False, seed=0), "train_data")
    return tuple(x.shape[1:])


def _size(data) -> Optional[int]:
    """Samples in ``data`` (a Dataset, DataLoader, TensorSet or ``(x, y)`` pair); None if unknown."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        return int(data[0].shape[0])
    try:
        return len(getattr(data, "dataset", data))
    except TypeError:
        return None


def fit_recipe(recipe, run_dir: Union[str, Path, None] = None, *, overrides: Sequence[str] = (),
               progress: bool = True, resume: bool = True, callbacks=()) -> dict:
    """Train a recipe (a path, a shipped name or a :class:`kdlab.train.recipe.Recipe`) into
    ``run_dir`` (default ``runs/<name>/seed<k>``), training its missing teachers first."""
    from kdlab.train.recipe import Recipe, load_recipe
    from kdlab.train.build import ensure_teachers, train as train_recipe

    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, list(overrides))
    ensure_teachers(r, progress=progress)
    out = Path(run_dir or f"runs/{r.name}/seed{r.train.seed}")
    return train_recipe(r, out, progress=progress, resume=resume, callbacks=callbacks)


__all__ = ["fit", "fit_recipe"]
