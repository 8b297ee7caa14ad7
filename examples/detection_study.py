"""The paired detection study (baseline / kd / fgd / ld / fgd+ld over seeds) through the detection
task's own methods (`kdlab ablate detection/fgd_ld` trains the same runs into the same folders; run
this afterwards on its folder for the compact table and the detection figures):

    OMP_NUM_THREADS=1 PYTHONPATH=src python examples/detection_study.py --out runs/detection-study \
        --seeds 0 1 2 [--set train.epochs=12 ...]

Runs go to ``<out>/<method>/seed<k>/result.json`` (``val_<metric>`` / ``test_<metric>``); the
teacher (the recipes' ``teacher.recipe``) is trained first when its checkpoint is missing; one
teacher cache is shared by the study's runs. Writes ``<out>/report/detection_table.{md,json}`` (mean
± sd over seeds, paired Δ to the baseline with the paired t-test and Holm-adjusted p over the four
comparisons, params and MACs of the student) and the figures (``pr_curves``, ``detection_scenes``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from kdlab.core.io import write_json
from kdlab.report.statistics import holm, paired_test
from kdlab.tasks import get_task


def fmt(values, scale=100.0):
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if v.size > 1 else f"{v.mean():.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="detection/fgd_ld")
    ap.add_argument("--out", default="runs/detection-study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = get_task("detection")
    full = task.load_recipe(a.recipe, a.overrides)
    methods = task.ablation_methods(full, "ladder")
    out = Path(a.out)
    ctx = task.prepare_study(methods, out)
    results = {m: {} for m in methods}
    for k in a.seeds:  # seeds outside: every method of a seed shares its teacher cache entries
        for m, r in methods.items():
            res = task.train(r.with_seed(k), out / m / f"seed{k}", context=ctx, method=m, progress=True)
            results[m][k] = res
            print(f"{m} seed {k}: test mAP {res['test_map']:.4f}  mAP@.5 {res['test_map50']:.4f}", flush=True)
    base = "baseline"
    prof = {m: task.profile(r) for m, r in methods.items()}
    teacher = task.teacher_result(methods)
    comps = [m for m in methods if m != base]
    tests = {}
    for key in ("map", "map50"):
        b = {k: results[base][k][f"test_{key}"] for k in a.seeds}
        tests[key] = {m: paired_test({k: results[m][k][f"test_{key}"] for k in a.seeds}, b) for m in comps}
        adj = holm([tests[key][m]["p_ttest"] for m in comps])
        for m, p in zip(comps, adj):
            tests[key][m]["p_holm"] = p
    rows = []
    lines = ["| method | mAP@[.5:.95] (%) | Δ mAP (pp) | Holm p | mAP@.5 (%) | Δ mAP@.5 (pp) | Holm p | params | MACs |",
             "|---|---|---|---|---|---|---|---|---|"]
    if teacher is not None:
        lines.append(f"| teacher (1 run) | {100 * teacher['test_map']:.1f} | | | {100 * teacher['test_map50']:.1f} | | | | |")
    for m in methods:
        v = [results[m][k]["test_map"] for k in a.seeds]
        v50 = [results[m][k]["test_map50"] for k in a.seeds]
        row = {"method": m, "test_map": v, "test_map50": v50, **prof[m]}
        if m == base:
            d1 = p1 = d2 = p2 = ""
        else:
            t1, t2 = tests["map"][m], tests["map50"][m]
            row.update(delta_map=t1["mean"], p_holm_map=t1["p_holm"], delta_map50=t2["mean"], p_holm_map50=t2["p_holm"])
            d1 = f"{100 * t1['mean']:+.1f} ± {100 * t1['ci']:.1f}"
            d2 = f"{100 * t2['mean']:+.1f} ± {100 * t2['ci']:.1f}"
            p1 = "nan" if math.isnan(t1["p_holm"]) else f"{t1['p_holm']:.3f}"
            p2 = "nan" if math.isnan(t2["p_holm"]) else f"{t2['p_holm']:.3f}"
        rows.append(row)
        lines.append(f"| {m} | {fmt(v)} | {d1} | {p1} | {fmt(v50)} | {d2} | {p2} | {prof[m]['params']:,} | "
                     f"{prof[m]['macs']:,} |")
    lines.append("")
    lines.append(f"{len(a.seeds)} paired seeds ({', '.join(map(str, a.seeds))}); mean ± sd over seeds; Δ: mean paired "
                 f"difference to the baseline ± 95% t half-width; Holm p: paired t-test p, Holm-adjusted over the "
                 f"{len(comps)} comparisons of each metric; params and MACs of the student (one 64×64 image).")
    table = "\n".join(lines)
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "detection_table.md").write_text(table + "\n")
    write_json(out / "report" / "detection_table.json", {"rows": rows, "seeds": a.seeds, "recipe": a.recipe,
                                                "overrides": a.overrides,
                                                "teacher": None if teacher is None else
                                                {k: teacher[k] for k in teacher if k.startswith(("val_", "test_"))}})
    print(table)
    if not a.no_figures:
        task.figures(out, rows, methods, seed=a.seeds[0])
    print(json.dumps({"table": str(out / "report" / "detection_table.md")}))


if __name__ == "__main__":
    main()
