"""Methods side by side over seeds: loss-term recipes and paradigm recipes in one table
(``kdlab compare``)."""

from __future__ import annotations

import json
from pathlib import Path

from kdlab.core.io import atomic_write_text, read_json


def method_recipes(dataset: str) -> list[str]:
    """Shipped method recipes of a data set (``methods/<dataset>/*.yaml``), KD first."""
    from kdlab.core.config import RECIPES_DIR

    folder = RECIPES_DIR / "methods" / dataset
    if not folder.is_dir():
        have = sorted(p.name for p in (RECIPES_DIR / "methods").iterdir() if p.is_dir() and p.name != "teachers")
        raise ValueError(f"no shipped method recipes for '{dataset}'; use one of: {', '.join(have)}")
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    names.sort(key=lambda n: (n != "kd", n != "baseline", n))
    return [f"methods/{dataset}/{n}" for n in names]


def _method_name(ref: str) -> str:
    return Path(ref).stem if ref.endswith(".yaml") or "/" in ref else ref


def comparison_table(stats: list[dict], baseline: str) -> str:
    """Markdown: method, test top-1 mean ± sd, paired Δ to the baseline, mean train wall time."""
    from kdlab.report.tables import fmt_pct, markdown_table

    rows = []
    for r in stats:
        diff = "—" if r["method"] == baseline else fmt_pct(r[f"diff_vs_{baseline}"], r[f"diff_vs_{baseline}_ci95"])
        rows.append([r["method"], r["n_seeds"], fmt_pct(r["test_acc_mean"], r["test_acc_sd"]), diff,
                     f"{r['train_time_s_mean']:.1f}"])
    return markdown_table(["method", "seeds", "top-1 % (mean ± sd)", f"Δ vs {baseline} (pp, 95% CI)",
                           "train wall time (s/run)"], rows)


def compare_refs(refs, dataset: str | None = None) -> list[str]:
    """The recipes to compare: with ``dataset``, every shipped method and paradigm recipe of it
    (:func:`method_recipes`, then the paradigm recipes) followed by the other ``refs``."""
    refs = list(refs or [])
    if dataset:
        from kdlab.experiments.paradigms.spec import list_paradigm_recipes

        shipped = method_recipes(dataset) + list_paradigm_recipes(dataset)
        refs = shipped + [r for r in refs if r not in shipped]
    if not refs:
        raise ValueError("name recipes to compare (e.g. methods/digits/kd methods/digits/dkd) or use --all digits")
    return refs


