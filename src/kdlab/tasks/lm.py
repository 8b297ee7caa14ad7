"""Language modelling as a task plug-in: LM recipes (:mod:`kdlab.lm.recipe`, ``task: lm``), a
study's methods from the recipe's ``study.methods`` (the baseline ``study.baseline`` first), one
student run through the one Trainer (:func:`kdlab.lm.runs.distill_run`), and the metrics

* ``bpb`` (bits per UTF-8 byte, min; selects the best epoch and heads the study table),
* ``kl_to_teacher`` (KL(teacher‖student), nats/token, min),
* ``agreement`` (top-1 next-token agreement with the teacher, max, %),
* ``exposure_nll`` (the teacher's NLL of the student's own samples, nats/token, min; test only).

The teacher, tokenizer and caches live in the study folder (``OUT/teacher``, ``OUT/cache``),
shared by every run of the study (:meth:`LMTask.prepare_study`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from kdlab.tasks.base import Metric, Task, register_task

#: result.json keys the LM objective writes -> the task's declared metric names
ALIASES = {"kl": "kl_to_teacher", "agree": "agreement"}


class LMContext:
    """What an LM study shares between its runs."""

    def __init__(self, out_dir, data, teacher, teacher_result, teacher_params, progress, log):
        self.out_dir, self.data, self.teacher = Path(out_dir), data, teacher
        self.teacher_result, self.teacher_params = teacher_result, teacher_params
        self.store: dict = {}  # the teacher's evaluations, shared by the runs
        self.progress, self.log = progress, log
        self.table_extra: dict = {}


@register_task("lm", "language modelling: bits per byte of a student LM distilled from a teacher LM")
class LMTask(Task):
    metrics = (Metric("bpb", "min", "bits/byte", 1.0, "bpb", delta=0.01),
               Metric("kl_to_teacher", "min", "nats/token", 1.0, "KL to teacher"),
               Metric("agreement", "max", "%", 100.0, "top-1 agreement"),
               Metric("exposure_nll", "min", "nats/token", 1.0, "exposure NLL"))
    select = "bpb"
    primary = "bpb"
    sample_unit = "tokens"
    study_order = "seed"  # every method of seed 0 first (as the LM study always ran)

    # -- recipes -------------------------------------------------------------------------------
    def load_recipe(self, ref, overrides=None):
        from kdlab.lm.recipe import load_lm_recipe

        return load_lm_recipe(ref, overrides)

    def from_dict(self, raw: dict, where: str = "recipe"):
        from kdlab.lm.recipe import lm_recipe_from_dict

        return lm_recipe_from_dict(raw, where)

    def ablation_methods(self, recipe, mode: str = "ladder") -> dict:
        if recipe.kind != "corpus":
            raise ValueError(f"{recipe.name} is an arithmetic recipe: run it with `kdlab lm ablate {recipe.name}`")
        if not recipe.study.methods:
            raise ValueError(f"recipe {recipe.name} has no study.methods; add e.g. ce: {{loss: [{{term: ce}}]}}")
        names = list(recipe.study.methods)
        base = recipe.study.baseline
        if base not in names:
            raise KeyError(f"study.baseline '{base}' is not one of {recipe.name}'s study.methods ({', '.join(names)})")
        return {m: recipe.method(m) for m in names}

    def baseline(self, methods: dict) -> str:
        first = next(iter(methods.values()))
        return first.study.baseline if first.study.baseline in methods else next(iter(methods))

    def run_key(self, recipe) -> Any:
        from kdlab.lm.runs import student_identity

        return student_identity(recipe)

    def describe(self, rec: dict) -> str:
        c = rec.get("corpus") or {}
        t = rec.get("teacher") or {}
        s = rec.get("student") or {}
        tr = rec.get("train") or {}
        return (f"corpus **{c.get('name', '?')}** ({c.get('tokenizer', '?')} tokens), teacher {t.get('model', '?')} "
                f"{t.get('kwargs', {})}, student {s.get('model', '?')} {s.get('kwargs', {})}"
                + (f", {tr.get('epochs')} epochs x {tr.get('steps_per_epoch')} steps" if tr.get("epochs") else ""))

    # -- runs ----------------------------------------------------------------------------------
    def check_study(self, recipes: dict, data_dir=None) -> None:
        """The device there, the corpus readable and a given teacher.checkpoint present, before
        anything is printed or written."""
        from kdlab.lm.corpora import load_corpus
        from kdlab.train.build import check_can_train

        for r in recipes.values():
            check_can_train(r)
        r0 = next(iter(recipes.values()))
        if getattr(r0, "kind", "corpus") != "corpus":
            return
        t = r0.teacher
        if t is not None and t.checkpoint and Path(t.checkpoint).is_dir():
            raise ValueError(f"teacher.checkpoint {t.checkpoint} is a folder; give the file "
                             f"(e.g. {Path(t.checkpoint) / 'best.pt'})")
        if t is not None and t.checkpoint and not Path(t.checkpoint).is_file():
            raise FileNotFoundError(f"teacher.checkpoint {t.checkpoint} not found; fix the path or remove it to "
                                    f"train one")
        if t is not None and t.checkpoint:  # corrupt, or not a language model's: refused now
            from kdlab.lm.runs import read_lm_checkpoint

            read_lm_checkpoint(t.checkpoint)
        load_corpus(r0.corpus.name, r0.corpus.max_bytes)

    def prepare_study(self, recipes: dict, out_dir, *, data_dir=None, progress: bool = True, log=print) -> LMContext:
        """Tokenizer and corpus streams, the teacher (trained first when missing) and its test
        metrics, shared by every run of the study."""
        from kdlab.lm.models import count_params
        from kdlab.lm.objective import LMObjective
        from kdlab.core.device import resolve_device
        from kdlab.core.io import check_out_dir
        from kdlab.lm.runs import CorpusData, check_same_tokenizer, load_lm, train_teacher

        out_dir = check_out_dir(out_dir, "LM study folder")
        r0 = next(iter(recipes.values()))
        data = CorpusData(r0, out_dir)
        t_path = train_teacher(r0, out_dir, log=log)
        teacher, t_tok, _ = load_lm(t_path, resolve_device(r0.train.device))
        check_same_tokenizer(t_tok, data.tokenizer, t_path)
        tobj = LMObjective(teacher, terms=["ce"], token_bytes=data.token_bytes, pad_id=data.tokenizer.pad_id)
        tt = tobj.evaluate("teacher", data.eval_loader("test", r0.train))
        tres = {"test_bpb": tt["bpb"], "test_kl_to_teacher": 0.0, "test_agreement": 1.0}
        return LMContext(out_dir, data, teacher, tres, count_params(teacher), progress, log)

    def train(self, recipe, run_dir, *, context: Any = None, method: str = "", progress: bool = True,
              resume: bool = True) -> dict:
        """One student (its seed is ``recipe.train.seed``); the row (the Trainer's result plus
        params, exposure NLL, throughput and the declared metric names) is written back to
        ``result.json``, so a finished run is read, not recomputed."""
        from kdlab.core.io import write_json
        from kdlab.lm.runs import distill_run, finished_run, student_identity

        run_dir = Path(run_dir)
        if resume and finished_run(run_dir, student_identity(recipe)):
            res = json.loads((run_dir / "result.json").read_text())
            if "tokens_per_s" in res:
                return res
        ctx = context
        out = ctx.out_dir if ctx is not None else run_dir.parent.parent
        row = distill_run(recipe, out, seed=recipe.train.seed, method=method or "distill",
                          data=ctx.data if ctx else None, teacher=ctx.teacher if ctx else None,
                          teacher_eval_store=ctx.store if ctx else None, progress=progress,
                          log=ctx.log if ctx else print, run_dir=run_dir)
        row.pop("counts", None)
        row = self._named(row)
        write_json(run_dir / "result.json", row)
        return row

    @staticmethod
    def _named(row: dict) -> dict:
        """The row with the declared metric names (``kl_to_teacher``, ``agreement``) beside the
        objective's (``kl``, ``agree``) and the throughput as ``tokens_per_s``."""
        row["tokens_per_s"] = row.get("train_tokens_per_s")
        for split in ("val", "test"):
            for old, new in ALIASES.items():
                if f"{split}_{old}" in row:
                    row[f"{split}_{new}"] = row[f"{split}_{old}"]
        row["sample_unit"] = "tokens"
        return row

    def tune_run(self, recipe, run_dir, *, context: Any = None, method: str = "", callbacks=(),
                 progress: bool = False) -> dict:
        """One trial of ``kdlab tune``: the student trained and its validation metrics returned
        (the run also evaluates the test split, which the tuner never reads)."""
        from kdlab.lm.runs import distill_run

        ctx = context.get("lm") if isinstance(context, dict) else context
        row = distill_run(recipe, ctx.out_dir, seed=recipe.train.seed, method=method or "trial", data=ctx.data,
                          teacher=ctx.teacher, teacher_eval_store=ctx.store, progress=progress,
                          log=ctx.log, run_dir=run_dir, callbacks=callbacks, with_test=False)
        row.pop("counts", None)
        return self._named(row)

    def prepare_tune(self, recipe, out_dir, *, prefill: bool, log=print) -> dict:
        return {"lm": self.prepare_study({"tune": recipe}, out_dir, log=log)}

    def run_line(self, res: dict) -> str:
        return (f"test bpb {res['test_bpb']:.4f}  kl {res.get('test_kl', float('nan')):.4f}  "
                f"agree {res.get('test_agree', float('nan')):.4f}")

    def study_notes(self, context: Any, rows: list[dict], recipes: dict) -> list[str]:
        from kdlab.lm.study import cache_report, sparse_vs_dense, study_notes

        if context is None:
            return []
        seeds = sorted({r["seed"] for r in rows})
        cache = cache_report(recipes, context.data, context.teacher, context.out_dir, seeds[0]) if seeds else None
        context.table_extra = {"cache": cache, "sparse_vs_dense": sparse_vs_dense(rows),
                               "teacher": context.teacher_result, "teacher_params": context.teacher_params}
        return study_notes(rows, cache, context.teacher_result, context.teacher_params)

    def teacher_result(self, recipes: dict) -> Optional[dict]:
        return None  # the study's context carries it (LMContext.teacher_result)
