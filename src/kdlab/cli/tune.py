"""``kdlab tune``: Optuna search of a recipe's values (:mod:`kdlab.experiments.tune`)."""

from __future__ import annotations

from kdlab.cli.args import (COUNT, POSITIVE, SEED, add_data_dir, add_device, add_out, add_quiet, add_set, progress,
                            recipe_overrides)


def cmd_tune(args) -> int:
    from kdlab.experiments.tune import tune

    tune(args.recipe, params=args.param, overrides=recipe_overrides(args), trials=args.trials,
         metric=args.metric, direction=args.direction, sampler=args.sampler, pruner=args.pruner,
         warmup_epochs=args.warmup_epochs, startup_trials=args.startup_trials, out_dir=args.out,
         storage=args.storage, study_name=args.study_name, worker=args.worker, jobs=args.jobs,
         threads=args.threads, seed=args.seed, then_study=args.then_study, progress=progress(args))
    return 0


def register(sub) -> None:
    p = sub.add_parser("tune", help="search a recipe's values (loss weights, ...) with Optuna on the validation split",
                       description="Search loss weights (or any recipe value) with Optuna: TPE, per-epoch "
                                   "pruning, one storage shared by several workers; writes best.yaml, "
                                   "trials.csv, importances and plots. See docs/tuning.md.")
    p.add_argument("recipe", nargs="?", help="recipe YAML path or shipped name (a --worker may omit it)")
    p.add_argument("--param", action="append", default=[], metavar="PATH=RANGE",
                   help="a searched value: loss.align.weight=log:0.01:10, loss.kd.T=2:8, "
                        "train.batch_size=int:16:64, loss.align.form='contrastive|cosine' (repeatable)")
    p.add_argument("--trials", type=POSITIVE, help="finished trials in the study (default: the recipe's tune.trials, or 30)")
    p.add_argument("--metric", help="validation metric to optimise (default val_acc)")
    p.add_argument("--direction", choices=["maximize", "minimize"], help="default maximize")
    p.add_argument("--sampler", choices=["tpe", "random"], help="default tpe")
    p.add_argument("--pruner", choices=["median", "halving", "none"], help="default median")
    p.add_argument("--warmup-epochs", type=COUNT, metavar="E", help="epochs before a trial may be pruned (default 1)")
    p.add_argument("--startup-trials", type=COUNT, metavar="N",
                   help="trials before TPE and the pruner start (default 5)")
    add_out(p, "runs/<recipe name>-tune")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: an RDB URL (sqlite:///tune.db, postgresql://...) or a journal "
                        "file (default: <out>/study.journal)")
    p.add_argument("--study-name", metavar="NAME", help="default: <recipe name>-tune")
    p.add_argument("--worker", action="store_true",
                   help="only run trials of the shared study and write no outputs (start any number)")
    p.add_argument("--jobs", type=POSITIVE, default=1, metavar="N", help="worker processes on this machine (default 1)")
    p.add_argument("--threads", type=POSITIVE, metavar="T", help="intra-op threads per worker (default: cores // jobs)")
    p.add_argument("--seed", type=SEED, help="sampler seed (default: the recipe's train.seed)")
    p.add_argument("--then-study", type=COUNT, default=0, metavar="N",
                   help="then train the untuned and the tuned recipe over seeds 0..N-1 as a paired study "
                        "on the test split")
    add_set(p)
    add_device(p, recipe=True)
    add_data_dir(p)
    add_quiet(p)
    p.set_defaults(func=cmd_tune)
