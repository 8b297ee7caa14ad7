"""Recipes become objects here, and only here.

:func:`build_run` turns a validated :class:`kdlab.train.recipe.Recipe` into a :class:`Run`: the
objective (student + loss terms + teacher sources), the train / val / test loaders and the runtime.
Every caller goes through it: recipe runs and studies, :func:`kdlab.fit` (a recipe made of its
arguments, with the user's modules and data), post-pruning fine-tuning
(:func:`kdlab.compress.finetune.finetune`: the pruned model and its loaders) and paradigms with
objectives of their own (DML's peers, through ``make_objective``). The teacher plan
(:func:`kdlab.distill.teachers.teacher_plan`) is computed here once and handed to
:func:`kdlab.distill.teachers.build_teacher_source`, the one teacher constructor.
:func:`train` builds a run and fits it with the :class:`kdlab.train.trainer.Trainer`.
:func:`ensure_teachers` trains a recipe's missing (or unfinished) teachers first.

The order of construction is fixed, so that the same seed gives the same weights: the data
splits, then ``seed_everything(derive_seed(seed, "init"))``, the student, the loss terms, the
teacher (when it is loaded here), the loaders, the objective's ``setup`` with a first batch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdlab.core.checkpoint import check_fits
from kdlab.core.seeding import derive_seed, seed_everything
from kdlab.data import load_dataset
from kdlab.data.augment import AugmentSpec
from kdlab.data.streaming import as_loader, first_batch
from kdlab.distill.losses import build_terms
from kdlab.distill.teachers import TeacherPlan, TeacherStore, build_teacher_source, teacher_plan
from kdlab.models.adapters import build_model, load_model
from kdlab.train.objective import DistillObjective, Objective
from kdlab.train.recipe import Recipe
from kdlab.train.runtime import Runtime


@dataclass
class Run:
    """Everything :class:`kdlab.train.trainer.Trainer` needs for one recipe."""

    objective: Objective
    train_loader: Any
    val_loader: Any
    test_loader: Any
    runtime: Runtime
    splits: Any
    recipe: Recipe

    @property
    def info(self):
        return self.splits.info if self.splits is not None else None


def load_splits(recipe: Recipe, seed: Optional[int] = None):
    """The recipe's data set as train / val / test splits (seeded by ``train.seed``).

    With ``data.unlabelled: transfer`` and ``label_fraction < 1`` the training set also holds the
    unlabelled remainder, labelled ``−1`` (the labelled samples are exactly those that ``drop``
    keeps). The extra sets of ``data.transfer`` are added by :func:`build_run` (some need the teacher).
    """
    from kdlab.data import from_factory

    d = recipe.data
    seed = recipe.train.seed if seed is None else seed
    transfer = d.unlabelled == "transfer" and d.label_fraction < 1.0
    if d.factory:
        if transfer:
            raise ValueError("data.unlabelled: transfer needs a registered data set (it splits off the labels); "
                             "with a factory, return the unlabelled images as a data.transfer factory set")
        return from_factory(d.factory, val_fraction=d.val_fraction, label_fraction=d.label_fraction, seed=seed)
    splits = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction,
                          label_fraction=1.0 if transfer else d.label_fraction, seed=seed, **d.options())
    if transfer:
        splits.train = unlabelled_remainder(splits.train, d.label_fraction, seed, d.name)
    return splits


def unlabelled_remainder(train, label_fraction: float, seed: int, name: str):
    """The full training set with the labels outside ``labelled_subset`` replaced by −1."""
    from kdlab.data.splits import TensorSet, labelled_subset, mark_unlabelled
    from kdlab.data.transfer import RelabelledDataset

    if isinstance(train, TensorSet):
        return mark_unlabelled(train, labelled_subset(train.y.numpy(), label_fraction, seed, name))
    labels = torch.as_tensor([int(train[i][1]) for i in range(len(train))] if not hasattr(train, "labels")
                             else list(train.labels), dtype=torch.int64)
    keep = torch.as_tensor(labelled_subset(labels.numpy(), label_fraction, seed, name), dtype=torch.int64)
    y = torch.full_like(labels, -1)
    y[keep] = labels[keep]
    return RelabelledDataset(train, y)


def load_checked(path, info, device, who: str, *, allow_other_dataset: bool = False) -> nn.Module:
    """A kdlab model checkpoint, loaded frozen and checked against the data set (class and channel
    counts, class names, and the data set it was trained on unless ``allow_other_dataset``)."""
    from kdlab.data.registry import check_trained_on

    model, ck = load_model(path, device)
    check_fits(ck, info, f"{who} {path}")
    check_trained_on(ck, info, f"{who} {path}", allow=allow_other_dataset,
                     override="set teacher.allow_other_dataset: true")
    return model


def load_teacher(recipe: Recipe, info, device) -> nn.Module:
    """The recipe's teacher, loaded from its checkpoint (or its ``checkpoints``, an ensemble,
    :class:`kdlab.distill.ensemble.EnsembleTeacher`) and checked against the data set."""
    tc = recipe.teacher
    if tc is not None and tc.checkpoints:
        from kdlab.distill.ensemble import EnsembleTeacher

        if tc.checkpoint:
            raise ValueError("give the teacher as teacher.checkpoint or as teacher.checkpoints (an ensemble), not both")
        for ck in tc.checkpoints:
            if not Path(ck).is_file():
                raise FileNotFoundError(f"ensemble teacher checkpoint {ck} not found; train it first "
                                        f"(`kdlab train-teacher <recipe> --out {Path(ck).parent}`)")
        members = [load_checked(ck, info, device, "ensemble teacher", allow_other_dataset=tc.allow_other_dataset)
                   for ck in tc.checkpoints]
        return EnsembleTeacher(members, tc.ensemble).to(device)
    if tc is None or not tc.checkpoint:
        raise ValueError("this recipe needs a teacher: set teacher.checkpoint (train one with `kdlab train-teacher`)")
    if not Path(tc.checkpoint).is_file():
        out = Path(tc.checkpoint).parent
        hint = (f"`kdlab train-teacher {tc.recipe} --out {out}`, or in Python "
                f"`kdlab.train.build.ensure_teachers(recipe)` (what every kdlab command does first)" if tc.recipe
                else f"`kdlab train-teacher <teacher recipe> --out {out}`")
        raise FileNotFoundError(f"teacher checkpoint {tc.checkpoint} not found; train it first with {hint}")
    return load_checked(tc.checkpoint, info, device, "teacher", allow_other_dataset=tc.allow_other_dataset)


def out_features(model: nn.Module, info, device) -> int:
    """The number of outputs of ``model`` on one input of the data set's shape."""
    hw = info.image_size if isinstance(info.image_size, (tuple, list)) else (info.image_size, info.image_size)
    x = torch.zeros(1, info.in_channels, *hw, device=device)
    was = model.training
    model.eval()
    with torch.no_grad():
        n = model.to(device)(x).shape[1]
    model.train(was)
    return n