def run_compare(refs: list[str], out_dir=None, *, dataset: str | None = None, seeds=None,
                baseline="kd", data_dir=None, overrides=None, progress=True, profile=True,
                log=print, **parallel) -> dict:
    """Run methods side by side over seeds and write one comparison table.

    ``refs``: method recipes and/or paradigm recipes (paths or shipped names); with ``dataset``
    every shipped one of that data set too (:func:`compare_refs`). Loss-term recipes run through
    ``run_study``; paradigm recipes (``recipes/paradigms/...``, files with a ``paradigm:``
    section) through ``kdlab.experiments.paradigms.runs``; one table of both, with paired
    differences to ``baseline``. ``seeds`` default to the first recipe's ``study.seeds``;
    ``out_dir`` to ``runs/compare-<dataset or 'methods'>``. Writes ``report/comparison.md`` and
    ``report/compare.json`` under ``out_dir``; returns the study report plus ``comparison_md``."""
    refs = compare_refs(refs, dataset)
    out_dir = out_dir or f"runs/compare-{dataset or 'methods'}"
    from kdlab.train.recipe import load_recipe
    from kdlab.experiments.paradigms import PARADIGMS
    from kdlab.train.build import check_can_train, ensure_teachers
    from kdlab.experiments.paradigms.runs import run_paradigm_seeds, student_recipe
    from kdlab.experiments.paradigms.spec import is_paradigm_file, load_paradigm, paradigm_kind
    from kdlab.experiments.study import run_study

    recipes, paradigms = {}, {}
    ov = list(overrides or []) + ([f"data.data_dir={data_dir}"] if data_dir else [])
    for ref in refs:
        name = _method_name(ref)
        if name in recipes or name in paradigms:
            raise ValueError(f"two recipes are both named '{name}'; compare recipes with distinct file names")
        if is_paradigm_file(ref):
            kind = paradigm_kind(ref)  # `--set paradigm.X=...` goes to the paradigms that have X
            fields = PARADIGMS.entry(kind).meta["params"].model_fields if kind in PARADIGMS else {}
            paradigms[name] = load_paradigm(ref, [o for o in ov if not o.startswith("paradigm.")
                                                  or o.split("=", 1)[0].split(".")[1] in fields])
        else:  # `--set paradigm.X=...` only concerns the paradigm recipes
            recipes[name] = load_recipe(ref, [o for o in ov if not o.startswith("paradigm.")])
    names = list(recipes) + [n for m, sp in paradigms.items()
                             for n in ([m, f"{m}-ensemble"] if sp.name == "ban" else [m])]
    if baseline not in names:
        raise ValueError(f"baseline '{baseline}' is not among the compared methods ({', '.join(names)}); "
                         f"add its recipe or pass --baseline <method>")
    from kdlab.core.io import check_out_dir

    check_out_dir(out_dir, "compare folder", create=False)  # before a teacher is trained
    for r in recipes.values():
        check_can_train(r)
    for r in recipes.values():
        ensure_teachers(r, data_dir=data_dir, progress=progress, log=log)
    if seeds is None:  # the first recipe's study.seeds
        first = (list(recipes.values()) + [sp.recipe for sp in paradigms.values()])[0]
        seeds = list(first.study.seeds)
    out_dir = Path(out_dir)
    log(f"comparing {len(recipes) + len(paradigms)} methods x {len(seeds)} seeds -> {out_dir}")
    if not paradigms:
        report = run_study(recipes, out_dir, seeds=list(seeds), data_dir=data_dir, progress=progress, **parallel,
                           log=log, baseline=baseline, profile=profile)
    else:
        from kdlab.report.tables import study_report

        rows = []
        if recipes:
            muted = []

            def study_log(*a):  # run_study's own (loss-terms-only) table is replaced below
                if not muted:
                    log(*a)
                if a and str(a[0]).startswith("study wall time"):
                    muted.append(True)

            run_study(recipes, out_dir, seeds=list(seeds), data_dir=data_dir, progress=progress, **parallel,
                      log=study_log, baseline=baseline, profile=False)
            for m in recipes:
                for s in seeds:
                    rows.append(read_json(out_dir / m / f"seed{s}" / "result.json", "run result"))
        all_recipes = dict(recipes)
        for m, sp in paradigms.items():
            log(f"paradigm {m} ({sp.name}, {', '.join(f'{k}={v}' for k, v in sp.params.model_dump().items())})")
            rows += run_paradigm_seeds(sp, m, out_dir, seeds=list(seeds), data_dir=data_dir,
                                       progress=progress, log=log)
            all_recipes[m] = all_recipes[f"{m}-ensemble"] = student_recipe(sp)
        report = study_report(rows, all_recipes, out_dir / "report", baseline=baseline, profile=profile,
                              log=log)
    md = comparison_table(report["methods"], baseline)
    note = (f"Test top-1 over seeds {list(seeds)} (± sample sd); Δ is the paired difference to "
            f"'{baseline}' (same seed, same data order); wall time is the mean training time per run"
            + (" (a paradigm's: all its generations / links / peers; '-ensemble' rows share their "
               "paradigm's runs)" if paradigms else "") + ".")
    atomic_write_text(out_dir / "report" / "comparison.md", md + "\n\n" + note + "\n")
    atomic_write_text(out_dir / "report" / "compare.json", json.dumps(
        {"recipes": {**{m: r.source for m, r in recipes.items()},
                     **{m: sp.source for m, sp in paradigms.items()}},
         "paradigms": {m: {"name": sp.name, **sp.params.model_dump()} for m, sp in paradigms.items()},
         "seeds": list(seeds), "baseline": baseline}, indent=2))
    log("")
    log(md)
    log(note)
    report["comparison_md"] = md
    return report


