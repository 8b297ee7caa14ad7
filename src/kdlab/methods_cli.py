"""`kdlab methods` (the method library), `kdlab compare` (methods side by side over seeds) and
`kdlab paradigm dml|ban|ta|self|deepinv` (training schedules)."""

from __future__ import annotations

import json
from pathlib import Path

from kdlab.config import RECIPES_DIR


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
    from kdlab.losses import LOSSES
    from kdlab.paradigms import PARADIGMS

    print("loss terms (use in a recipe's loss: list; `kdlab compare --all digits` runs them all):")
    for e in LOSSES.entries():
        ref = f"  [{e.reference}]" if e.reference else ""
        print(f"  {e.name:<9} {e.description}{ref}")
    print("paradigms (`kdlab paradigm NAME RECIPE`):")
    for name, desc, ref in PARADIGMS:
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
    from kdlab.config import load_recipe
    from kdlab.paradigms import ensure_extra_teachers
    from kdlab.study import run_study

    recipes = {}
    for ref in refs:
        ov = list(overrides or []) + ([f"data.data_dir={data_dir}"] if data_dir else [])
        name = _method_name(ref)
        if name in recipes:
            raise ValueError(f"two recipes are both named '{name}'; compare recipes with distinct file names")
        recipes[name] = load_recipe(ref, ov)
    if baseline not in recipes:
        raise ValueError(f"baseline '{baseline}' is not among the compared methods ({', '.join(recipes)}); "
                         f"add its recipe or pass --baseline <method>")
    for r in recipes.values():
        ensure_extra_teachers(r, data_dir=data_dir, progress=progress, log=log)
    out_dir = Path(out_dir)
    log(f"comparing {len(recipes)} methods x {len(seeds)} seeds -> {out_dir}")
    report = run_study(recipes, out_dir, seeds=list(seeds), data_dir=data_dir, progress=progress,
                       log=log, baseline=baseline, profile=profile)
    md = comparison_table(report["methods"], baseline)
    note = (f"Test top-1 over seeds {list(seeds)} (± sample sd); Δ is the paired difference to "
            f"'{baseline}' (same seed, same data order); wall time is the mean training time per run.")
    (out_dir / "report" / "comparison.md").write_text(md + "\n\n" + note + "\n")
    (out_dir / "report" / "compare.json").write_text(json.dumps(
        {"recipes": {m: r.source for m, r in recipes.items()}, "seeds": list(seeds), "baseline": baseline}, indent=2))
    log("")
    log(md)
    log(note)
    report["comparison_md"] = md
    return report


def cmd_compare(args) -> int:
    refs = list(args.recipes or [])
    if args.all:
        refs = method_recipes(args.all) + [r for r in refs if r not in method_recipes(args.all)]
    if not refs:
        raise ValueError("name recipes to compare (e.g. methods/digits/kd methods/digits/dkd) or use --all digits")
    out = args.out or f"runs/compare-{args.all or 'methods'}"
    run_compare(refs, out, seeds=args.seeds, baseline=args.baseline, data_dir=args.data_dir,
                overrides=args.overrides, progress=not args.quiet, profile=not args.no_profile)
    return 0


def cmd_paradigm(args) -> int:
    from kdlab.config import load_recipe
    from kdlab.paradigms import chains, deepinv, dml

    ov = list(args.overrides) + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    recipe = load_recipe(args.recipe, ov)
    if args.seed is not None:
        recipe.train.seed = args.seed
    out = Path(args.out or f"runs/{recipe.name}-{args.paradigm}/seed{recipe.train.seed}")
    prog = not args.quiet
    if args.paradigm == "dml":
        res = dml.run_dml(recipe, out, peers=args.peers, n_peers=args.n_peers, T=args.T, progress=prog)
    elif args.paradigm == "ban":
        res = chains.run_ban(recipe, out, generations=args.generations, progress=prog)
    elif args.paradigm == "ta":
        res = chains.run_ta(recipe, out, assistant=args.assistant, progress=prog)
    elif args.paradigm == "self":
        res = chains.run_self(recipe, out, checkpoint=args.checkpoint, progress=prog)
    else:
        res = deepinv.run_deepinv(recipe, out, n_images=args.n_images, iters=args.iters, progress=prog)
    print(f"results: {out}")
    return 0 if res else 1


def register(sub) -> None:
    sub.add_parser("methods", help="list the distillation methods (loss terms and paradigms) with references"
                   ).set_defaults(func=cmd_methods)

    p = sub.add_parser("compare", help="compare distillation methods (recipes) over seeds in one table")
    p.add_argument("recipes", nargs="*", help="method recipes (paths or shipped names, e.g. methods/digits/dkd)")
    p.add_argument("--all", metavar="DATASET", help="every shipped method recipe of a data set (digits, cifar10)")
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
    p.add_argument("paradigm", choices=["dml", "ban", "ta", "self", "deepinv"])
    p.add_argument("recipe", help="base recipe (data, student, teacher, train settings, distillation loss)")
    p.add_argument("--out", help="output folder (default runs/<recipe name>-<paradigm>/seed<k>)")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--peers", nargs="+", help="dml: peer model names (default: n-peers copies of the student)")
    p.add_argument("--n-peers", type=int, default=2, help="dml: number of peers (default 2)")
    p.add_argument("--T", type=float, default=1.0, help="dml: temperature of the mutual KL (default 1)")
    p.add_argument("--generations", type=int, default=2, help="ban: generations after gen 0 (default 2)")
    p.add_argument("--assistant", help="ta: assistant model name (default: sized between teacher and student)")
    p.add_argument("--checkpoint", help="self: a trained checkpoint of the student's architecture")
    p.add_argument("--n-images", type=int, default=512, help="deepinv: synthetic images (default 512)")
    p.add_argument("--iters", type=int, default=200, help="deepinv: optimisation steps per batch (default 200)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_paradigm)