def student_meta(recipe: Recipe, info) -> dict:
    """Checkpoint metadata of the recipe's student (how to rebuild it; ``input``: its view of the
    data set's images, when it has one)."""
    meta = {"model_name": recipe.student.model, "model_kwargs": dict(recipe.student.kwargs),
            "num_classes": info.num_classes, "in_channels": info.in_channels, "dataset": info.name}
    if getattr(info, "classes", None):
        meta["classes"] = [str(c) for c in info.classes]
    if recipe.student.input is not None and recipe.student.input.resize is not None:
        meta["input"] = {"resize": list(recipe.student.input.resize)}
    return meta


def make_loaders(recipe: Recipe, splits, runtime: Runtime, data_seed: int):
    """Train (augmented, sharded under torchrun), val and test loaders of a recipe (a split that
    is None has no loader)."""
    d, cfg, info = recipe.data, recipe.train, splits.info
    aug = AugmentSpec(crop_pad=d.augment.crop_pad, flip=d.augment.flip, randaugment=d.augment.randaugment,
                      magnitude=d.augment.magnitude)
    kw = dict(mean=info.mean, std=info.std, device=runtime.device, num_workers=d.num_workers)
    train_loader = as_loader(splits.train, runtime.local_batch(cfg.batch_size), shuffle=True, seed=data_seed,
                             augment=aug, **kw)
    if runtime.dist:
        train_loader = train_loader.shard(runtime.rank, runtime.world_size)

    def evaluation(split):
        return None if split is None else as_loader(split, cfg.eval_batch_size, shuffle=False, seed=0, **kw)

    return train_loader, evaluation(splits.val), evaluation(splits.test)


