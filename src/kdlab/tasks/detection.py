"""The ``detection`` task: one-stage detectors trained and distilled with the one Trainer, scored
by COCO mAP (pycocotools).

A detection recipe is a core :class:`kdlab.train.recipe.Recipe` with ``task: detection``: ``data``
names a detection data set (``mnist-canvas`` or ``coco``; their own options under
``data.kwargs``), ``student`` / ``teacher`` a detector (``gfl_det``), and ``loss`` the detector's
``gfl`` term plus any distillation terms (``det_kd``, ``det_fitnets``, ``fgd``, ``ld``). What differs
from classification lives here:

* :class:`DetectionObjective` — the classification objective with detection metrics
  (``evaluate``: COCO mAP of the decoded, NMS-ed boxes), ``monitor = ("map", "max")``, and the
  batch's point layout in every record (``rec.extra["layout"]``) for the detection terms;
* the loaders: in-memory scenes use :class:`kdlab.data.BatchLoader` (targets ``[B, M, 5]`` ride
  along as ``y``), a streamed COCO folder :class:`kdlab.data.coco.BoxDatasetLoader`; no
  augmentation (a crop or flip would have to move the boxes);
* the teacher cache: the detector's output is one tensor, so the generic
  :class:`kdlab.distill.teachers.TeacherStore` stores the teacher's head outputs as "logits" and its
  FPN maps as tapped features, per batch, shared by every method of a seed (study context).

``result.json`` holds ``val_<m>`` / ``test_<m>`` for ``map``, ``map50``, ``map_s``, ``map_m``,
``map_l`` (−1 where the split has no object of that size: COCOeval's convention).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from kdlab.core.config import RecipeError
from kdlab.core.io import read_json
from kdlab.core.seeding import derive_seed, seed_everything
from kdlab.data.splits import TensorSet
from kdlab.distill.losses import build_terms
from kdlab.distill.teachers import TeacherStore, build_teacher_source, teacher_plan
from kdlab.evaluate.detection import evaluate_detector, predict
from kdlab.models.adapters import build_model, load_model
from kdlab.models.detection import layout_of
from kdlab.tasks.base import Metric, Task, register_task
from kdlab.train.build import bound_epochs, load_splits, load_teacher, make_loaders, student_meta
from kdlab.train.objective import DistillObjective
from kdlab.train.recipe import Recipe, load_recipe
from kdlab.train.runtime import Runtime

DISTILL_TERMS = ("det_kd", "det_fitnets", "fgd", "ld")
#: the footnote of an AP size shown as n/a (result.json stores COCOeval's −1, docs/detection.md)
UNDEFINED_NOTE = ("the split has no object of that size (COCO: small below 32x32 px, medium below "
                  "96x96 px, large above), so COCOeval leaves that AP undefined (result.json stores −1)")


class DetectionObjective(DistillObjective):
    """A detector trained with weighted loss terms (module doc)."""

    monitor = ("map", "max")
    #: COCOeval's −1 (no object of that size in the split): printed as n/a
    undefined = {"map_s": -1.0, "map_m": -1.0, "map_l": -1.0}

    def __init__(self, student, terms, *, num_classes: int, image_hw, **kw):
        super().__init__(student, terms, **kw)
        self.num_classes = int(num_classes)
        self.image_hw = tuple(image_hw)

    def record(self, batch, epoch: int, step: int):
        rec = super().record(batch, epoch, step)
        rec.extra["layout"] = layout_of(self.student, rec.x)
        return rec

    def step(self, batch, ctx):
        rec = self.record(batch, ctx.epoch, ctx.step)
        total, parts = self.losses(rec)
        logs = {"loss": total.detach(), **{k: v.detach() for k, v in parts.items()}, "n": rec.y.shape[0]}
        return total, logs

    def evaluate(self, name: str, loader) -> dict[str, float]:
        m = evaluate_detector(self.models()[name], loader, self.num_classes, image_hw=self.image_hw)
        # the Trainer refuses non-finite validation numbers; COCOeval's own "undefined" is −1
        return {k: (float(v) if math.isfinite(v) else -1.0) for k, v in m.items() if k != "precision"}


def make_detection_loaders(recipe: Recipe, splits, runtime: Runtime, data_seed: int):
    """Train / val / test loaders of a detection recipe (module doc)."""
    from kdlab.data.coco import BoxDatasetLoader

    a = recipe.data.augment
    if a.crop_pad or a.flip:
        raise ValueError("detection recipes take no data.augment (crop_pad / flip would have to move the boxes); "
                         "remove it")
    if isinstance(splits.train, TensorSet):
        return make_loaders(recipe, splits, runtime, data_seed)
    info, cfg = splits.info, recipe.train
    kw = dict(mean=info.mean, std=info.std, device=runtime.device, num_workers=recipe.data.num_workers)
    tr = BoxDatasetLoader(splits.train, runtime.local_batch(cfg.batch_size), shuffle=True, seed=data_seed, **kw)
    if runtime.dist:
        tr = tr.shard(runtime.rank, runtime.world_size)
    return (tr, BoxDatasetLoader(splits.val, cfg.eval_batch_size, shuffle=False, seed=0, **kw),
            BoxDatasetLoader(splits.test, cfg.eval_batch_size, shuffle=False, seed=0, **kw))


def build_detection_run(recipe: Recipe, *, splits=None, teacher=None, store: Optional[TeacherStore] = None,
                        runtime: Optional[Runtime] = None):
    """``(objective, train_loader, val_loader, test_loader, runtime, info)`` of a detection recipe,
    in :func:`kdlab.train.build.build_run`'s order (data, init seed, student, terms, teacher, loaders)."""
    cfg = recipe.train
    runtime = runtime or Runtime.from_cfg(cfg)
    dev = runtime.device
    splits = splits or load_splits(recipe)
    info = splits.info
    seed_everything(derive_seed(cfg.seed, "init"))
    sc = recipe.student
    student = build_model(sc.model, info.num_classes, info.in_channels, sc.kwargs, sc.weights).to(dev)
    if not hasattr(student, "layout"):
        raise ValueError(f"student {sc.model} is not a detector; detection recipes need a detection model "
                         f"(e.g. student.model: gfl_det)")
    from kdlab.distill.losses.tv_detection import check_detector_terms

    terms = build_terms(recipe.loss)
    for _, _, t in terms:
        t.to(dev)
    needs_teacher = any(t.needs_teacher for _, _, t in terms)
    check_detector_terms(student, teacher, [n for n, _, _ in terms])  # before a teacher is loaded
    if needs_teacher and teacher is None:
        teacher = load_teacher(recipe, info, dev)
        check_detector_terms(student, teacher, [n for n, _, _ in terms])
    train_loader, val_loader, test_loader = make_detection_loaders(recipe, splits, runtime, derive_seed(cfg.seed, "data"))
    source = None
    if needs_teacher:
        layers = list(dict.fromkeys(l for _, _, t in terms for l in t.teacher_layers()))
        source = build_teacher_source(teacher.to(dev), plan=teacher_plan(cfg.teacher_mode), layers=layers,
                                      fast=cfg.fast_teacher, store=store,
                                      loader=train_loader, dataset=recipe.data.model_dump(),
                                      checkpoint=recipe.teacher.checkpoint, device=dev)
    objective = DetectionObjective(student, terms, runtime=runtime, teacher=source, meta=student_meta(recipe, info),
                                   n_data=len(splits.train), num_classes=info.num_classes, image_hw=info.hw)
    objective.setup(next(iter(train_loader.epoch(0))))
    runtime.broadcast(student, objective.term_modules)
    return objective, train_loader, val_loader, test_loader, runtime, info


