"""Core subcommands: train-teacher, distill, ablate, demo, evaluate, and the listings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _common(p: argparse.ArgumentParser, out_help: str, nargs=None) -> None:
    p.add_argument("recipe", nargs=nargs, help="recipe YAML path or shipped name (see `kdlab recipes`)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--data-dir", help="folder with the data set files (CIFAR pickles)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args):
    from kdlab.core.config import load_recipe

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return load_recipe(args.recipe, overrides)


def cmd_train_teacher(args) -> int:
    from kdlab.train.build import train

    recipe = _load(args)
    out = Path(args.out or f"runs/{recipe.name}")
    print(f"training {recipe.student.model} on {recipe.data.name} -> {out}")
    res = train(recipe, out, progress=not args.quiet, resume=not args.restart, method="teacher")
    print(json.dumps({k: res[k] for k in ("val_acc", "test_acc", "best_epoch", "epochs_run")}))
    print(f"checkpoint: {out / 'best.pt'}")
    return 0


def cmd_distill(args) -> int:
    from kdlab.train.build import ensure_teachers, train

    recipe = _load(args)
    if args.seed is not None:
        recipe.train.seed = args.seed
    ensure_teachers(recipe, data_dir=args.data_dir, progress=not args.quiet)
    out = Path(args.out or f"runs/{recipe.name}/seed{recipe.train.seed}")
    print(f"distilling {recipe.name}: {recipe.student.model} <- "
          f"{recipe.teacher.model if recipe.teacher else 'no teacher'} -> {out}")
    res = train(recipe, out, progress=not args.quiet, resume=not args.restart, method=recipe.name)
    print(json.dumps({k: res[k] for k in ("val_acc", "test_acc", "best_epoch", "epochs_run")}))
    print(f"checkpoint: {out / 'best.pt'}")
    return 0


def cmd_ablate(args) -> int:
    from kdlab.experiments.study import run_ablation

    run_ablation(args.recipe, out_dir=args.out, seeds=args.seeds, mode=args.mode,
                 data_dir=args.data_dir, overrides=args.overrides, progress=not args.quiet,
                 teacher_cache=not args.no_teacher_cache)
    return 0


def cmd_demo(args) -> int:
    from kdlab.experiments.study import run_ablation

    from kdlab.experiments.study import study_robustness

    report = run_ablation("digits/full", out_dir=args.out, seeds=args.seeds, mode="ladder",
                          progress=not args.quiet)
    if not args.no_robustness:
        print("\nrobustness of the five methods (19 corruptions x 5 severities, seed 0):")
        study_robustness(Path(report["out_dir"]).parent, progress=not args.quiet)
    return 0


def cmd_sweep(args) -> int:
    from kdlab.experiments.sweep import run_sweep

    run_sweep(args.recipe, alphas=args.alphas, students=args.students, seeds=args.seeds,
              out_dir=args.out, data_dir=args.data_dir, overrides=args.overrides,
              n_images=args.n_images, method=args.method, grid=args.grid, k=args.k,
              steps=args.steps, progress=not args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from kdlab.core.checkpoint import load_model
    from kdlab.data import BatchLoader, load_dataset
    from kdlab.evaluate.accuracy import evaluate
    from kdlab.train.build import check_pair

    model, ck = load_model(args.checkpoint)
    splits = load_dataset(args.dataset or ck["dataset"], args.data_dir)
    check_pair(ck["num_classes"], ck["in_channels"], splits.info, args.checkpoint)
    tset = getattr(splits, args.split)
    loader = BatchLoader(tset, 512, shuffle=False, mean=splits.info.mean, std=splits.info.std)
    res = evaluate(model, loader)
    print(json.dumps({"checkpoint": args.checkpoint, "split": args.split, **res}))
    return 0


def cmd_recipes(args) -> int:
    from kdlab.core.config import list_recipes, load_recipe

    for name in list_recipes():
        try:
            desc = load_recipe(name).description
        except Exception as e:  # a broken shipped recipe should be visible, not hidden
            desc = f"INVALID: {e}"
        print(f"{name:<28} {desc}")
    return 0


def cmd_models(args) -> int:
    from kdlab.models import list_models

    for name, desc in list_models():
        print(f"{name:<14} {desc}")
    return 0


def cmd_losses(args) -> int:
    from kdlab.distill.losses import LOSSES

    for e in LOSSES.entries():
        ref = f"  [{e.reference}]" if e.reference else ""
        print(f"{e.name:<10} {e.description}{ref}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a model with plain cross-entropy (a teacher)")
    _common(p, "run folder (default runs/<recipe name>)")
    p.add_argument("--restart", action="store_true", help="ignore an unfinished run and start over")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="train one student from a recipe (teacher trained first if missing)")
    _common(p, "run folder (default runs/<recipe name>/seed<k>)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--restart", action="store_true", help="ignore an unfinished run and start over")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("ablate", help="step-wise and leave-one-out ablation of a full recipe over seeds")
    _common(p, "study folder (default runs/<recipe name>)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the recipe's study.seeds)")
    p.add_argument("--mode", choices=["ladder", "loo", "both"], help="which methods (default: recipe)")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher live for every student (same results, slower; docs/speed.md)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("demo", help="the main job on the embedded digits data: teacher + five-method study")
    p.add_argument("--out", help="study folder (default runs/digits-full)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-robustness", action="store_true", help="skip the corruption evaluation")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="explanation sweep: KD strength alpha x student size vs one teacher")
    _common(p, "sweep folder (default runs/<recipe name>-sweep)", nargs="?")
    p.set_defaults(recipe="digits/kd")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.1],
                   help="weights of the hard-label term (1.0 = no KD)")
    p.add_argument("--students", nargs="+", default=["cnn_tiny", "cnn_small", "cnn_medium"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--method", choices=["saliency", "ig", "gradcam"], default="ig")
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--steps", type=int, default=32)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a split")
    p.add_argument("checkpoint")
    p.add_argument("--dataset", help="default: the checkpoint's data set")
    p.add_argument("--data-dir")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.set_defaults(func=cmd_evaluate)

    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=cmd_recipes)
    sub.add_parser("models", help="list model names").set_defaults(func=cmd_models)
    sub.add_parser("losses", help="list loss terms").set_defaults(func=cmd_losses)