def data_seed(recipe: Recipe, plan: TeacherPlan) -> int:
    """The training loader's seed: ``derive_seed(seed, "data")``, shared by every method of a
    seed (paired), or with ``teacher_mode: consistent`` one per loss (each method draws its own
    augmentation; docs/speed.md)."""
    if plan.fresh_augmentation:
        return derive_seed(recipe.train.seed, "data", json.dumps([t.model_dump() for t in recipe.loss]))
    return derive_seed(recipe.train.seed, "data")


def teacher_layers_of(recipes) -> list[str]:
    """The teacher layers any loss term of ``recipes`` taps, in first-use order: what a study's
    shared :class:`~kdlab.distill.teachers.TeacherStore` should
    :meth:`~kdlab.distill.teachers.TeacherStore.expect`, so the first run to miss a batch taps them
    all in one teacher forward (``kd`` then ``kd+align`` cost one forward per batch, not two)."""
    return list(dict.fromkeys(l for r in recipes for _, _, t in build_terms(r.loss) for l in t.teacher_layers()))


def build_run(recipe: Recipe, *, splits=None, loaders=None, teacher: Optional[nn.Module] = None,
              store: Optional[TeacherStore] = None, runtime: Optional[Runtime] = None,
              student: Optional[nn.Module] = None, meta: Optional[dict] = None,
              plan: Optional[TeacherPlan] = None, make_objective=None, probe: bool = True) -> Run:
    """The objective and loaders of ``recipe`` (see the module doc for the construction order).

    ``splits``: data to use instead of the recipe's data set; ``loaders``: ``(train, val, test)``
    loaders already made (fine-tuning; no splits then); ``teacher``: an already loaded teacher (a
    study shares one); ``store``: a study's teacher cache; ``student``/``meta``: an already built
    student (a user's module, a pruned model) and its checkpoint metadata; ``plan``: the teacher
    plan (default: ``teacher_plan(recipe.train.teacher_mode)``); ``make_objective(recipe, info,
    runtime)``: an objective of the caller's instead of the loss terms' (DML's peers);
    ``probe``: call the objective's ``setup`` with a first batch (off for fine-tuning an already
    trained model, whose fake-quantization observers a forward pass would move).
    """
    cfg = recipe.train
    runtime = runtime or Runtime.from_cfg(cfg)
    plan = plan or teacher_plan(cfg.teacher_mode)
    dev = runtime.device
    own_splits = splits is None and loaders is None
    if own_splits:
        splits = load_splits(recipe)
    info = splits.info if splits is not None else None
    seed_everything(derive_seed(cfg.seed, "init"))  # the same seed gives the same weights
    if make_objective is not None:
        objective = make_objective(recipe, info, runtime)
        return finish_run(recipe, objective, splits, loaders, runtime, plan, probe)
    if student is None:
        sc = recipe.student
        student = build_model(sc.model, info.num_classes, info.in_channels, sc.kwargs, sc.weights)
        meta = student_meta(recipe, info)
    student = student.to(dev)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
    terms = build_terms(recipe.loss)
    for _, _, t in terms:
        t.to(dev)
    needs_teacher = any(t.needs_teacher for _, _, t in terms)
    if needs_teacher:
        if teacher is None:
            teacher = load_teacher(recipe, info, dev)
        else:
            if info is not None:
                check_fits({"num_classes": out_features(teacher, info, dev)}, info, "teacher")
            teacher = teacher.to(dev)
    if own_splits and recipe.data.transfer:  # extra transfer sets join the training set
        splits = with_extra_transfer(recipe, splits, teacher, dev)
    train_loader, val_loader, test_loader = loaders or make_loaders(recipe, splits, runtime, data_seed(recipe, plan))
    uniq = lambda xs: list(dict.fromkeys(xs))  # noqa: E731
    t_layers = uniq(l for _, _, t in terms for l in t.teacher_layers())
    m_layers = uniq(l for _, _, t in terms for l in t.mask_layers())
    data_key = recipe.data.model_dump()
    partial = splits is not None and has_unlabelled(recipe, splits.train)
    if partial and m_layers and getattr(recipe.mask, "reuse", "per-view") == "per-image":
        raise ValueError("mask.reuse: per-image does not take unlabelled samples yet; use mask.reuse: per-view "
                         "with data.unlabelled: transfer or data.transfer")
    source_kw = dict(plan=plan, store=store, loader=train_loader, dataset=data_key, device=dev,
                     fast=cfg.fast_teacher,
                     # channels-last teacher: asked for, or the folded inference copy (train.fast_teacher,
                     # opt-in); the teacher as loaded keeps its layout, so a default run's numbers stay
                     channels_last=cfg.channels_last or cfg.fast_teacher,
                     compile=cfg.compile, amp=cfg.amp)
    source = None
    if needs_teacher:  # an ensemble has no one checkpoint file: its key is its members' weights
        checkpoint = recipe.teacher.checkpoint if recipe.teacher is not None else None
        source = build_teacher_source(teacher, layers=t_layers, mask_layers=m_layers, mask_cfg=recipe.mask,
                                      checkpoint=checkpoint, **source_kw)
    extra = {}
    for path in uniq(p for _, _, t in terms for p in t.extra_teacher_checkpoints()):
        if not Path(path).is_file():
            raise FileNotFoundError(f"extra teacher checkpoint {path} not found; train it first "
                                    f"(`kdlab train-teacher <recipe> --out {Path(path).parent}`)")
        allow = bool(recipe.teacher is not None and recipe.teacher.allow_other_dataset)
        extra[path] = build_teacher_source(load_checked(path, info, dev, "extra teacher", allow_other_dataset=allow),
                                           checkpoint=path, **source_kw)
    from kdlab.data.augment import MixSpec
    from kdlab.data.views import make_view

    mix = MixSpec(mixup=cfg.mixup, cutmix=cfg.cutmix)
    if mix.active and (source is not None or extra) and plan.cached:
        raise ValueError(f"train.mixup / train.cutmix mix the batches the teacher sees, so its outputs cannot come "
                         f"from the cache (train.teacher_mode: {cfg.teacher_mode}); set train.teacher_mode: live")
    objective = DistillObjective(student, terms, runtime=runtime, teacher=source, extra_teachers=extra,
                                 meta=meta, n_data=getattr(train_loader, "dataset_size", 0),
                                 channels_last=cfg.channels_last, compile=cfg.compile, partial_labels=partial,
                                 view=make_view(recipe.student.input),
                                 train_labels=getattr(splits.train, "y", None) if splits is not None else None,
                                 mix=mix, mix_seed=cfg.seed)
    return finish_run(recipe, objective, splits, (train_loader, val_loader, test_loader), runtime, plan, probe)


