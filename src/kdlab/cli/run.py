"""Core subcommands: train-teacher, distill, ablate, demo, sweep, evaluate, and the listings."""

from __future__ import annotations

import json
from pathlib import Path

from kdlab.cli import args as A


def _recipe_args(p, out_help: str, nargs=None) -> None:
    p.add_argument("recipe", nargs=nargs, help="recipe YAML path or shipped name (see `kdlab recipes`)")
    A.add_out(p, out_help)
    A.add_data_dir(p)
    A.add_set(p)
    A.add_device(p, recipe=True)
    A.add_quiet(p)


def cmd_train_teacher(args) -> int:
    from kdlab.experiments.commands import train_teacher_command

    train_teacher_command(args.recipe, A.recipe_overrides(args), out=args.out, progress=A.progress(args),
                          restart=args.restart)
    return 0


def cmd_distill(args) -> int:
    from kdlab.experiments.commands import distill_command

    distill_command(args.recipe, A.recipe_overrides(args), out=args.out, seed=args.seed, data_dir=args.data_dir,
                    progress=A.progress(args), restart=args.restart)
    return 0


def cmd_ablate(args) -> int:
    from kdlab.experiments.study import run_ablation

    run_ablation(args.recipe, out_dir=args.out, seeds=args.seeds, mode=args.mode,
                 data_dir=args.data_dir, overrides=A.recipe_overrides(args, False),
                 progress=A.progress(args), teacher_cache=not args.no_teacher_cache, **A.parallel_kwargs(args))
    return 0


def cmd_demo(args) -> int:
    from kdlab.experiments.commands import demo

    demo(out=args.out, seeds=args.seeds, overrides=A.recipe_overrides(args), device=args.device,
         robustness=not args.no_robustness, explain=not args.no_explain, progress=A.progress(args))
    return 0


def cmd_explain_study(args) -> int:
    from kdlab.experiments.commands import explain_study_command

    explain_study_command(args.study, teacher=args.teacher, n_images=args.n_images, method=args.method,
                          grid=args.grid, k=args.k, steps=args.steps, data_dir=args.data_dir, device=args.device)
    return 0


def cmd_findings(args) -> int:
    from kdlab.experiments.findings import write_findings

    write_findings(args.studies, out=Path(args.out) / "findings.md" if args.out else None,
                   command="kdlab findings " + " ".join(args.studies) + (f" --out {args.out}" if args.out else ""))
    return 0


def cmd_report(args) -> int:
    from kdlab.report.tables import rebuild_reports

    rebuild_reports(args.study, baseline=args.baseline, figures=not args.no_figures)
    return 0


def cmd_sweep(args) -> int:
    from kdlab.experiments.sweep import run_sweep

    # run_sweep takes explicit seeds; 0 1 2 is the recipes' study.seeds default
    run_sweep(args.recipe, alphas=args.alphas, students=args.students, seeds=args.seeds,
              out_dir=args.out, data_dir=args.data_dir, overrides=A.recipe_overrides(args, False),
              n_images=args.n_images, method=args.method, grid=args.grid, k=args.k,
              steps=args.steps, progress=A.progress(args), **A.parallel_kwargs(args))
    return 0


def cmd_evaluate(args) -> int:
    from kdlab.compress import evaluate_model_file

    res = evaluate_model_file(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                              image_size=args.image_size, device=args.device,
                              allow_other_dataset=args.allow_other_dataset)
    print(json.dumps(res))
    return 0


def cmd_recipes(args) -> int:
    from kdlab.experiments.commands import recipes_listing

    print(recipes_listing())
    return 0


def cmd_models(args) -> int:
    from kdlab.models import list_models

    for name, desc in list_models():
        print(f"{name:<14} {desc}")
    return 0


