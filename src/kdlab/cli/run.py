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


def _load(args):
    from kdlab.core.config import load_recipe

    return load_recipe(args.recipe, A.recipe_overrides(args))


def _summary(res: dict) -> str:
    return json.dumps({k: res[k] for k in ("val_acc", "test_acc", "best_epoch", "epochs_run")})


def cmd_train_teacher(args) -> int:
    from kdlab.train.build import train

    recipe = _load(args)
    out = Path(args.out or f"runs/{recipe.name}")
    print(f"training {recipe.student.model} on {recipe.data.name} -> {out}")
    res = train(recipe, out, progress=A.progress(args), resume=not args.restart, method="teacher")
    print(_summary(res))
    print(f"checkpoint: {out / 'best.pt'}")
    return 0


def cmd_distill(args) -> int:
    from kdlab.train.build import ensure_teachers, train

    recipe = _load(args)
    if args.seed is not None:
        recipe.train.seed = args.seed
    if recipe.task != "classification":  # detection, ...: the task plug-in runs it
        from kdlab.tasks.runs import run_task_recipe

        run_task_recipe(recipe, args.out, progress=A.progress(args), resume=not args.restart)
        return 0
    ensure_teachers(recipe, data_dir=args.data_dir, progress=A.progress(args))
    out = Path(args.out or f"runs/{recipe.name}/seed{recipe.train.seed}")
    teacher = recipe.teacher.model if recipe.teacher and recipe.needs_teacher() else "no teacher"
    print(f"distilling {recipe.name}: {recipe.student.model} <- {teacher} -> {out}")
    if (out / "result.json").exists() and not args.restart:
        print("  (finished earlier: its checked result is reused; --restart trains it again)")
    res = train(recipe, out, progress=A.progress(args), resume=not args.restart, method=recipe.name)
    print(_summary(res))
    print(f"checkpoint: {out / 'best.pt'}")
    return 0


def cmd_ablate(args) -> int:
    from kdlab.experiments.study import run_ablation

    run_ablation(args.recipe, out_dir=args.out, seeds=args.seeds, mode=args.mode,
                 data_dir=args.data_dir, overrides=A.recipe_overrides(args, False),
                 progress=A.progress(args), teacher_cache=not args.no_teacher_cache, **A.parallel_kwargs(args))
    return 0


def cmd_demo(args) -> int:
    from kdlab.train.runtime import resolve_device
    from kdlab.evaluate.robustness import study_robustness
    from kdlab.experiments.study import run_ablation

    report = run_ablation("digits/full", out_dir=args.out, seeds=args.seeds, mode="ladder",
                          overrides=A.recipe_overrides(args), progress=A.progress(args))
    if not args.no_robustness:
        print("\nrobustness of the five methods (15 standard + 4 extra corruptions x 5 severities, seed 0; "
              "mCE over the 15):")
        study_robustness(Path(report["out_dir"]).parent, device=str(resolve_device(args.device)),
                         progress=A.progress(args))
    study = Path(report["out_dir"]).parent
    if not args.no_explain:
        from kdlab.experiments.findings import write_findings
        from kdlab.experiments.study_explain import explain_study

        print("\nwhere the students look (attention rank alignment, top-k focus, logit agreement):")
        explain_study(study, device=str(resolve_device(args.device)))
        write_findings([study], out=study / "report" / "findings.md", command="kdlab demo")
    return 0


def cmd_explain_study(args) -> int:
    from kdlab.experiments.study_explain import explain_study
    from kdlab.train.runtime import resolve_device

    explain_study(args.study, teacher=args.teacher, n_images=args.n_images, method=args.method,
                  grid=args.grid, k=args.k, steps=args.steps, data_dir=args.data_dir,
                  device=str(resolve_device(args.device)))
    return 0


def cmd_findings(args) -> int:
    from kdlab.experiments.findings import write_findings

    write_findings(args.studies, out=Path(args.out or "docs") / "findings.md",
                   command="kdlab findings " + " ".join(args.studies))
    return 0