def finish_run(recipe: Recipe, objective: Objective, splits, loaders, runtime: Runtime, plan: TeacherPlan,
               probe: bool) -> Run:
    """The :class:`Run` of a built objective: its loaders (made when not given), the objective's
    ``setup`` with a first training batch, and rank 0's initial weights on every process."""
    train_loader, val_loader, test_loader = loaders or make_loaders(recipe, splits, runtime, data_seed(recipe, plan))
    if probe:
        objective.setup(first_batch(train_loader))
    runtime.broadcast(*objective.broadcast_modules())
    return Run(objective, train_loader, val_loader, test_loader, runtime, splits, recipe)


def has_unlabelled(recipe: Recipe, train) -> bool:
    """Whether the training set may hold unlabelled samples (labels −1)."""
    from kdlab.data.splits import TensorSet

    if (recipe.data.unlabelled == "transfer" and recipe.data.label_fraction < 1.0) or recipe.data.transfer:
        return True
    return isinstance(train, TensorSet) and bool((train.y < 0).any())


def with_extra_transfer(recipe: Recipe, splits, teacher: Optional[nn.Module], device):
    """``splits`` whose training set is followed by the recipe's ``data.transfer`` sets."""
    from kdlab.data.splits import Splits
    from kdlab.data.transfer import TransferContext, with_transfer_sets

    def get_teacher():
        return teacher if teacher is not None else load_teacher(recipe, splits.info, device)

    has_teacher = teacher is not None or recipe.teacher is not None
    ctx = TransferContext(splits.train, splits.info, recipe.train.seed, get_teacher if has_teacher else None, device)
    train = with_transfer_sets(splits.train, recipe.data.transfer, ctx)
    return Splits(train=train, val=splits.val, test=splits.test, info=splits.info)


