"""The findings page: what each component of a study buys, with p-values, from the study reports.

For each study directory (written by ``kdlab ablate``; optionally after ``kdlab robustness --study``
and :func:`kdlab.experiments.study_explain.explain_study`) the *component contrasts* are paired
comparisons between two methods of the study that differ by one component (same seeds):

* ``kd`` vs ``baseline`` – what the first distillation term buys over CE alone;
* ``kd+<c>`` vs ``kd`` – what component ``c`` adds on top of it (for a two-component recipe the
  ladder's ``full`` is ``kd+<c>``);
* ``full`` vs ``kd`` – what all further components add together (three or more components);
* ``full`` vs ``full-<c>`` – what ``c`` adds given all the others (leave-one-out studies).

A ``kdlab compare`` study (``report/compare.json``) holds independent methods, not a ladder: every
method is contrasted with the study's baseline (``<m> over <baseline>``).

Measures: the task's declared metrics shown in its study table (classification: test top-1 in pp;
language models: bpb, KL to the teacher, agreement, exposure NLL), and when their reports exist the mean corruption accuracy mCA (pp) and
mCE (% of the baseline's corruption error; lower is better), and the explanation alignment with
the teacher (attention rank alignment ρ, share of attribution in the teacher's top-k parts,
logit alignment ρ). Per contrast and measure: mean paired difference with its 95% t-interval,
paired t-test p, Wilcoxon p, d_z, and the t-test p Holm-adjusted over the study's contrasts of
that measure. A contrast whose Holm p is not below 0.05 is reported as "no detectable effect".
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Optional, Sequence

from kdlab.core.io import atomic_write_text, read_json

__all__ = ["write_findings", "study_findings", "component_contrasts", "MEASURES"]

#: measure key -> (label, unit scale, unit, higher is better); the task's metrics are added per
#: study from its table (``test_<metric>``)
MEASURES = {
    "test_acc": ("test top-1", 100.0, "pp", True),
    "mCA": ("corruption accuracy mCA", 100.0, "pp", True),
    "mCE": ("mCE", 100.0, "mCE points (baseline = 100)", False),
    "mPC": ("mAP under corruption mPC", 100.0, "pp", True),
    "rPC": ("relative performance under corruption rPC", 100.0, "pp", True),
    "rank_alignment": ("attention rank alignment ρ", 1.0, "", True),
    "topk_fraction": ("share in teacher's top-k parts", 1.0, "", True),
    "logit_alignment": ("logit alignment ρ", 1.0, "", True),
}
ALPHA = 0.05


def component_contrasts(methods: Sequence[str], components: Sequence[str],
                        baseline: str = "baseline", aliases: Optional[dict] = None) -> list[tuple[str, str, str]]:
    """``(label, with_method, without_method)`` for the contrasts the study's methods allow (see
    the module docstring); when none fits the naming, every method against ``baseline``.
    ``aliases`` (name -> the method whose runs it is) let the contrasts name a recipe by either
    name; a comparison of the same two runs is listed once (so Holm counts it once)."""
    aliases = dict(aliases or {})
    ms = set(methods) | {a for a, b in aliases.items() if b in set(methods)}
    out: list[tuple[str, str, str]] = []
    comps = list(components)
    if comps:
        c0 = comps[0]
        if c0 in ms and baseline in ms:
            out.append((f"{c0} (over CE only)", c0, baseline))
        for c in comps[1:]:
            pair = f"{c0}+{c}"
            if pair in ms and c0 in ms:
                out.append((f"{c} on top of {c0}", pair, c0))
            elif len(comps) == 2 and "full" in ms and c0 in ms:
                out.append((f"{c} on top of {c0}", "full", c0))
        if len(comps) > 2 and "full" in ms and c0 in ms:
            out.append((f"{' + '.join(comps[1:])} together on top of {c0}", "full", c0))
        for c in comps:
            if f"full-{c}" in ms and "full" in ms:
                out.append((f"{c} given all the others", "full", f"full-{c}"))
    if not out:
        out = [(f"{m} over {baseline}", m, baseline) for m in methods if m != baseline and baseline in ms]
    seen, uniq = set(), []
    for label, a, b in out:
        a, b = aliases.get(a, a), aliases.get(b, b)
        if (a, b) not in seen and a != b:
            seen.add((a, b))
            uniq.append((label, a, b))
    return uniq


# ---------------------------------------------------------------------------------------------
# reading a study's reports


def report_dir_of(study_dir: Path) -> Path:
    """The study's report folder: ``report`` when it holds a table, else the first
    ``report-<mode>`` that does; a report folder given directly is itself."""
    study_dir = Path(study_dir)
    if (study_dir / "table.json").is_file():
        return study_dir
    for d in [study_dir / "report", *sorted(study_dir.glob("report-*"))]:
        if (d / "table.json").is_file():
            return d
    return study_dir / "report"


def _study_meta(study_dir: Path, rdir: Optional[Path] = None) -> dict:
    sj = (rdir or study_dir / "report") / "study.json"
    if sj.is_file():
        meta = read_json(sj, "study record")
        return {"recipe": meta.get("recipe") or {}, "seeds": meta.get("seeds"), "mode": meta.get("mode"),
                "source": meta.get("source"), "task": meta.get("task")}
    for rj in sorted(study_dir.glob("*/seed*/run.json")):
        return {"recipe": read_json(rj, "run record").get("recipe") or {}, "seeds": None, "mode": None}
    return {"recipe": {}, "seeds": None, "mode": None}


def _recipe_ref(source: Optional[str]) -> Optional[str]:
    """``.../kdlab/recipes/digits/full.yaml`` -> ``digits/full`` (a bundled recipe's name)."""
    if not source:
        return None
    parts = Path(source).with_suffix("").parts
    if "recipes" in parts and "kdlab" in parts:
        i = len(parts) - 1 - parts[::-1].index("recipes")
        return "/".join(parts[i + 1:])
    return source


def _table_metrics(table: dict) -> list:
    """The task's metrics of a study table (primary first; classification's accuracy for tables
    written before tasks)."""
    from kdlab.report.tables import metric_from

    return [metric_from(table.get("metric"))] + [metric_from(d) for d in table.get("secondary", [])]


def _measure(key: str, metrics=()) -> tuple:
    """``(label, scale, unit, higher is better)`` of a measure key."""
    for m in metrics:
        if key == f"test_{m.name}":
            return (f"test {m.title}", m.scale, m.diff_unit, m.direction == "max")
    return MEASURES[key]


def _per_seed_measures(study_dir: Path, table: dict) -> dict[str, dict[str, dict[int, float]]]:
    """measure -> method -> seed -> value, for every measure whose report exists."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for i, metric in enumerate(_table_metrics(table)):
        key = f"test_{metric.name}"
        per = {}
        for r in table["methods"]:
            by = r.get(f"{key}_by_seed")
            if by is None and i == 0:  # a table written before per-seed values were kept: read the runs
                by = {}
                for f in (study_dir / r["method"]).glob("seed*/result.json"):
                    by[int(f.parent.name[4:])] = read_json(f, "run result", need=(key,))[key]
            if by:
                per[r["method"]] = {int(k): float(v) for k, v in by.items()}
        if per:
            out[key] = per
    for f in sorted((study_dir / "report" / "robustness").glob("seed*/robustness.json")):
        seed = int(f.parent.name[4:])
        res = read_json(f, "robustness result", need=("models",), fix=f"re-run `kdlab robustness --study {study_dir}`")
        for m, v in res["models"].items():
            for key in ("mCA", "mCE", "mPC", "rPC"):
                if v.get(key) is not None:
                    out.setdefault(key, {}).setdefault(m, {})[seed] = float(v[key])
    ej = study_dir / "report" / "explain_study.json"
    if ej.is_file():
        for run in read_json(ej, "explanation result", need=("runs",), fix=f"re-run `kdlab explain-study {study_dir}`")["runs"]:
            for key in ("rank_alignment", "topk_fraction", "logit_alignment"):
                v = run.get(key)
                if v is not None and math.isfinite(v):
                    out.setdefault(key, {}).setdefault(run["method"], {})[int(run["seed"])] = float(v)
    return out


def study_findings(study_dir) -> dict:
    """The contrasts of one study with their tests, per measure (a dict; see :func:`write_findings`)."""
    from kdlab.report.statistics import holm, paired_test, seeds_needed

    from kdlab.tasks import get_task

    study_dir = Path(study_dir)
    rdir = report_dir_of(study_dir)
    if rdir == study_dir:  # a report folder was given
        study_dir = rdir.parent
    tj = rdir / "table.json"
    if not tj.is_file():
        from kdlab.report.tables import one_run_line

        one_run = one_run_line(study_dir)
        if one_run:  # `kdlab distill` output: nothing to contrast
            raise ValueError(f"{one_run}; findings contrast the methods of a study (`kdlab ablate`)")
        raise FileNotFoundError(f"{tj} not found; run `kdlab ablate <recipe> --out {study_dir}` first")
    table = read_json(tj, "study table", need=("methods",), fix=f"rebuild it with `kdlab report {study_dir}`")
    meta = _study_meta(study_dir, rdir)
    recipe = meta["recipe"]
    task = get_task(table.get("task") or meta.get("task"))
    cj = rdir / "compare.json"  # a `kdlab compare` study: independent methods, each against its baseline
    compared = read_json(cj, "comparison record", need=("recipes",)) if cj.is_file() else None
    comps = [] if compared else task.components(recipe)
    methods = [r["method"] for r in table["methods"]]
    baseline = table.get("baseline", "baseline")
    contrasts = component_contrasts(methods, comps, baseline, table.get("aliases"))
    values = _per_seed_measures(study_dir, table)
    metrics = _table_metrics(table)
    results = []
    for measure, per in values.items():
        tests = []
        for label, a, b in contrasts:
            if a in per and b in per:
                tests.append((label, a, b, paired_test(per[a], per[b])))
        for (label, a, b, t), p in zip(tests, holm([t["p_ttest"] for *_, t in tests])):
            t["p_holm"] = p
            if measure == f"test_{metrics[0].name}" and metrics[0].delta:
                t["seeds_for_delta"] = seeds_needed(t["sd"], metrics[0].delta)
            results.append({"measure": measure, "component": label, "with": a, "without": b, **t})
    seeds = sorted({int(s) for r in table["methods"] for s in r.get("seeds", [])})
    ex = study_dir / "report" / "explain_study.json"
    ref = _recipe_ref(meta.get("source"))
    mode = meta.get("mode")
    train = recipe.get("train") or {}
    made_by = None
    if compared:
        made_by = (f"kdlab compare {' '.join(_recipe_ref(v) or v for v in compared['recipes'].values())} "
                   f"--seeds {' '.join(map(str, seeds))} --baseline {baseline} --out {study_dir}")
    elif ref:
        made_by = (f"kdlab ablate {ref} --seeds {' '.join(map(str, seeds))} --out {study_dir}"
                   + (f" --mode {meta['mode']}" if meta.get("mode") not in (None, "ladder") else ""))
    name = f"{study_dir.name} (kdlab compare)" if compared else recipe.get("name", study_dir.name)
    return {"study": str(study_dir), "name": name, "recipe": recipe,
            "made_by": made_by, "epochs": train.get("epochs"), "task": task.name, "metrics": metrics,
            "setting": task.describe(recipe), "report_dir": str(rdir), "mode": mode,
            "seeds": seeds, "baseline": baseline, "methods": methods, "components": comps,
            "contrasts": contrasts, "results": results,
            "explain_settings": read_json(ex, "explanation result", need=("settings",))["settings"] if ex.is_file() else None,
            "robustness": "mCA" in values or "mPC" in values, "table_md": (rdir / "table.md").read_text()
            if (rdir / "table.md").is_file() else ""}


# ---------------------------------------------------------------------------------------------
# writing


def _fmt_p(p) -> str:
    from kdlab.report.tables import fmt_p

    return fmt_p(p)


def _fmt_diff(r, metrics=()) -> str:
    label, scale, unit, _ = _measure(r["measure"], metrics)
    d = 3 if scale == 1.0 else 2
    if not math.isfinite(r["mean"]):
        return "—"
    s = f"{scale * r['mean']:+.{d}f}"
    if math.isfinite(r["ci"]):
        s += f" [{scale * r['ci_low']:+.{d}f}, {scale * r['ci_high']:+.{d}f}]"
    return s + (f" {unit}" if unit else "")


def verdict(r, metrics=()) -> str:
    """``"detectable: better"`` / ``"detectable: worse"`` when Holm p < 0.05 (better follows the
    measure's direction), ``"no detectable effect"`` otherwise, ``"undefined"`` when the test is."""
    p = r.get("p_holm", float("nan"))
    if p is None or not math.isfinite(p):
        return "undefined (too few seeds or no spread)"
    if p >= ALPHA:
        return "no detectable effect"
    better = (r["mean"] > 0) == _measure(r["measure"], metrics)[3]
    return "detectable: " + ("better" if better else "worse")


def _sentence(r, metrics=()) -> str:
    label, scale, unit, _ = _measure(r["measure"], metrics)
    v = verdict(r, metrics)
    p = f"Holm p {_fmt_p(r['p_holm'])}"
    if v.startswith("detectable"):
        return f"{label} {_fmt_diff(r, metrics)} ({p}; {v.split(': ')[1]})"
    if v.startswith("undefined"):
        return f"{label}: {v}"
    return f"{label}: no detectable effect ({_fmt_diff(r, metrics)}, {p})"


def _describe(f: dict) -> str:
    return (f"{f.get('setting') or f['name']}, {len(f['seeds'])} seeds ({', '.join(map(str, f['seeds']))}); "
            "components: " + (", ".join(f["components"]) or "—"))


def render_findings(findings: Sequence[dict], command: Optional[str] = None) -> str:
    """The Markdown page for :func:`study_findings` results."""
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    lines = ["# Findings: what each component buys", ""]
    lines += [f"Generated {today} by `{command or 'kdlab findings ' + ' '.join(f['study'] for f in findings)}` "
              "from the study reports (re-run it after a new study; do not edit by hand).", ""]
    lines += ["Each line compares two methods of one study that differ by one component, trained "
              "with the same seeds (same data order and augmentation), so the unit is the paired "
              "per-seed difference. Shown: mean difference [95% t-interval], paired t-test p, "
              "Wilcoxon signed-rank p, Cohen's d_z, and the t-test p Holm–Bonferroni adjusted over "
              "that study's contrasts of the same measure. **No detectable effect** means Holm "
              f"p ≥ {ALPHA:g}: the study cannot tell the difference from seed noise (it does not "
              "show the effect is zero; the interval says how large it could be). The intervals are "
              "per contrast (not adjusted), so an interval may exclude 0 while Holm p ≥ 0.05. Statistics: "
              "docs/statistics.md.", ""]
    # summary
    lines += ["## Summary", ""]
    for f in findings:
        lines.append(f"**{f['name']}** ({_describe(f)}):")
        lines.append("")
        for label, a, b in f["contrasts"]:
            rs = [r for r in f["results"] if r["component"] == label]
            if not rs:
                continue
            lines.append(f"- *{label}* ({a} vs {b}): " + "; ".join(_sentence(r, f["metrics"]) for r in rs) + ".")
        pm = f["metrics"][0]
        acc = [r for r in f["results"] if r["measure"] == f"test_{pm.name}"
               and math.isfinite(r.get("seeds_for_delta", float("nan")))]
        if acc:
            lines.append(f"- Power: detecting a {pm.delta_text()} {pm.title} difference with power 0.8 at the "
                         f"observed spread would take " + ", ".join(
                             f"{int(r['seeds_for_delta']) if math.isfinite(r['seeds_for_delta']) else '∞'} seeds "
                             f"({r['with']} vs {r['without']})" for r in acc) + f"; this study has {len(f['seeds'])}.")
        missing = []
        if not f["robustness"] and f.get("task") == "classification":
            missing.append(f"robustness (`kdlab robustness --study {f['study']}`)")
        if f["explain_settings"] is None and f.get("task") == "classification":
            missing.append(f"explanation alignment (`explain_study('{f['study']}')`)")
        if missing:
            lines.append("- Not measured for this study: " + "; ".join(missing) + ".")
        lines.append("")
    # details
    for f in findings:
        lines += [f"## {f['name']}", "", _describe(f) + ".", f"Study directory: `{f['study']}`"
                  + (f", made by `{f['made_by']}` (recipe epochs as in the recipe unless overridden "
                     f"with --set; these runs: {f['epochs']})." if f.get("made_by") else "."), ""]
        head = ["component", "contrast", "measure", "Δ [95% CI]", "p (t)", "p (Wilcoxon)", "p Holm",
                "d_z", "seeds", "verdict"]
        body = []
        for r in f["results"]:
            body.append([r["component"], f"{r['with']} − {r['without']}", _measure(r["measure"], f["metrics"])[0],
                         _fmt_diff(r, f["metrics"]), _fmt_p(r["p_ttest"]), _fmt_p(r["p_wilcoxon"]),
                         _fmt_p(r["p_holm"]), "—" if not math.isfinite(r["d_z"]) else f"{r['d_z']:+.2f}", r["n"],
                         verdict(r, f["metrics"])])
        from kdlab.report.tables import markdown_table

        if body:
            lines += [markdown_table(head, body), ""]
        es = f["explain_settings"]
        if es:
            lines += [f"Explanation alignment: {es['method']} attributions for the true label on "
                      f"{es['n_images']} test images, {es['grid'][0]}x{es['grid'][1]} grid, top-{es['k']} "
                      f"parts, teacher {es.get('teacher_model')}.", ""]
        if f["table_md"]:
            lines += ["The study table (all methods against the baseline):", "", f["table_md"].strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_findings(study_dirs: Sequence, out=None, *, command: Optional[str] = None,
                   log=print) -> str:
    """Write the findings page for ``study_dirs`` to ``out`` (default: ``findings.md`` in the first
    study's report folder; the project's ``docs/findings.md`` only when given explicitly) and
    return its Markdown.

    Each study needs ``report/table.json`` (``kdlab ablate``); ``report/robustness/seed*/`` and
    ``report/explain_study.json`` add the mCA / mCE and alignment measures when present."""
    if not study_dirs:
        raise ValueError("give at least one study directory (written by `kdlab ablate --out DIR`)")
    findings = [study_findings(d) for d in study_dirs]
    md = render_findings(findings, command)
    out = Path(out) if out is not None else Path(findings[0]["report_dir"]) / "findings.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, md)
    log(f"findings: {out}")
    if (out.parent / "table.md").is_file() and out.name == "findings.md":  # a study's report folder
        from kdlab.report.page import write_study_page

        write_study_page(out.parent, log=log)  # the page shows the findings sentences
    return md
