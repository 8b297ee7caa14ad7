"""`kdlab methods` (the method library), `kdlab compare` (methods side by side over seeds) and
`kdlab paradigm dml|ban|ta|self|deepinv|dafl|zskt|noise` (training schedules)."""

from __future__ import annotations

from pathlib import Path

from kdlab.cli import args as A


def cmd_methods(args) -> int:
    from kdlab.experiments.commands import methods_listing

    print(methods_listing())
    return 0


def cmd_compare(args) -> int:
    from kdlab.experiments.compare import run_compare

    run_compare(args.recipes, args.out, dataset=args.all, seeds=args.seeds, baseline=args.baseline,
                data_dir=args.data_dir, overrides=A.recipe_overrides(args, False),
                progress=A.progress(args), profile=not args.no_profile, **A.parallel_kwargs(args))
    return 0


def cmd_paradigm(args) -> int:
    """``kdlab paradigm NAME RECIPE`` (a normal recipe) or ``kdlab paradigm PARADIGM_RECIPE``
    (e.g. paradigms/digits/ban); ``--set paradigm.<setting>=value`` sets the paradigm's settings."""
    from kdlab.experiments.commands import paradigm_command

    res = paradigm_command(args.paradigm, args.recipe, A.recipe_overrides(args), seed=args.seed, out=args.out,
                           data_dir=args.data_dir, progress=A.progress(args))
    return 0 if res else 1


def register(sub) -> None:
    sub.add_parser("methods", help="list the distillation methods (loss terms and paradigms) with references"
                   ).set_defaults(func=cmd_methods)

    p = sub.add_parser("compare", help="compare distillation methods (recipes) over seeds in one table")
    A.add_parallel(p)
    p.add_argument("recipes", nargs="*", help="method recipes (paths or shipped names, e.g. methods/digits/dkd) "
                   "and/or paradigm recipes (e.g. paradigms/digits/ban)")
    p.add_argument("--all", metavar="DATASET",
                   help="every shipped method and paradigm recipe of a data set (digits, mnist5k, cifar10)")
    A.add_seeds(p)
    p.add_argument("--baseline", default="kd", help="method the paired differences are taken to (default kd)")
    A.add_out(p, "runs/compare-<dataset>")
    A.add_data_dir(p)
    A.add_set(p, "every recipe")
    A.add_device(p, recipe=True)
    p.add_argument("--no-profile", action="store_true", help="skip the params/FLOPs/latency columns")
    A.add_quiet(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("paradigm", help="run a distillation paradigm: dml, ban, ta, self, deepinv, dafl, zskt, noise")
    p.add_argument("paradigm", help="dml, ban, ta, self, deepinv, dafl, zskt or noise; or a paradigm recipe "
                   "(e.g. paradigms/digits/ban) holding the paradigm, its settings and its recipe")
    p.add_argument("recipe", nargs="?", help="base recipe (data, student, teacher, train settings, "
                   "distillation loss) when the first argument is a paradigm name")
    A.add_out(p, "runs/<recipe name>-<paradigm>/seed<k>")
    p.add_argument("--seed", type=A.SEED, help="override train.seed (default: the recipe's)")
    A.add_data_dir(p)
    A.add_set(p)  # also paradigm settings: --set paradigm.generations=3
    A.add_device(p, recipe=True)
    A.add_quiet(p)
    p.set_defaults(func=cmd_paradigm)