def trainer_for(run: Run, run_dir, *, progress: bool = True, method: str = "", callbacks=(),
                identity: Optional[dict] = None, info: Optional[dict] = None):
    """The :class:`kdlab.train.trainer.Trainer` of a built run, writing into ``run_dir``.
    ``identity`` (default: the recipe) is what makes two runs the same; ``info``: the extra keys
    of ``result.json`` (default: recipe, model and data set names)."""
    from kdlab.train.trainer import Trainer

    r = run.recipe
    if info is None:
        info = {"recipe": r.name, "model": r.student.model, "dataset": run.info.name}
    return Trainer(run.objective, run.train_loader, run.val_loader, run.test_loader, r.train, run_dir,
                   runtime=run.runtime, callbacks=callbacks, identity=r.to_dict() if identity is None else identity,
                   method=method or r.name, progress=progress, info=info)


def make_trainer(recipe: Recipe, run_dir, *, teacher=None, splits=None, store=None, progress: bool = True,
                 method: str = "", callbacks=()):
    """``build_run`` + :func:`trainer_for`: a ready Trainer for ``recipe``."""
    run = build_run(recipe, splits=splits, teacher=teacher, store=store)
    return trainer_for(run, run_dir, progress=progress, method=method, callbacks=callbacks)


def train(recipe: Recipe, run_dir, *, teacher=None, splits=None, progress: bool = True,
          resume: bool = True, stop_after: Optional[int] = None, method: str = "",
          teacher_cache: Optional[TeacherStore] = None, callbacks=()) -> dict:
    """Train ``recipe`` into ``run_dir`` and return its result dict (``result.json``).
    ``teacher_cache``: a :class:`kdlab.distill.teachers.TeacherStore` shared by a study's runs."""
    import time

    t0 = time.perf_counter()
    trainer = make_trainer(recipe, run_dir, teacher=teacher, splits=splits, store=teacher_cache,
                           progress=progress, method=method, callbacks=callbacks)
    # the run's set-up (data, models, teacher source, the objective's probe batch): result.json's
    # setup_time_s, of which the probe's teacher outputs and masks are setup_teacher_time_s and
    # setup_mask_time_s (kdlab bench --study names each part of a study's wall time)
    trainer.info.update(setup_time_s=time.perf_counter() - t0,
                        setup_teacher_time_s=float(getattr(trainer.objective, "setup_teacher_time_s", 0.0)),
                        setup_mask_time_s=float(getattr(trainer.objective, "setup_mask_time_s", 0.0)))
    return trainer.fit(resume=resume, stop_after=stop_after)


