"""Image classification as a task plug-in: the recipes of ``kdlab.train.recipe``, the distillation
ladder of their loss terms, one run through :func:`kdlab.train.build.train` (the one Trainer),
and the metrics ``acc`` (top-1, max, %) and ``loss`` (cross-entropy, min).

The ablation ladder, from a *full* recipe whose loss is ``ce`` plus components (``kd``, ``align``,
``attn``):

* the step-wise **ladder**: ``baseline`` (CE only), the first component (``kd``), the first
  component plus each other one alone (``kd+align``, ``kd+attn``), and ``full``;
* the **leave-one-out** set: ``full-<c>`` for each component c;
* **both**: the union, each distinct recipe once (``full-align`` of kd+align+attn *is* ``kd+attn``:
  it is trained once, under the ladder's name, and the study records the alias).

Every method keeps the full recipe's hyperparameters, data order and augmentation (a paired
design: run k of every method uses seed k). A method without a ``kd`` term trains CE with
weight 1; with ``kd`` it keeps the full recipe's CE weight (the ``1 − α`` of Hinton's KD).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kdlab.tasks.base import Metric, Task, register_task


def _components(full):
    ces = [t for t in full.loss if t.term == "ce"]
    if len(ces) > 1:
        raise ValueError(f"recipe '{full.name}' lists the 'ce' term {len(ces)} times; an ablation's "
                         f"baseline keeps one: merge them into one term (weights add)")
    ce = ces[0] if ces else None
    comps = [t for t in full.loss if t.term != "ce"]
    if not comps:
        raise ValueError(f"recipe '{full.name}' has only a 'ce' term; an ablation needs a distillation term")
    return ce, comps


def _method(full, comps: list, ce):
    from kdlab.core.config import TermCfg
    from kdlab.distill.losses import build_terms

    loss = []
    has_kd = any(c.term == "kd" for c in comps)
    if ce is not None or not comps:
        ce_cfg = (ce or TermCfg(term="ce")).model_dump()
        if not has_kd:
            ce_cfg["weight"] = 1.0
        loss.append(ce_cfg)
    loss += [c.model_dump() for c in comps]
    terms = build_terms(TermCfg.model_validate(t) for t in loss)
    if not any(t.needs_masks for _, _, t in terms):
        return full.derive(loss=loss, mask=None)
    return full.derive(loss=loss)


def ablation_methods(full, mode: str = "ladder") -> dict:
    """Name -> recipe for the ladder, the leave-one-out set, or both (with the same recipe under
    two names listed once: see :func:`distinct_methods`)."""
    if mode not in ("ladder", "loo", "both"):
        raise ValueError("ablation mode must be ladder, loo or both")
    ce, comps = _components(full)
    seen: dict[str, int] = {}
    names = []  # a term listed twice gets its own method names (kd, kd#2), as in the logs
    for c in comps:
        seen[c.term] = seen.get(c.term, 0) + 1
        names.append(c.term if seen[c.term] == 1 else f"{c.term}#{seen[c.term]}")
    out: dict = {}
    if mode in ("ladder", "both"):
        out["baseline"] = _method(full, [], ce)
        out[names[0]] = _method(full, comps[:1], ce)
        for c, n in zip(comps[1:], names[1:]):
            out[f"{names[0]}+{n}"] = _method(full, [comps[0], c], ce)
        if len(comps) > 2 or (len(comps) == 2 and "full" not in out):
            out["full"] = full
    if mode in ("loo", "both"):
        out.setdefault("full", full)
        if len(comps) > 1:
            for i, n in enumerate(names):
                out[f"full-{n}"] = _method(full, comps[:i] + comps[i + 1:], ce)
    if len(comps) == 2 and "full" in out and f"{names[0]}+{names[1]}" in out:
        del out[f"{names[0]}+{names[1]}"]  # identical to full
    return out


class ClassificationContext:
    """What a classification study shares between its runs: loaded teachers and the cache."""

    def __init__(self, store, data_dir, progress: bool, log):
        self.store, self.data_dir, self.progress, self.log = store, data_dir, progress, log
        self.teachers: dict = {}


@register_task("classification", "image classification: top-1 accuracy of a student distilled from a teacher")
class ClassificationTask(Task):
    metrics = (Metric("acc", "max", "%", 100.0, "top-1", delta=0.01),
               Metric("loss", "min", "nats", 1.0, "CE loss", table=False))
    select = "acc"
    primary = "acc"
    sample_unit = "images"

    # -- recipes -------------------------------------------------------------------------------
    def load_recipe(self, ref, overrides=None):
        from kdlab.train.recipe import load_recipe

        return load_recipe(ref, overrides)

    def from_dict(self, raw: dict, where: str = "recipe"):
        from kdlab.train.recipe import recipe_from_dict

        return recipe_from_dict(raw, where)

    def ablation_methods(self, recipe, mode: str = "ladder") -> dict:
        return ablation_methods(recipe, mode or recipe.study.methods)

    def baseline(self, methods: dict) -> str:
        return "baseline" if "baseline" in methods else next(iter(methods))

    def components(self, recipe: dict) -> list[str]:
        return [t["term"] for t in recipe.get("loss", []) if t.get("term") != "ce"]

    def describe(self, rec: dict) -> str:
        d = rec.get("data") or {}
        t = (rec.get("teacher") or {}).get("model", "?")
        s = (rec.get("student") or {}).get("model", "?")
        lf = d.get("label_fraction")
        ep = (rec.get("train") or {}).get("epochs")
        return (f"data **{d.get('name', '?')}**" + (f" ({100 * lf:g}% of the training labels)"
                                                    if lf not in (None, 1, 1.0) else "")
                + f", teacher {t}, student {s}" + (f", {ep} epochs" if ep else ""))

    # -- runs ----------------------------------------------------------------------------------
    def with_data_dir(self, recipe, data_dir):
        from kdlab.train.build import with_data_dir

        return with_data_dir(recipe, data_dir)

    def prepare_study(self, recipes: dict, out_dir, *, data_dir=None, progress: bool = True, log=print,
                      teacher_cache: bool = True) -> ClassificationContext:
        """Train missing teachers (in the recipes' order) and open the study's teacher cache
        (``out_dir/.teacher_cache``, shared in memory and on disk; docs/speed.md)."""
        from kdlab.distill.teachers import TeacherStore
        from kdlab.train.build import teacher_layers_of

        store = TeacherStore(Path(out_dir) / ".teacher_cache") if teacher_cache else None
        if store is not None:
            store.expect(teacher_layers_of(recipes.values()))
        return ClassificationContext(store, data_dir, progress, log)

    def check_study(self, recipes: dict, data_dir=None) -> None:
        """Every method's data present and its teacher there or trainable (a valid teacher recipe
        whose data are present), before the study prints or writes anything."""
        from kdlab.train.build import check_teachers, load_splits

        seen = set()
        for r in recipes.values():
            r = self.with_data_dir(r, data_dir)
            key = repr((r.data.model_dump(mode="json"), r.teacher.model_dump(mode="json") if r.teacher else None,
                        r.needs_teacher(), [t.params for t in r.loss if t.params.get("recipes")]))
            if key in seen:
                continue
            seen.add(key)
            load_splits(r)
            check_teachers(r, data_dir)

    def _teacher(self, recipe, ctx: Optional[ClassificationContext]):
        from kdlab.train.build import ensure_teachers, load_splits, load_teacher
        from kdlab.core.device import resolve_device

        if not recipe.needs_teacher():
            return None
        data_dir = ctx.data_dir if ctx else None
        ensure_teachers(recipe, data_dir=data_dir, progress=ctx.progress if ctx else False,
                        log=ctx.log if ctx else print)
        key = recipe.teacher.checkpoint
        cache = ctx.teachers if ctx is not None else {}
        if key not in cache:
            cache[key] = load_teacher(recipe, load_splits(recipe).info, resolve_device(recipe.train.device))
        return cache[key]

    def train(self, recipe, run_dir, *, context: Any = None, method: str = "", progress: bool = True,
              resume: bool = True) -> dict:
        from kdlab.train.build import train

        teacher = self._teacher(recipe, context)
        return train(recipe, run_dir, teacher=teacher, progress=progress, method=method, resume=resume,
                     teacher_cache=context.store if context is not None else None)

    def tune_run(self, recipe, run_dir, *, context: Any = None, method: str = "", callbacks=(),
                 progress: bool = False) -> dict:
        """One trial: validation only (the test loader is dropped), with the pruning callbacks."""
        from kdlab.train.build import build_run, trainer_for

        teacher = context.get("teacher") if isinstance(context, dict) else None
        store = context.get("store") if isinstance(context, dict) else None
        run = build_run(recipe, teacher=teacher, store=store)
        run.test_loader = None  # the search never sees the test split
        return trainer_for(run, run_dir, progress=progress, method=method, callbacks=callbacks).fit()

    def prepare_tune(self, recipe, out_dir, *, prefill: bool, log=print) -> dict:
        """The teacher (trained first when missing) and a teacher cache shared through files by
        every trial and worker of a search."""
        from kdlab.distill.teachers import TeacherStore
        from kdlab.train.prefill import prefill_job, shared_teacher, uses_cache
        from kdlab.train.build import ensure_teachers

        if not recipe.needs_teacher():
            return {}
        ensure_teachers(recipe, progress=False, log=log)
        root = Path(out_dir) / ".teacher_cache"
        if prefill and uses_cache(recipe):
            log(f"teacher cache: filling {recipe.train.epochs} epochs once -> {root}")
            prefill_job([recipe], recipe.train.seed, str(root), progress=True)
        return {"teacher": shared_teacher(recipe), "store": TeacherStore(root)}

    def run_line(self, res: dict) -> str:
        return f"test {res['test_acc']:.4f}  best epoch {res['best_epoch']:>3}"

    def teacher_result(self, recipes: dict) -> Optional[dict]:
        """The ``result.json`` beside the recipes' teacher checkpoint, when the study has exactly
        one teacher and its run recorded a test accuracy (else None)."""
        import json

        paths = {r.teacher.checkpoint for r in recipes.values()
                 if getattr(r, "teacher", None) is not None and r.teacher.checkpoint}
        if len(paths) != 1:
            return None
        f = Path(next(iter(paths))).parent / "result.json"
        try:
            res = json.loads(f.read_text())
            float(res["test_acc"])
            return res
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def profile(self, recipe) -> dict:
        """params, size (MB), MFLOPs and batch-1 latency of the student (one measurement per
        distinct student, cached on this task object)."""
        import json

        from kdlab.data import load_dataset
        from kdlab.evaluate.efficiency import profile_model
        from kdlab.models import create_model

        cache = self.__dict__.setdefault("_profiles", {})
        key = (recipe.student.model, json.dumps(recipe.student.kwargs, sort_keys=True), recipe.data.name)
        if key not in cache:
            d = recipe.data
            info = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction).info
            model = create_model(recipe.student.model, num_classes=info.num_classes,
                                 in_channels=info.in_channels, **recipe.student.kwargs).eval()
            p = profile_model(model, (1, info.in_channels, info.image_size, info.image_size),
                              batch_sizes=(1,), repeats=30)
            cache[key] = {"params": p["params"]["total"], "size_mb": p["size_mb"],
                          "mflops": p["flops"] / 1e6, "latency_ms_b1": p["latency"][0]["median_ms"]}
        return dict(cache[key])

    def finish_study(self, rows: list[dict], log=print) -> None:
        from kdlab.train.trainer import mixed_threads

        warn = mixed_threads(rows)
        if warn:
            log(warn)
