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

import json
from pathlib import Path

from kdlab.experiments.paradigms.spec import ParadigmSpec

_KEEP = ("method", "seed", "recipe", "val_acc", "test_acc", "test_loss", "n_test", "best_epoch",
         "epochs_run", "train_time_s", "images_per_s", "model", "dataset")


def student_recipe(spec: ParadigmSpec):
    """The recipe whose student is the paradigm's reported model (for the profile columns)."""
    r = spec.recipe
    peers = spec.params.get("peers") if spec.name == "dml" else None
    if peers and peers[0] != r.student.model:
        from kdlab.experiments.paradigms.common import derive

        r = derive(r, student={"model": peers[0], "kwargs": {}}, mask_off=False)
    return r


def _row(res: dict, method: str, seed: int, total_time: float, paradigm: str) -> dict:
    row = {k: res.get(k) for k in _KEEP if k in res}
    row.update(method=method, seed=seed, train_time_s=float(total_time), paradigm=paradigm)
    if row.get("images_per_s") is None:
        row["images_per_s"] = float("nan")
    return row


def _summarise(spec: ParadigmSpec, summary: dict, method: str, seed: int) -> dict:
    n = spec.name
    if n == "dml":
        peers = summary["peers"]
        return _row(peers[0], method, seed, summary["train_time_s"], n)
    if n == "ban":
        gens = summary["generations"]
        row = _row(gens[-1], method, seed, sum(g["train_time_s"] for g in gens), n)
        row["ensemble_test_acc"] = summary["ensemble_test_acc"]
        row["generations"] = len(gens) - 1
        return row
    if n == "ta":
        a, s = summary["assistant_result"], summary["student_result"]
        row = _row(s, method, seed, a["train_time_s"] + s["train_time_s"], n)
        row["assistant"] = summary["assistant"]
        return row
    if n == "self":
        t, s = summary["teacher_result"], summary["student_result"]
        return _row(s, method, seed, (t["train_time_s"] if t else 0.0) + s["train_time_s"], n)
    s = summary["student_result"]
    row = _row(s, method, seed, s["train_time_s"] + summary.get("synthesis_time_s", 0.0), n)
    row["teacher_agreement"] = summary["teacher_agreement"]
    return row


def rows_of(result: dict) -> list[dict]:
    """The table rows of one seed's paradigm result (BAN adds its ensemble row)."""
    rows = [result]
    if "ensemble_test_acc" in result:
        rows.append({**result, "method": f"{result['method']}-ensemble",
                     "test_acc": result["ensemble_test_acc"], "val_acc": None, "test_loss": None})
    return rows


def run_paradigm(spec: ParadigmSpec, run_dir, *, progress: bool = False, log=print, data_dir=None) -> dict:
    """Run ``spec`` (its recipe's seed) into ``run_dir``; returns the summary of the paradigm."""
    from kdlab.experiments.paradigms import chains, deepinv, dml
    from kdlab.experiments.study import ensure_teacher

    p, r = spec.params, spec.recipe
    if spec.name in ("ta", "deepinv"):
        ensure_teacher(r, data_dir=data_dir, progress=progress, log=log)
    if spec.name == "dml":
        return dml.run_dml(r, run_dir, peers=p["peers"], n_peers=p["n_peers"], T=p["T"], progress=progress, log=log)
    if spec.name == "ban":
        return chains.run_ban(r, run_dir, generations=p["generations"], progress=progress, log=log)
    if spec.name == "ta":
        return chains.run_ta(r, run_dir, assistant=p["assistant"], progress=progress, log=log)
    if spec.name == "self":
        return chains.run_self(r, run_dir, checkpoint=p["checkpoint"], progress=progress, log=log)
    return deepinv.run_deepinv(r, run_dir, progress=progress, log=log, **p)


def run_paradigm_seeds(spec: ParadigmSpec, method: str, out_dir, *, seeds, data_dir=None,
                       progress: bool = False, log=print) -> list[dict]:
    """Every seed of a paradigm recipe into ``out_dir/<method>/seed<k>``; the table rows."""
    from kdlab.experiments.study import _with_data_dir

    rows = []
    base = _with_data_dir(spec.recipe, data_dir)
    for seed in seeds:
        run_dir = Path(out_dir) / method / f"seed{seed}"
        done = run_dir / "result.json"
        if done.exists():
            res = json.loads(done.read_text())
            state = "done earlier"
        else:
            r = base.model_copy(deep=True)
            r.train.seed = seed
            s = ParadigmSpec(spec.name, spec.params, r, spec.source, spec.description)
            summary = run_paradigm(s, run_dir, progress=progress, log=log if progress else (lambda *a: None),
                                   data_dir=data_dir)
            res = _summarise(spec, summary, method, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(res, indent=2, default=str))
            state = f"{res['train_time_s']:.1f}s"
        extra = f"  ensemble {res['ensemble_test_acc']:.4f}" if "ensemble_test_acc" in res else ""
        log(f"  {method:<14} seed {seed}: test {res['test_acc']:.4f}{extra}  best epoch "
            f"{res['best_epoch']:>3}  ({spec.name}; {state})")
        rows += rows_of(res)
    return rows