def with_data_dir(recipe: Recipe, data_dir: Optional[str]) -> Recipe:
    """``recipe`` reading its data files from ``data_dir`` (None: unchanged)."""
    if data_dir is None:
        return recipe
    return recipe.derive(data={**recipe.data.model_dump(), "data_dir": str(data_dir)})


def teacher_finished(ckpt: Path) -> bool:
    """A teacher checkpoint counts as done only when its run finished (``result.json`` beside it),
    or when it is a lone file (not in a kdlab run folder). A folder with ``last.pt``,
    ``metrics.csv`` or ``run.json`` but no ``result.json`` holds an interrupted run, which is
    resumed rather than used."""
    if not ckpt.is_file():
        return False
    folder = ckpt.parent
    in_run = any((folder / f).exists() for f in ("last.pt", "metrics.csv", "run.json"))
    return not in_run or (folder / "result.json").is_file()


def _why_train(ckpt: Path) -> str:
    """Why the teacher at ``ckpt`` is (re)trained, in words (paths absolute)."""
    if ckpt.exists() or (ckpt.parent / "last.pt").exists():
        return f"its run in {ckpt.parent.resolve()} is unfinished (resuming it)"
    return (f"{ckpt.resolve()} does not exist (run paths are relative to the current folder "
            f"{Path.cwd()})")


def _checkpoint_path(value, key: str) -> Path:
    """A teacher checkpoint path from the recipe: a file path, not a folder."""
    ckpt = Path(value)
    if ckpt.is_dir():
        raise ValueError(f"{key} {ckpt} is a folder; give the checkpoint file (e.g. {ckpt / 'best.pt'})")
    if ckpt.parent.exists() and not ckpt.parent.is_dir():
        raise ValueError(f"{key} {ckpt} lies below the file {ckpt.parent}; give a checkpoint path in a folder")
    return ckpt


def check_can_train(recipe, out=None, what: str = "run folder") -> None:
    """Checked before a teacher is trained or anything is printed: the recipe's ``train.device`` is
    there (``cuda`` without a GPU is one line) and ``out`` (when given) could be created."""
    from kdlab.core.device import resolve_device
    from kdlab.core.io import check_out_dir

    train_cfg = getattr(recipe, "train", None)
    resolve_device(getattr(train_cfg, "device", "auto"))
    if out is not None:
        check_out_dir(out, what, create=False)


def check_teachers(recipe: Recipe, data_dir=None) -> None:
    """What :func:`ensure_teachers` needs, checked before anything is trained or written: the
    recipe's device (:func:`check_can_train`), teacher checkpoint paths are file paths, an
    ensemble's members are trained, a missing teacher has a ``teacher.recipe`` to train it (a valid
    one, its data present); else one line naming the fix."""
    from kdlab.train.recipe import load_recipe

    check_can_train(recipe)

    for t in recipe.loss:  # extra teachers (mtkd: checkpoints + recipes)
        p = t.params
        for ck, rref in zip(p.get("checkpoints") or [], p.get("recipes") or []):
            if not teacher_finished(_checkpoint_path(ck, "mtkd checkpoint")):
                load_splits(with_data_dir(load_recipe(rref), data_dir))
    tc = recipe.teacher
    if tc is None or not recipe.needs_teacher():
        return
    if tc.checkpoints:  # an ensemble: its members are trained by their own recipes, first
        missing = [ck for ck in tc.checkpoints if not teacher_finished(_checkpoint_path(ck, "teacher.checkpoints"))]
        if missing:
            raise FileNotFoundError(f"ensemble teacher checkpoint {missing[0]} not found or unfinished; train "
                                    f"each member first (`kdlab train-teacher <recipe> --out <folder>`)")
        return
    ckpt = _checkpoint_path(tc.checkpoint, "teacher.checkpoint") if tc.checkpoint else None
    if ckpt is not None and teacher_finished(ckpt):
        return
    if not tc.recipe:
        if ckpt is not None and ckpt.is_file():
            raise FileNotFoundError(f"teacher checkpoint {ckpt} belongs to an unfinished run and the recipe "
                                    f"names no teacher.recipe to finish it; set teacher.recipe or finish it "
                                    f"with `kdlab train-teacher <recipe> --out {ckpt.parent}`")
        raise FileNotFoundError(f"teacher checkpoint {tc.checkpoint} not found and the recipe names no "
                                f"teacher.recipe to train it; run `kdlab train-teacher <recipe>` first")
    load_splits(with_data_dir(load_recipe(tc.recipe), data_dir))