def cmd_losses(args) -> int:
    from kdlab.lm.losses import loss_catalogue

    print(loss_catalogue())
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-teacher", help="train a model with plain cross-entropy (a teacher)")
    _recipe_args(p, "runs/<recipe name>")
    p.add_argument("--restart", action="store_true", help="ignore an unfinished run and start over")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="train one student from a recipe (teacher trained first if missing)")
    _recipe_args(p, "runs/<recipe name>/seed<k>")
    p.add_argument("--seed", type=A.SEED, help="override train.seed (default: the recipe's)")
    p.add_argument("--restart", action="store_true", help="ignore an unfinished run and start over")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("ablate", help="the paired multi-seed study of a recipe of any task (classification: "
                       "step-wise and leave-one-out ablation; lm: the recipe's study.methods)")
    _recipe_args(p, "runs/<recipe name>")
    A.add_seeds(p)
    A.add_parallel(p)
    p.add_argument("--mode", choices=["ladder", "loo", "both"],
                   help="ladder (add one component at a time), loo (leave one out) or both "
                        "(default: the recipe's study.methods)")
    p.add_argument("--no-teacher-cache", action="store_true",
                   help="run the teacher live for every student (same results, slower; docs/speed.md)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("demo", help="the main job on the embedded digits data: teacher + five-method study")
    A.add_out(p, "runs/digits-full")
    A.add_seeds(p)
    A.add_set(p, "the digits/full recipe")
    A.add_device(p, recipe=True)
    p.add_argument("--no-robustness", action="store_true", help="skip the corruption evaluation")
    p.add_argument("--no-explain", action="store_true",
                   help="skip where-the-students-look and the findings page")
    A.add_quiet(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explain-study", help="where a study's students look: alignment with the teacher per method")
    p.add_argument("study", help="study folder (runs/<name>) of a finished `kdlab ablate`")
    p.add_argument("--teacher", help="teacher checkpoint (default: the one the runs' recipe names)")
    p.add_argument("--n-images", type=A.POSITIVE, default=200, help="test images explained (default 200)")
    p.add_argument("--method", choices=["saliency", "ig", "gradcam"], default="ig",
                   help="attribution method (default ig)")
    p.add_argument("--grid", type=A.POSITIVE, nargs=2, metavar=("ROWS", "COLS"),
                   help="grid of image parts (default 4 4 on 8x8 images, 7 7 on 28x28)")
    p.add_argument("--k", type=A.POSITIVE, help="teacher's top-k parts of the focus metric")
    p.add_argument("--steps", type=A.POSITIVE, default=16, help="Integrated-Gradients steps (default 16)")
    A.add_data_dir(p)
    A.add_device(p)
    p.set_defaults(func=cmd_explain_study)

    p = sub.add_parser("findings", help="the findings page: what each component buys, with p-values")
    p.add_argument("studies", nargs="+", help="study folders (each a finished `kdlab ablate`)")
    A.add_out(p, "the first study's report folder: the page is <DIR>/findings.md; give --out docs to "
                 "replace the project's docs/findings.md")
    p.set_defaults(func=cmd_findings)

    p = sub.add_parser("report", help="rebuild a study's tables and figures from its runs (no training)")
    p.add_argument("study", help="study folder")
    p.add_argument("--baseline", help="method the paired tests compare to (default: the table's)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="explanation sweep: KD strength alpha x student size vs one teacher")
    _recipe_args(p, "runs/<recipe name>-sweep", nargs="?")
    p.set_defaults(recipe="digits/kd")
    A.add_seeds(p)
    A.add_parallel(p)
    p.add_argument("--alphas", type=A.FRACTION, nargs="+", default=[0.0, 0.5, 0.9], metavar="A",
                   help="weights of the KD term: (1-alpha)*CE + alpha*KD (0 = no KD; default 0 0.5 0.9)")
    p.add_argument("--students", nargs="+", default=["cnn_tiny", "cnn_small", "cnn_medium"],
                   metavar="MODEL", help="student model names (default cnn_tiny cnn_small cnn_medium)")
    p.add_argument("--n-images", type=A.POSITIVE, default=256, help="test images explained (default 256)")
    p.add_argument("--method", choices=["saliency", "ig", "gradcam"], default="ig",
                   help="attribution method (default ig)")
    p.add_argument("--grid", type=A.POSITIVE, nargs=2, default=[4, 4], metavar=("ROWS", "COLS"),
                   help="grid of image parts compared (default 4 4)")
    p.add_argument("--k", type=A.POSITIVE, default=5, help="teacher's top-k parts of the focus metric (default 5)")
    p.add_argument("--steps", type=A.POSITIVE, default=32, help="Integrated-Gradients steps (default 32)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a split")
    p.add_argument("checkpoint", help="model file: a checkpoint (best.pt, pruned or quantized) or an ONNX "
                   "model (fp32 or int8; give --dataset)")
    p.add_argument("--dataset", help="data set name, imagefolder (with --data-dir DIR --image-size H W), "
                   "or a module:function factory (default: the checkpoint's)")
    A.add_data_dir(p)
    p.add_argument("--image-size", type=A.POSITIVE, nargs=2, metavar=("H", "W"), help="imagefolder: image size")
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="which split (default test)")
    p.add_argument("--allow-other-dataset", action="store_true",
                   help="evaluate a checkpoint on a data set other than the one it was trained on")
    A.add_device(p)
    p.set_defaults(func=cmd_evaluate)

    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=cmd_recipes)
    sub.add_parser("models", help="list model names").set_defaults(func=cmd_models)
    sub.add_parser("losses", help="list loss terms").set_defaults(func=cmd_losses)
