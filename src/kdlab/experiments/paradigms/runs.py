"""Paradigm runs as rows of a study table (``kdlab compare``): one run of a paradigm recipe per
seed into ``<out>/<method>/seed<k>``, summarised in ``result.json`` with the keys
``kdlab.report.tables.method_stats`` needs, for the paradigm's final student:

* ``dml``: peer 0;  ``ban``: the last generation (+ a ``<method>-ensemble`` row: the ensemble of
  generations 1..k);  ``ta``: the student at the end of the chain;  ``self``: the self-distilled
  student;  ``deepinv``: the student distilled on the synthetic set.

``train_time_s`` is the paradigm's own training time for the run (every generation / link /
peer-joint loop, DeepInversion's synthesis included; the shared study teacher excluded, as for KD).
A seed whose ``result.json`` exists is skipped; the links inside a paradigm resume as train() does.
"""

from __future__ import annotations

from pathlib import Path

from kdlab.core.io import inside, read_json, write_json
from kdlab.experiments.paradigms.base import PARADIGMS
from kdlab.experiments.paradigms.spec import ParadigmSpec

_KEEP = ("method", "seed", "recipe", "val_acc", "test_acc", "test_loss", "n_test", "best_epoch",
         "epochs_run", "train_time_s", "images_per_s", "model", "dataset")


def student_recipe(spec: ParadigmSpec):
    """The recipe whose student is the paradigm's reported model (for the profile columns)."""
    r = spec.recipe
    peers = getattr(spec.params, "peers", None)
    if peers:
        from kdlab.experiments.paradigms.common import derive
        from kdlab.experiments.paradigms.dml import peer_sections

        first = peer_sections(r, spec.params)[0]
        if first["model"] != r.student.model:
            r = derive(r, student=first, mask_off=False)
    return r


def summary_row(spec: ParadigmSpec, summary: dict, method: str, seed: int) -> dict:
    """The table row of one seed's paradigm summary: its final student's result, the paradigm's
    whole training time, and its extra rows (e.g. BAN's ensemble) under ``extra_rows``."""
    res = summary["student"]
    row = {k: res.get(k) for k in _KEEP if k in res}
    row.update(method=method, seed=seed, train_time_s=float(summary["train_time_s"]), paradigm=spec.name)
    if row.get("images_per_s") is None:
        row["images_per_s"] = float("nan")
    row.update(summary.get("extra", {}))
    row["extra_rows"] = [{**row, **{k: v for k, v in extra.items() if k != "suffix"},
                          "method": method + extra["suffix"]} for extra in summary.get("rows", [])]
    return row


def rows_of(result: dict) -> list[dict]:
    """The table rows of one seed's paradigm result (BAN adds its ensemble row)."""
    extra = result.get("extra_rows", [])
    main = {k: v for k, v in result.items() if k != "extra_rows"}
    return [main] + [{k: v for k, v in e.items() if k != "extra_rows"} for e in extra]


def run_paradigm(spec: ParadigmSpec, run_dir, *, progress: bool = False, log=print, data_dir=None) -> dict:
    """Run ``spec`` (its recipe's seed) into ``run_dir``; returns the paradigm's summary."""
    from kdlab.core.io import check_out_dir
    from kdlab.train.build import check_can_train, ensure_teachers, with_data_dir

    check_can_train(spec.recipe)  # the device, before the folder is made or a teacher trains
    check_out_dir(run_dir, "paradigm folder")

    entry = PARADIGMS.entry(spec.name)
    recipe = with_data_dir(spec.recipe, data_dir)
    if entry.meta["needs_teacher"] or recipe.needs_teacher():
        ensure_teachers(recipe, data_dir=data_dir, progress=progress, log=log)
    return entry.obj(recipe, spec.params, run_dir, progress=progress, log=log)


def run_paradigm_seeds(spec: ParadigmSpec, method: str, out_dir, *, seeds, data_dir=None,
                       progress: bool = False, log=print) -> list[dict]:
    """Every seed of a paradigm recipe into ``out_dir/<method>/seed<k>``; the table rows."""
    rows = []
    for seed in seeds:
        run_dir = inside(out_dir, Path(out_dir) / method / f"seed{seed}", f"run folder of {method!r}")
        done = run_dir / "result.json"
        if done.exists():
            res = read_json(done, "paradigm result")
            state = "done earlier"
        else:
            s = ParadigmSpec(spec.name, spec.params, spec.recipe.with_seed(seed), spec.source, spec.description)
            summary = run_paradigm(s, run_dir, progress=progress, log=log if progress else (lambda *a: None),
                                   data_dir=data_dir)
            res = summary_row(spec, summary, method, seed)
            write_json(done, res)
            state = f"{res['train_time_s']:.1f}s"
        ens = [e for e in res.get("extra_rows", [])]
        extra = "".join(f"  {e['method']} {e['test_acc']:.4f}" for e in ens)
        log(f"  {method:<14} seed {seed}: test {res['test_acc']:.4f}{extra}  best epoch "
            f"{res['best_epoch']:>3}  ({spec.name}; {state})")
        rows += rows_of(res)
    return rows