def ladder(recipe: Recipe, mode: str = "ladder") -> dict[str, Recipe]:
    """The study's methods from a full recipe: ``baseline`` (its terms that need no teacher), ``kd``
    (baseline + ``det_kd``, the classic reference), each distillation term of the recipe alone on
    the baseline, and the full recipe (named by its terms joined with ``+``). ``loo``: the full
    recipe and the full recipe without each distillation term; ``both``: the union."""
    if mode not in ("ladder", "loo", "both"):
        raise ValueError(f"mode must be ladder, loo or both, not {mode!r}")
    terms = list(recipe.loss)
    base = [t for t in terms if t.term not in DISTILL_TERMS]
    extra = [t for t in terms if t.term in DISTILL_TERMS]
    if not base:
        raise RecipeError(f"{recipe.name}: the loss has no detector term (e.g. '- term: gfl')")
    full_name = "+".join(t.term for t in extra) or "baseline"
    out = {"baseline": recipe.derive(loss=base, teacher=None, name=f"{recipe.name}-baseline")}
    if mode in ("ladder", "both"):
        if not any(t.term == "det_kd" for t in extra) and not any(t.term == "tv_det" for t in base):
            from kdlab.core.config import TermCfg

            out["kd"] = recipe.derive(loss=base + [TermCfg(term="det_kd", weight=1.0)], name=f"{recipe.name}-kd")
        for t in extra:
            out[t.term if t.term != "det_kd" else "kd"] = recipe.derive(loss=base + [t], name=f"{recipe.name}-{t.term}")
    if extra:
        out[full_name] = recipe
    if mode in ("loo", "both") and len(extra) > 1:
        for t in extra:
            rest = [u for u in terms if u is not t]
            out[f"{full_name}-{t.term}"] = recipe.derive(loss=rest, name=f"{recipe.name}-no-{t.term}")
    return out