def cmd_report(args) -> int:
    from kdlab.report.tables import rebuild_report

    rebuild_report(args.study, baseline=args.baseline, figures=not args.no_figures)
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
    from kdlab.evaluate.accuracy import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                              image_size=args.image_size, device=args.device)
    print(json.dumps(res))
    return 0


def cmd_recipes(args) -> int:
    from kdlab.core.config import list_recipes, load_recipe

    from kdlab.experiments.paradigms.spec import list_paradigm_recipes, load_paradigm
    from kdlab.lm.recipe import list_lm_recipes

    print("training recipes (kdlab train-teacher / distill / ablate / compare):")
    for name in list_recipes():
        try:
            desc = load_recipe(name).description
        except Exception as e:  # a broken shipped recipe should be visible, not hidden
            desc = f"INVALID: {e}"
        print(f"  {name:<30} {desc}")
    print("paradigm recipes (kdlab paradigm / compare):")
    for name in list_paradigm_recipes():
        try:
            desc = load_paradigm(name).description
        except Exception as e:
            desc = f"INVALID: {e}"
        print(f"  {name:<30} {desc}")
    print("language-model recipes (kdlab lm ...):")
    for name in list_lm_recipes():
        print(f"  {name}")
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
    _recipe_args(p, "runs/<recipe name>")
    p.add_argument("--restart", action="store_true", help="ignore an unfinished run and start over")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="train one student from a recipe (teacher trained first if missing)")
    _recipe_args(p, "runs/<recipe name>/seed<k>")
    p.add_argument("--seed", type=int, help="override train.seed (default: the recipe's)")
    p.add_argument("--restart", action="store_true", help="ignore an unfinished run and start over")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("ablate", help="step-wise and leave-one-out ablation of a full recipe over seeds")
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
    p.add_argument("--n-images", type=int, default=200, help="test images explained (default 200)")
    p.add_argument("--method", choices=["saliency", "ig", "gradcam"], default="ig",
                   help="attribution method (default ig)")
    p.add_argument("--grid", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="grid of image parts (default 4 4 on 8x8 images, 7 7 on 28x28)")
    p.add_argument("--k", type=int, help="teacher's top-k parts of the focus metric")
    p.add_argument("--steps", type=int, default=16, help="Integrated-Gradients steps (default 16)")
    A.add_data_dir(p)
    A.add_device(p)
    p.set_defaults(func=cmd_explain_study)

    p = sub.add_parser("findings", help="the findings page: what each component buys, with p-values")
    p.add_argument("studies", nargs="+", help="study folders (each a finished `kdlab ablate`)")
    A.add_out(p, "docs (the page is <DIR>/findings.md)")
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
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.9], metavar="A",
                   help="weights of the KD term: (1-alpha)*CE + alpha*KD (0 = no KD; default 0 0.5 0.9)")
    p.add_argument("--students", nargs="+", default=["cnn_tiny", "cnn_small", "cnn_medium"],
                   metavar="MODEL", help="student model names (default cnn_tiny cnn_small cnn_medium)")
    p.add_argument("--n-images", type=int, default=256, help="test images explained (default 256)")
    p.add_argument("--method", choices=["saliency", "ig", "gradcam"], default="ig",
                   help="attribution method (default ig)")
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4], metavar=("ROWS", "COLS"),
                   help="grid of image parts compared (default 4 4)")
    p.add_argument("--k", type=int, default=5, help="teacher's top-k parts of the focus metric (default 5)")
    p.add_argument("--steps", type=int, default=32, help="Integrated-Gradients steps (default 32)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a split")
    p.add_argument("checkpoint", help="model checkpoint (best.pt)")
    p.add_argument("--dataset", help="data set name, imagefolder (with --data-dir DIR --image-size H W), "
                   "or a module:function factory (default: the checkpoint's)")
    A.add_data_dir(p)
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="imagefolder: image size")
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="which split (default test)")
    A.add_device(p)
    p.set_defaults(func=cmd_evaluate)

    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=cmd_recipes)
    sub.add_parser("models", help="list model names").set_defaults(func=cmd_models)
    sub.add_parser("losses", help="list loss terms").set_defaults(func=cmd_losses)