def bound_epochs(recipe, epochs):
    """``recipe`` trained for at most ``epochs`` epochs (None: unchanged), the teacher trained on the
    way under ``--set train.epochs=N``; a ``train.stop_after_epochs`` beyond the bound is dropped."""
    if epochs is None or recipe.train.epochs <= epochs:
        return recipe
    train = {**recipe.train.model_dump(mode="json"), "epochs": epochs}
    if train.get("stop_after_epochs") is not None and train["stop_after_epochs"] >= epochs:
        train["stop_after_epochs"] = None
    return recipe.derive(train=train)


def ensure_teachers(recipe: Recipe, *, data_dir=None, progress=True, log=print) -> Optional[str]:
    """Train the recipe's teacher (``teacher.recipe``) when its checkpoint is missing or its run is
    unfinished (resuming it), and the extra teachers of ``mtkd`` terms likewise, saying in one line
    which teacher is trained, where, and why. Returns the teacher checkpoint, or None when the
    recipe's loss needs no teacher (a CE-only recipe trains none). The recipe's device is checked
    first (:func:`check_can_train`): a student that cannot run is refused before its teacher trains."""
    from kdlab.train.recipe import load_recipe

    check_can_train(recipe)

    for t in recipe.loss:  # extra teachers (mtkd: checkpoints + recipes)
        p = t.params
        for ck, rref in zip(p.get("checkpoints") or [], p.get("recipes") or []):
            ck = _checkpoint_path(ck, "mtkd checkpoint")
            if teacher_finished(ck):
                continue
            r = with_data_dir(load_recipe(rref), data_dir)
            log(f"training extra teacher {r.name} into {ck.parent.resolve()}, because {_why_train(ck)}")
            train(r, ck.parent, progress=progress, method="teacher")
    tc = recipe.teacher
    if tc is None or not recipe.needs_teacher():
        return None
    if tc.checkpoints:  # an ensemble: its members are trained by their own recipes, first
        check_teachers(recipe, data_dir)  # (refuses missing members)
        return str(tc.checkpoints[0])
    ckpt = _checkpoint_path(tc.checkpoint, "teacher.checkpoint") if tc.checkpoint else None
    if ckpt is not None and teacher_finished(ckpt):
        return str(ckpt)
    if not tc.recipe:
        check_teachers(recipe, data_dir)  # (names the fix)
    t_recipe = with_data_dir(load_recipe(tc.recipe), data_dir)
    t_recipe = bound_epochs(t_recipe, tc.epochs)  # bounded by --set train.epochs
    ckpt = ckpt or Path(f"runs/{t_recipe.name}/best.pt")
    log(f"training teacher {t_recipe.student.model} ({t_recipe.name}) into {ckpt.parent.resolve()}, "
        f"because {_why_train(ckpt)}")
    res = train(t_recipe, ckpt.parent, progress=progress, method="teacher")
    if ckpt.name != "best.pt":
        shutil.copyfile(ckpt.parent / "best.pt", ckpt)
    log(f"teacher: val {res['val_acc']:.4f}  test {res['test_acc']:.4f}  (best epoch {res['best_epoch']})")
    return str(ckpt)