@register_task("detection", "object detection (boxes + classes) scored by COCO mAP (pycocotools)")
class DetectionTask(Task):
    metrics = (Metric("map", "max", "%", 100.0, "mAP@[.5:.95]"),
               Metric("map50", "max", "%", 100.0, "mAP@.5"),
               *(Metric(k, "max", "%", 100.0, f"AP {size}", undefined=-1.0, undefined_note=UNDEFINED_NOTE)
                 for k, size in (("map_s", "small"), ("map_m", "medium"), ("map_l", "large"))))
    select = "map"
    primary = "map"
    sample_unit = "images"

    def load_recipe(self, ref, overrides=None) -> Recipe:
        r = load_recipe(ref, overrides)
        if r.task != "detection":
            raise RecipeError(f"{ref}: task is {r.task!r}; a detection recipe says 'task: detection'")
        return r

    def ablation_methods(self, recipe, mode: str = "ladder") -> dict[str, Recipe]:
        return ladder(recipe, mode)

    def ensure_teacher(self, recipe: Recipe, *, progress: bool = True, log: Callable = print) -> Optional[str]:
        """Train the recipe's teacher (``teacher.recipe``) into its checkpoint's folder when it is
        missing or unfinished; its path (None when the loss needs no teacher)."""
        if recipe.teacher is None or not recipe.needs_teacher():
            return None
        ck = Path(recipe.teacher.checkpoint or "")
        if recipe.teacher.checkpoint and ck.is_file() and (ck.parent / "result.json").is_file():
            return str(ck)
        if not recipe.teacher.recipe:
            raise FileNotFoundError(f"teacher checkpoint {recipe.teacher.checkpoint} not found and the recipe names "
                                    f"no teacher.recipe to train it; set teacher.recipe")
        t = bound_epochs(self.load_recipe(recipe.teacher.recipe), recipe.teacher.epochs)  # --set train.epochs
        ck = ck if recipe.teacher.checkpoint else Path(f"runs/{t.name}/best.pt")
        log(f"training teacher {t.student.model} ({t.name}) into {ck.parent.resolve()}, because its "
            f"finished run is not there")
        res = self.train(t, ck.parent, method="teacher", progress=progress)
        log(f"teacher: val mAP {res['val_map']:.4f}  test mAP {res['test_map']:.4f}  mAP@.5 {res['test_map50']:.4f}")
        return str(ck)

    def prepare_study(self, recipes: dict, out_dir, *, data_dir=None, progress: bool = True,
                      log: Callable = print) -> Any:
        from kdlab.distill.losses.tv_detection import check_detector_terms

        for r in recipes.values():  # terms the detectors cannot run are refused before a teacher is trained
            check_detector_terms(r.student.model, r.teacher.model if r.teacher else None, [t.term for t in r.loss])
            self.ensure_teacher(r, progress=progress, log=log)
        store = TeacherStore(root=Path(out_dir) / ".teacher_cache")
        layers = list(dict.fromkeys(l for r in recipes.values() for _, _, t in build_terms(r.loss)
                                    for l in t.teacher_layers()))
        store.expect(layers)
        return {"store": store}

    def train(self, recipe, run_dir, *, context: Any = None, method: str = "", progress: bool = True,
              resume: bool = True, stop_after: Optional[int] = None) -> dict:
        from kdlab.train.trainer import Trainer

        store = (context or {}).get("store") if isinstance(context, dict) else None
        objective, tr, va, te, runtime, info = build_detection_run(recipe, store=store)
        trainer = Trainer(objective, tr, va, te, recipe.train, run_dir, runtime=runtime, identity=recipe.to_dict(),
                          method=method or recipe.name, progress=progress,
                          info={"recipe": recipe.name, "model": recipe.student.model, "dataset": info.name,
                                "sample_unit": self.sample_unit, "task": self.name})
        return trainer.fit(resume=resume, stop_after=stop_after)

    def profile(self, recipe) -> dict:
        """params, MACs, size (MB), MFLOPs (2 x MACs) and batch-1 latency of the student at the data's
        image size (one measurement per distinct student and data, cached on this task object)."""
        import json

        from kdlab.evaluate.efficiency import profile_model

        cache = self.__dict__.setdefault("_profiles", {})
        key = (recipe.student.model, json.dumps(recipe.student.kwargs, sort_keys=True),
               json.dumps(recipe.data.model_dump(), sort_keys=True, default=str))
        if key not in cache:
            info = load_splits(recipe).info
            hw, c, k = info.hw, info.in_channels, info.num_classes
            model = build_model(recipe.student.model, k, c, recipe.student.kwargs, None).eval()
            p = profile_model(model, (1, c, *hw), batch_sizes=(1,), repeats=30)
            cache[key] = {"params": p["params"]["total"], "macs": p["macs"], "size_mb": p["size_mb"],
                          "mflops": p["flops"] / 1e6, "latency_ms_b1": p["latency"][0]["median_ms"]}
        return dict(cache[key])

    def teacher_result(self, recipes: dict) -> Optional[dict]:
        for r in recipes.values():
            if r.teacher is not None and r.teacher.checkpoint:
                p = Path(r.teacher.checkpoint).parent / "result.json"
                if p.is_file():
                    return read_json(p, "teacher result")
        return None

    def figures(self, study_dir, rows: list[dict], recipes: dict, log: Callable = print, *, seed: int = 0,
                n_scenes: int = 6, show: Optional[list] = None) -> list:
        """``<study>/report/detection_scenes`` (ground truth, teacher and the students of ``show``,
        default the baseline and the last method, on the first ``n_scenes`` test scenes) and
        ``<study>/report/pr_curves`` (every method and the teacher), for the runs of ``seed``."""
        from kdlab.report.detection import pr_curve, pr_figure, scenes_figure

        study_dir = Path(study_dir)
        names = list(recipes)
        first = recipes[names[-1]].with_seed(seed)
        splits = load_splits(first)
        runtime = Runtime("cpu", "none", None)
        _, _, test_loader = make_detection_loaders(first, splits, runtime, 0)
        models = {}
        ck = first.teacher.checkpoint if first.teacher is not None else None
        if ck and Path(ck).is_file():
            models["teacher"] = load_detector(ck)
        for m in names:
            p = study_dir / m / f"seed{seed}" / "best.pt"
            if p.is_file():
                models[m] = load_detector(p)
        curves, dets = {}, {}
        for m, model in models.items():
            gts, d = predict(model, test_loader)
            dets[m] = d
            res = evaluate_detector(model, test_loader, splits.info.num_classes, image_hw=splits.info.hw,
                                    with_precision=True)
            curves[m] = (pr_curve(res["precision"]), f"(AP50 {100 * res['map50']:.1f})")
        out = pr_figure(curves, study_dir / "report" / "pr_curves",
                        title=f"precision-recall at IoU 0.5, test scenes, seed {seed}")
        show = show or ["teacher", names[0], names[-1]]
        panels = {m: dets[m][:n_scenes] for m in show if m in dets}
        imgs = splits.test.x[:n_scenes].numpy() if isinstance(splits.test, TensorSet) else \
            np.stack([splits.test[i][0].numpy() for i in range(min(n_scenes, len(splits.test)))])
        out += scenes_figure(imgs, gts[:n_scenes], panels, study_dir / "report" / "detection_scenes",
                             classes=splits.info.classes)
        for p in out:
            log(f"figure: {p}")
        return out


def load_detector(path, device="cpu"):
    """A detector checkpoint (``best.pt``) rebuilt in eval mode."""
    model, _ = load_model(path, device)
    return model
