"""`kdlab methods` (the method library), `kdlab compare` (methods side by side over seeds) and
`kdlab paradigm dml|ban|ta|self|deepinv` (training schedules)."""

from __future__ import annotations

import json
from pathlib import Path

from kdlab.core.config import RECIPES_DIR


def method_recipes(dataset: str) -> list[str]:
    """Shipped method recipes of a data set (``methods/<dataset>/*.yaml``), KD first."""
    folder = RECIPES_DIR / "methods" / dataset
    if not folder.is_dir():
        have = sorted(p.name for p in (RECIPES_DIR / "methods").iterdir() if p.is_dir() and p.name != "teachers")
        raise ValueError(f"no shipped method recipes for '{dataset}'; use one of: {', '.join(have)}")
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    names.sort(key=lambda n: (n != "kd", n != "baseline", n))
    return [f"methods/{dataset}/{n}" for n in names]


def cmd_methods(args) -> int:
    from kdlab.distill.losses import LOSSES
    from kdlab.experiments.paradigms import list_paradigms

    print("loss terms (use in a recipe's loss: list; `kdlab compare --all digits` runs them all):")
    for e in LOSSES.entries():
        ref = f"  [{e.reference}]" if e.reference else ""
        print(f"  {e.name:<9} {e.description}{ref}")
    print("paradigms (`kdlab paradigm NAME RECIPE`):")
    for name, desc, ref in list_paradigms():
        print(f"  {name:<9} {desc}  [{ref}]")
    return 0


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


