"""`kdlab methods` (the method library), `kdlab compare` (methods side by side over seeds) and
`kdlab paradigm dml|ban|ta|self|deepinv` (training schedules)."""

from __future__ import annotations

from pathlib import Path

from kdlab.cli import args as A


def cmd_methods(args) -> int:
    from kdlab.distill.losses import LOSSES
    from kdlab.experiments.paradigms import PARADIGMS

    print("loss terms (use in a recipe's loss: list; `kdlab compare --all digits` runs them all):")
    for e in LOSSES.entries():
        ref = f"  [{e.reference}]" if e.reference else ""
        print(f"  {e.name:<9} {e.description}{ref}")
    print("paradigms (`kdlab paradigm NAME RECIPE`):")
    for name, desc, ref in PARADIGMS:
        print(f"  {name:<9} {desc}  [{ref}]")
    return 0


def cmd_compare(args) -> int:
    from kdlab.experiments.compare import run_compare

    run_compare(args.recipes, args.out, dataset=args.all, seeds=args.seeds, baseline=args.baseline,
                data_dir=args.data_dir, overrides=A.recipe_overrides(args, False),
                progress=A.progress(args), profile=not args.no_profile)
    return 0


def cmd_paradigm(args) -> int:
    """``kdlab paradigm NAME RECIPE`` (a normal recipe) or ``kdlab paradigm PARADIGM_RECIPE``
    (e.g. paradigms/digits/ban); flags given on the command line override the file's settings."""
    from kdlab.core.config import load_recipe
    from kdlab.experiments.paradigms.runs import run_paradigm
    from kdlab.experiments.paradigms.spec import PARAMS, ParadigmSpec, check_params, is_paradigm_file, load_paradigm

    ov = A.recipe_overrides(args)
    first, ref = args.paradigm, args.recipe
    if first not in PARAMS:  # the first argument is a paradigm recipe
        if ref is not None:
            raise ValueError(f"unknown paradigm '{first}' (one of: {', '.join(PARAMS)})")
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
        spec = ParadigmSpec(first, check_params(first, {}), load_recipe(ref, ov), str(ref))
    cli = {"peers": args.peers, "n_peers": args.n_peers, "T": args.T, "generations": args.generations,
           "assistant": args.assistant, "checkpoint": args.checkpoint, "n_images": args.n_images,
           "iters": args.iters}
    for k, v in cli.items():
        if v is not None:
            if k not in PARAMS[spec.name]:
                raise ValueError(f"--{k.replace('_', '-')} does not apply to paradigm '{spec.name}'")
            spec.params[k] = v
    recipe = spec.recipe
    if args.seed is not None:
        recipe.train.seed = args.seed
    out = Path(args.out or f"runs/{recipe.name}-{spec.name}/seed{recipe.train.seed}")
    res = run_paradigm(spec, out, progress=A.progress(args), data_dir=args.data_dir)
    print(f"results: {out}")
    return 0 if res else 1


def register(sub) -> None:
    sub.add_parser("methods", help="list the distillation methods (loss terms and paradigms) with references"
                   ).set_defaults(func=cmd_methods)

    p = sub.add_parser("compare", help="compare distillation methods (recipes) over seeds in one table")
    p.add_argument("recipes", nargs="*", help="method recipes (paths or shipped names, e.g. methods/digits/dkd) "
                   "and/or paradigm recipes (e.g. paradigms/digits/ban)")
    p.add_argument("--all", metavar="DATASET",
                   help="every shipped method and paradigm recipe of a data set (digits, cifar10)")
    A.add_seeds(p)
    p.add_argument("--baseline", default="kd", help="method the paired differences are taken to (default kd)")
    A.add_out(p, "runs/compare-<dataset>")
    A.add_data_dir(p)
    A.add_set(p, "every recipe")
    A.add_device(p, recipe=True)
    p.add_argument("--no-profile", action="store_true", help="skip the params/FLOPs/latency columns")
    A.add_quiet(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("paradigm", help="run a distillation paradigm: dml, ban, ta, self, deepinv")
    p.add_argument("paradigm", help="dml, ban, ta, self or deepinv; or a paradigm recipe "
                   "(e.g. paradigms/digits/ban) holding the paradigm, its settings and its recipe")
    p.add_argument("recipe", nargs="?", help="base recipe (data, student, teacher, train settings, "
                   "distillation loss) when the first argument is a paradigm name")
    A.add_out(p, "runs/<recipe name>-<paradigm>/seed<k>")
    p.add_argument("--seed", type=int, help="override train.seed (default: the recipe's)")
    A.add_data_dir(p)
    A.add_set(p)
    A.add_device(p, recipe=True)
    p.add_argument("--peers", nargs="+", metavar="MODEL",
                   help="dml: peer model names (default: n-peers copies of the student)")
    p.add_argument("--n-peers", type=int, help="dml: number of peers (default 2)")
    p.add_argument("--T", type=float, help="dml: temperature of the mutual KL (default 1)")
    p.add_argument("--generations", type=int, help="ban: generations after gen 0 (default 2)")
    p.add_argument("--assistant", help="ta: assistant model name (default: sized between teacher and student)")
    p.add_argument("--checkpoint", help="self: a trained checkpoint of the student's architecture")
    p.add_argument("--n-images", type=int, help="deepinv: synthetic images (default 512)")
    p.add_argument("--iters", type=int, help="deepinv: optimisation steps per batch (default 200)")
    A.add_quiet(p)
    p.set_defaults(func=cmd_paradigm)
