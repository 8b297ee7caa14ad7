"""``kdlab diffusion``: train a diffusion teacher or a progressive-distillation chain, and the
step-count study (FD against sampling steps, teacher DDIM vs distilled). See docs/diffusion.md."""

from __future__ import annotations

import sys

from kdlab.cli.args import add_device, add_out, add_quiet, add_seeds, add_set, progress, recipe_overrides


def cmd_train(args) -> int:
    from kdlab.experiments.paradigms.progressive import train_recipe

    train_recipe(args.recipe, recipe_overrides(args, with_data_dir=False), out_dir=args.out, seed=args.seed,
                 restart=args.restart, progress=progress(args))
    return 0


def cmd_study(args) -> int:
    from kdlab.experiments.paradigms.progressive import study_recipe

    study_recipe(args.recipe, recipe_overrides(args, with_data_dir=False), out_dir=args.out, seeds=args.seeds,
                 timing=args.time, progress=progress(args), command="kdlab " + " ".join(sys.argv[1:]))
    return 0


def register(sub) -> None:
    p = sub.add_parser("diffusion", help="diffusion: DDPM teacher, progressive distillation of its sampler, FD study",
                       description="Diffusion sampling distillation (docs/diffusion.md).")
    dsub = p.add_subparsers(dest="diffusion_command", metavar="DIFFUSION_COMMAND", help="train | study")
    dsub.required = True
    q = dsub.add_parser("train", help="train a teacher recipe, or a distill recipe's whole chain of rounds "
                                      "(an interrupted chain resumes where it stopped)")
    q.add_argument("recipe", help="diffusion recipe YAML or shipped name (diffusion/digits_teacher, "
                                  "diffusion/digits_progressive, ...)")
    q.add_argument("--seed", type=int, help="override train.seed")
    q.add_argument("--restart", action="store_true", help="ignore unfinished runs and start over")
    add_out(q, "runs/<recipe name>/seed<k>")
    add_set(q)
    add_device(q, recipe=True)
    add_quiet(q)
    q.set_defaults(func=cmd_train)
    q = dsub.add_parser("study", help="a distill recipe over seeds: chains, the teacher's DDIM at every step count, "
                                      "the FD-vs-steps table and figures")
    q.add_argument("recipe", help="a diffusion distill recipe (diffusion/digits_progressive, ...)")
    add_seeds(q)
    q.add_argument("--time", action="store_true",
                   help="also measure the sampling time per image at every step count (use an idle machine)")
    add_out(q, "runs/<recipe name>")
    add_set(q)
    add_device(q, recipe=True)
    add_quiet(q)
    q.set_defaults(func=cmd_study)