def run_compare(refs: list[str], out_dir, *, seeds, baseline="kd", data_dir=None, overrides=None,
                progress=True, profile=True, log=print) -> dict:
    """Loss-term recipes run through ``run_study``; paradigm recipes (``recipes/paradigms/...``,
    files with a ``paradigm:`` section) through ``kdlab.experiments.paradigms.runs``; one table of both."""
    from kdlab.core.config import load_recipe
    from kdlab.experiments.paradigms.runs import run_paradigm_seeds, student_recipe
    from kdlab.experiments.paradigms.spec import is_paradigm_file, load_paradigm
    from kdlab.experiments.study import run_study
    from kdlab.train.build import ensure_teachers

    recipes, paradigms = {}, {}
    ov = list(overrides or []) + ([f"data.data_dir={data_dir}"] if data_dir else [])
    for ref in refs:
        name = _method_name(ref)
        if name in recipes or name in paradigms:
            raise ValueError(f"two recipes are both named '{name}'; compare recipes with distinct file names")
        if is_paradigm_file(ref):
            paradigms[name] = load_paradigm(ref, ov)
        else:  # `--set paradigm.X=...` only concerns the paradigm recipes
            recipes[name] = load_recipe(ref, [o for o in ov if not o.startswith("paradigm.")])
    names = list(recipes) + [n for m, sp in paradigms.items()
                             for n in ([m, f"{m}-ensemble"] if sp.name == "ban" else [m])]
    if baseline not in names:
        raise ValueError(f"baseline '{baseline}' is not among the compared methods ({', '.join(names)}); "
                         f"add its recipe or pass --baseline <method>")
    for r in recipes.values():
        ensure_teachers(r, data_dir=data_dir, progress=progress, log=log)
    out_dir = Path(out_dir)
    log(f"comparing {len(recipes) + len(paradigms)} methods x {len(seeds)} seeds -> {out_dir}")
    if not paradigms:
        report = run_study(recipes, out_dir, seeds=list(seeds), data_dir=data_dir, progress=progress,
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

            run_study(recipes, out_dir, seeds=list(seeds), data_dir=data_dir, progress=progress,
                      log=study_log, baseline=baseline, profile=False)
            for m in recipes:
                for s in seeds:
                    rows.append(json.loads((out_dir / m / f"seed{s}" / "result.json").read_text()))
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
    (out_dir / "report" / "comparison.md").write_text(md + "\n\n" + note + "\n")
    (out_dir / "report" / "compare.json").write_text(json.dumps(
        {"recipes": {**{m: r.source for m, r in recipes.items()},
                     **{m: sp.source for m, sp in paradigms.items()}},
         "paradigms": {m: {"name": sp.name, **sp.params.model_dump()} for m, sp in paradigms.items()},
         "seeds": list(seeds), "baseline": baseline}, indent=2))
    log("")
    log(md)
    log(note)
    report["comparison_md"] = md
    return report


def cmd_compare(args) -> int:
    refs = list(args.recipes or [])
    if args.all:
        from kdlab.experiments.paradigms.spec import list_paradigm_recipes

        shipped = method_recipes(args.all) + list_paradigm_recipes(args.all)
        refs = shipped + [r for r in refs if r not in shipped]
    if not refs:
        raise ValueError("name recipes to compare (e.g. methods/digits/kd methods/digits/dkd) or use --all digits")
    out = args.out or f"runs/compare-{args.all or 'methods'}"
    run_compare(refs, out, seeds=args.seeds, baseline=args.baseline, data_dir=args.data_dir,
                overrides=args.overrides, progress=not args.quiet, profile=not args.no_profile)
    return 0


def cmd_paradigm(args) -> int:
    """``kdlab paradigm NAME RECIPE`` (a normal recipe) or ``kdlab paradigm PARADIGM_RECIPE``
    (e.g. paradigms/digits/ban); ``--set paradigm.<setting>=value`` sets the paradigm's settings."""
    from kdlab.core.config import load_recipe
    from kdlab.experiments.paradigms import PARADIGMS
    from kdlab.experiments.paradigms.runs import run_paradigm
    from kdlab.experiments.paradigms.spec import ParadigmSpec, check_params, is_paradigm_file, load_paradigm

    ov = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    first, ref = args.paradigm, args.recipe
    if first not in PARADIGMS:  # the first argument is a paradigm recipe
        if ref is not None:
            raise ValueError(f"unknown paradigm '{first}' (one of: {', '.join(PARADIGMS.names())})")
        first, ref = None, first
    if ref is None:
        raise ValueError(f"name a recipe: kdlab paradigm {first} RECIPE (or a paradigm recipe, "
                         f"e.g. kdlab paradigm paradigms/digits/{first})")
    if is_paradigm_file(ref):
        spec = load_paradigm(ref, ov)
        if first is not None and first != spec.name:
            raise ValueError(f"{ref} is a '{spec.name}' paradigm recipe, not '{first}'")
    else:
        if first is None:
            raise ValueError(f"'{ref}' is not a paradigm recipe (no 'paradigm:' section); "
                             f"use kdlab paradigm NAME {ref}")
        from kdlab.core.config import apply_overrides

        par = apply_overrides({"paradigm": {}}, [o for o in ov if o.startswith("paradigm.")])["paradigm"]
        spec = ParadigmSpec(first, check_params(first, par, "--set paradigm"),
                            load_recipe(ref, [o for o in ov if not o.startswith("paradigm.")]), str(ref))
    recipe = spec.recipe
    if args.seed is not None:
        recipe = spec.recipe = recipe.with_seed(args.seed)
    out = Path(args.out or f"runs/{recipe.name}-{spec.name}/seed{recipe.train.seed}")
    res = run_paradigm(spec, out, progress=not args.quiet, data_dir=args.data_dir)
    print(f"results: {out}")
    return 0 if res else 1


def register(sub) -> None:
    sub.add_parser("methods", help="list the distillation methods (loss terms and paradigms) with references"
                   ).set_defaults(func=cmd_methods)

    p = sub.add_parser("compare", help="compare distillation methods (recipes) over seeds in one table")
    p.add_argument("recipes", nargs="*", help="method recipes (paths or shipped names, e.g. methods/digits/dkd) "
                   "and/or paradigm recipes (e.g. paradigms/digits/ban)")
    p.add_argument("--all", metavar="DATASET", help="every shipped method and paradigm recipe of a data set (digits, cifar10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baseline", default="kd", help="method the paired differences are taken to (default kd)")
    p.add_argument("--out", help="study folder (default runs/compare-<dataset>)")
    p.add_argument("--data-dir", help="folder with the data set files (CIFAR pickles)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every recipe, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--no-profile", action="store_true", help="skip the params/FLOPs/latency columns")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("paradigm", help="run a distillation paradigm: dml, ban, ta, self, deepinv")
    p.add_argument("paradigm", help="dml, ban, ta, self or deepinv; or a paradigm recipe "
                   "(e.g. paradigms/digits/ban) holding the paradigm, its settings and its recipe")
    p.add_argument("recipe", nargs="?", help="base recipe (data, student, teacher, train settings, "
                   "distillation loss) when the first argument is a paradigm name")
    p.add_argument("--out", help="output folder (default runs/<recipe name>-<paradigm>/seed<k>)")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, or a paradigm setting: --set paradigm.generations=3")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_paradigm)
