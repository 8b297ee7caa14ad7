"""The workflows behind the CLI commands: each ``kdlab`` command function parses its arguments and
calls one function here (or one library function elsewhere), so what a command does can be called
from Python as well (``tests/test_architecture.py`` holds the CLI to one library call per command).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _summary(res: dict, metrics=()) -> str:
    """The one-line JSON summary of a run: its accuracies (or, for another task, every validation
    and test number), best epoch and epochs run. ``metrics``: the task's metrics; a value equal to
    a metric's ``undefined`` marker (COCOeval's −1 for an AP size with no object) is shown as
    ``"n/a"``, and a second line gives the footnote."""
    keys = ["val_acc", "test_acc"] if "test_acc" in res else [
        k for k, v in res.items() if k.startswith(("val_", "test_")) and isinstance(v, (int, float))]
    marks = {m.name: m for m in metrics if m.undefined is not None}
    out, notes = {}, {}
    for k in [*keys, "best_epoch", "epochs_run"]:
        if k not in res:
            continue
        m = marks.get(k.split("_", 1)[1]) if k.startswith(("val_", "test_")) else None
        if m is not None and m.is_undefined(res[k]):
            out[k] = "n/a"
            notes.setdefault(m.undefined_note or "undefined", []).append(m.title)
        else:
            out[k] = res[k]
    line = json.dumps(out)
    for note, titles in notes.items():
        line += f"\nn/a ({', '.join(dict.fromkeys(titles))}): {note}"
    return line


# -- training one recipe -------------------------------------------------------------------------
def train_teacher_command(ref, overrides, *, out=None, progress=True, restart=False, log=print) -> dict:
    """`kdlab train-teacher`: train ``ref`` with its own loss into ``out`` (default
    ``runs/<recipe name>``)."""
    from kdlab.train.recipe import load_recipe
    from kdlab.train.build import train
    from kdlab.train.callbacks import Announce

    recipe = load_recipe(ref, overrides)
    out = Path(out or f"runs/{recipe.name}")
    if recipe.task != "classification":  # a task plug-in (kdlab.tasks) trains its own recipes
        return _task_run(recipe, out, method="teacher", progress=progress, restart=restart, log=log,
                         header=f"training {recipe.student.model} ({recipe.task}) on {recipe.data.name} -> {out}")
    # the header prints when training starts: a refused input prints only its one error line
    header = Announce(f"training {recipe.student.model} on {recipe.data.name} -> {out}", log)
    res = train(recipe, out, progress=progress, resume=not restart, method="teacher", callbacks=[header])
    header.say()  # a finished run that was reused
    log(_summary(res))
    log(f"checkpoint: {out / 'best.pt'}")
    return res


def distill_command(ref, overrides, *, out=None, seed=None, data_dir=None, progress=True, restart=False,
                    log=print) -> dict:
    """`kdlab distill`: one student of ``ref`` (its teacher trained first when missing) into
    ``out`` (default ``runs/<recipe name>/seed<k>``)."""
    from kdlab.train.recipe import load_recipe
    from kdlab.train.build import check_can_train, ensure_teachers, train
    from kdlab.train.callbacks import Announce

    recipe = load_recipe(ref, overrides)
    if seed is not None:
        recipe.train.seed = seed
    out = Path(out or f"runs/{recipe.name}/seed{recipe.train.seed}")
    check_can_train(recipe, out)  # the device and --out, before a teacher is trained
    if recipe.task != "classification":  # a task plug-in (kdlab.tasks): its teachers, then the run
        from kdlab.train.build import with_data_dir

        return _task_run(with_data_dir(recipe, data_dir), out, method=recipe.name, progress=progress,
                         restart=restart, log=log, data_dir=data_dir,
                         header=f"distilling {recipe.name} (task {recipe.task}): {recipe.student.model} -> {out}")
    ensure_teachers(recipe, data_dir=data_dir, progress=progress)
    teacher = recipe.teacher.model if recipe.teacher and recipe.needs_teacher() else "no teacher"
    header = Announce(f"distilling {recipe.name}: {recipe.student.model} <- {teacher} -> {out}", log)
    res = train(recipe, out, progress=progress, resume=not restart, method=recipe.name, callbacks=[header])
    if not header.said:  # a finished run: checked, then reused
        header.say()
        log("  (finished earlier: its checked result is reused; --restart trains it again)")
    log(_summary(res))
    log(f"checkpoint: {out / 'best.pt'}")
    return res


def _task_run(recipe, out: Path, *, method: str, progress: bool, restart: bool, log, header: str,
              data_dir=None) -> dict:
    """One run of a recipe whose ``task`` is a plug-in: the task's study preparation (its teachers)
    for this one recipe, then :meth:`kdlab.tasks.base.Task.train` into ``out``."""
    from kdlab.tasks import get_task

    task = get_task(recipe.task)
    ctx = task.prepare_study({method: recipe}, out.parent, data_dir=data_dir, progress=progress, log=log)
    log(header)
    res = task.train(recipe, out, context=ctx, method=method, progress=progress, resume=not restart)
    log(_summary(res, task.metrics))
    log(f"checkpoint: {out / 'best.pt'}")
    return res


# -- the demo --------------------------------------------------------------------------------------
def demo(*, out=None, seeds=None, overrides=None, device="auto", robustness: bool = True,
         explain: bool = True, progress: bool = True, log=print) -> dict:
    """`kdlab demo`: the digits/full ladder (teacher trained on the way), then the students'
    robustness, where they look, and the findings page in the study's report folder."""
    from kdlab.experiments.study import run_ablation
    from kdlab.core.device import resolve_device

    report = run_ablation("digits/full", out_dir=out, seeds=seeds, mode="ladder", overrides=overrides,
                          progress=progress, log=log)
    study = Path(report["out_dir"]).parent
    dev = str(resolve_device(device))
    if robustness:
        from kdlab.experiments.robustness import study_robustness

        log("\nrobustness of the five methods (15 standard + 4 extra corruptions x 5 severities, seed 0; "
            "mCE over the 15):")
        study_robustness(study, device=dev, progress=progress)
    if explain:
        from kdlab.experiments.findings import write_findings
        from kdlab.experiments.study_explain import explain_study

        log("\nwhere the students look (attention rank alignment, top-k focus, logit agreement):")
        explain_study(study, device=dev, progress=progress)
        write_findings([study], out=study / "report" / "findings.md", command="kdlab demo")
    return report


def explain_study_command(study, *, device="auto", **kw) -> dict:
    """`kdlab explain-study`: :func:`kdlab.experiments.study_explain.explain_study` on ``device``
    (``auto``: CUDA when available)."""
    from kdlab.experiments.study_explain import explain_study
    from kdlab.core.device import resolve_device

    return explain_study(study, device=str(resolve_device(device)), **kw)


# -- listings --------------------------------------------------------------------------------------
def recipe_lines(names, load) -> list[str]:
    """``"  <name>  <description>"`` for each recipe name, its description read by ``load(name)``;
    a recipe that fails to load reads ``INVALID: <error>`` (a broken shipped recipe should be
    visible, not hidden)."""
    lines = []
    for name in names:
        try:
            desc = load(name).description
        except Exception as e:
            desc = f"INVALID: {e}"
        lines.append(f"  {name:<30} {desc}")
    return lines


def recipes_listing() -> str:
    """`kdlab recipes`: every shipped recipe with its description, by kind."""
    from kdlab.core.config import list_recipes
    from kdlab.train.recipe import load_recipe
    from kdlab.experiments.paradigms.spec import list_paradigm_recipes, load_paradigm
    from kdlab.lm.recipe import list_lm_recipes

    lines = ["training recipes (kdlab train-teacher / distill / ablate / compare):"]
    lines += recipe_lines(list_recipes(), load_recipe)
    lines.append("paradigm recipes (kdlab paradigm / compare):")
    lines += recipe_lines(list_paradigm_recipes(), load_paradigm)
    lines.append("language-model recipes (kdlab ablate / kdlab lm ...):")
    lines += [f"  {name}" for name in list_lm_recipes()]
    from kdlab.tasks.diffusion_recipe import list_diffusion_recipes, load_diffusion_recipe

    lines.append("diffusion recipes (kdlab diffusion train / study):")
    lines += recipe_lines(list_diffusion_recipes(), load_diffusion_recipe)
    return "\n".join(lines)


def methods_listing() -> str:
    """`kdlab methods`: the loss terms and paradigms with their references."""
    from kdlab.distill.losses import LOSSES
    from kdlab.experiments.paradigms import list_paradigms

    lines = ["loss terms (use in a recipe's loss: list; `kdlab compare --all digits` runs them all):"]
    for e in LOSSES.entries():
        ref = f"  [{e.reference}]" if e.reference else ""
        lines.append(f"  {e.name:<9} {e.description}{ref}")
    lines.append("paradigms (`kdlab paradigm NAME RECIPE`):")
    lines += [f"  {name:<9} {desc}  [{ref}]" for name, desc, ref in list_paradigms()]
    return "\n".join(lines)


def paradigm_command(paradigm, recipe, overrides, *, seed=None, out=None, data_dir=None,
                     progress=True, log=print) -> Optional[dict]:
    """`kdlab paradigm NAME RECIPE` (a normal recipe) or `kdlab paradigm PARADIGM_RECIPE`."""
    from kdlab.experiments.paradigms.runs import run_paradigm
    from kdlab.experiments.paradigms.spec import paradigm_spec

    spec = paradigm_spec(paradigm, recipe, overrides, seed)
    r = spec.recipe
    out = Path(out or f"runs/{r.name}-{spec.name}/seed{r.train.seed}")
    res = run_paradigm(spec, out, progress=progress, data_dir=data_dir)
    log(f"results: {out}")
    return res


# -- robustness and explanations --------------------------------------------------------------------
def robustness_command(checkpoints, *, study=None, out=None, corruptions="all", device="auto",
                       progress=True, log=print, **kw):
    """`kdlab robustness CKPT ...` (tables and heat map of those checkpoints) or `--study DIR`
    (every method and seed of a finished study, into its report)."""
    if study:
        if checkpoints or out:
            raise ValueError("--study evaluates the study's own checkpoints and writes into its "
                             "report folder; drop the CKPT arguments and --out")
        from kdlab.data.corruptions import parse_corruptions
        from kdlab.experiments.robustness import study_robustness
        from kdlab.core.device import resolve_device

        kw = {k: v for k, v in kw.items() if k not in ("names", "reference", "dataset", "cifar_c_dir")}
        return study_robustness(study, corruptions=parse_corruptions(corruptions),
                                device=str(resolve_device(device)), progress=progress, **kw)
    from kdlab.experiments.robustness import checkpoints_robustness

    res, written = checkpoints_robustness(checkpoints, corruptions=corruptions, device=device, out_dir=out,
                                          progress=progress, **kw)
    log(res.markdown())
    log("wrote " + ", ".join(str(p) for p in written.values()))
    return res


def explain_command(teacher, student, *, out=None, log=print, **kw) -> list:
    """`kdlab explain`: where a student looks compared with its teacher; writes and prints the
    table (``kw``: :func:`kdlab.evaluate.explain_report.explain_checkpoints`' options)."""
    from kdlab.evaluate.explain_report import explain_checkpoints, markdown

    out = Path(out or "runs/explain")
    rows = explain_checkpoints(teacher, student, out_dir=out, **kw)
    log(markdown(rows, n_images=rows[0]["n_images"] if rows else None))
    log(f"\nwrote {out / 'explain.csv'}, explain.json, explain.md, per_image.csv, "
        f"overlays.png{', sweep.png' if rows and all('alpha' in r for r in rows) else ''}")
    return rows


# -- language models ----------------------------------------------------------------------------------
def lm_out(recipe, out) -> Path:
    return Path(out) if out else Path("runs") / "lm" / recipe.name.replace("/", "_")


def lm_train_teacher(ref, overrides, *, out=None, progress=False) -> Path:
    """`kdlab lm train-teacher`: train (or resume) an LM recipe's teacher."""
    from kdlab.lm.recipe import load_lm_recipe
    from kdlab.lm.runs import train_teacher

    r = load_lm_recipe(ref, overrides)
    if r.kind == "arithmetic":
        raise ValueError("the arithmetic teacher is trained by `kdlab lm ablate lm/arithmetic`")
    from kdlab.tasks import get_task

    get_task("lm").check_study({"teacher": r})  # the corpus, a given checkpoint: before anything is written
    return train_teacher(r, lm_out(r, out), progress=progress)


def lm_distill(ref, overrides, *, out=None, method=None, seed=0, progress=False) -> dict:
    """`kdlab lm distill`: one student (a study method, or the recipe's distill section)."""
    from kdlab.lm.recipe import load_lm_recipe
    from kdlab.lm.runs import distill_run

    if method:  # a study method's own keys win over distill.*: refuse an override it would ignore
        own = load_lm_recipe(ref).study.methods.get(method, {})
        for ov in overrides or []:
            key = ov.split("=", 1)[0].strip()
            top = key.split(".")[1] if key.startswith("distill.") else None
            if top in own:
                raise ValueError(f"--set {key}: study method {method!r} sets distill.{top} itself, so the override "
                                 f"would be ignored; set study.methods.{method}.{key[len('distill.'):]}=... instead")
    r = load_lm_recipe(ref, overrides)
    if r.kind == "arithmetic":
        raise ValueError("arithmetic students are trained by `kdlab lm ablate lm/arithmetic`")
    rr = r.method(method) if method else r
    from kdlab.tasks import get_task

    get_task("lm").check_study({"distill": rr})  # the corpus, a given checkpoint: before anything is written
    row = distill_run(rr, lm_out(r, out), seed=seed, method=method or "distill", progress=progress)
    return {k: v for k, v in row.items() if k != "counts"}


# -- the step benchmark --------------------------------------------------------------------------------
def bench_out(args) -> str:
    """`kdlab bench`'s output folder: ``--out``, else ``runs/bench-accuracy`` (``--accuracy``) or
    ``runs/bench-study`` (``--study``)."""
    return args.out or ("runs/bench-accuracy" if args.accuracy else "runs/bench-study")


#: the step benchmark's options (dest -> flag): refused with --study or --accuracy, which ignore them
#: (--accuracy takes --teacher and --student); given when not None (False for a switch)
STEP_FLAGS = {"teacher": "--teacher", "student": "--student", "batch_size": "--batch-size", "steps": "--steps",
              "repeats": "--repeats", "image_size": "--image-size", "channels": "--channels",
              "num_classes": "--num-classes", "layers": "--layers", "mask_steps": "--mask-steps", "amp": "--amp",
              "channels_last": "--channels-last", "compile": "--compile", "variants": "--variants",
              "against": "--against", "json": "--json"}
#: what --against ignores of them (it times its own 32x32 CIFAR-shaped data, KD only)
NOT_AGAINST = ("image_size", "channels", "num_classes", "layers", "mask_steps")


def check_bench_modes(args) -> None:
    """Refuse, in one line naming them, the options the chosen `kdlab bench` mode would ignore, an
    empty --study (an empty --out is refused by its argparse type, ``kdlab.cli.args.folder``);
    then fill the step options not given with :func:`check_steps`'s
    defaults."""
    import inspect

    from kdlab.experiments.bench import check_steps

    if args.study is not None and not args.study.strip():
        raise ValueError("--study: give a study recipe (a shipped name such as digits/full, or a path); got ''")
    given = [dest for dest in STEP_FLAGS if getattr(args, dest, None) not in (None, False)]
    mode, ignored = None, []
    if args.study is not None:
        mode, ignored = "--study", given
    elif args.accuracy:
        mode, ignored = "--accuracy", [d for d in given if d not in ("teacher", "student")]
    elif args.against is not None:
        mode, ignored = "--against", [d for d in given if d in NOT_AGAINST]
    if ignored:
        flags = [STEP_FLAGS[d] for d in ignored]
        raise ValueError(f"{', '.join(flags)} {'applies' if len(flags) == 1 else 'apply'} to the step benchmark "
                         f"only; {mode} would ignore {'it' if len(flags) == 1 else 'them'}: drop "
                         f"{'it' if len(flags) == 1 else 'them'} (see `kdlab bench --help`)")
    defaults = {k: v.default for k, v in inspect.signature(check_steps).parameters.items()}
    for dest in STEP_FLAGS:
        if getattr(args, dest, None) is None and dest in defaults and dest != "variants":  # (its own default)
            value = defaults[dest]
            setattr(args, dest, ",".join(value) if dest == "layers" else value)


def bench_interrupted(args) -> str:
    """What to do after `kdlab bench` was interrupted: its timings do not resume (a re-run refuses
    the folder that now holds runs), so a new --out or the old one deleted; the step benchmark
    writes nothing before it ends."""
    if args.accuracy:
        return f"the accuracy check does not resume: delete {Path(bench_out(args)) / 'runs'} or give a new --out"
    if args.study:
        return f"a timed study does not resume: give a new --out (or delete {bench_out(args)} if it was made)"
    return "nothing was written; re-run the same command to time it again"


def bench_command(args, overrides: list) -> int:
    """`kdlab bench`: the step benchmark, or where a study's time goes (``args.study``); ``args``:
    the command's options, ``overrides``: its ``--set`` values."""
    import torch

    from kdlab.core.io import check_out_file, write_json
    from kdlab.experiments.bench import bench_steps, bench_study, check_steps, format_table

    check_bench_modes(args)
    if args.threads:
        from kdlab.core.threads import pin_threads

        pin_threads(args.threads)
    if args.epochs != 3 and not args.accuracy:
        raise ValueError("--epochs applies to --accuracy only (a --study takes --set train.epochs=N)")
    if args.accuracy:
        if args.study or args.mode or args.mask_reuse or args.compare_cache or args.teacher_set or args.data_dir:
            raise ValueError("--accuracy takes --teacher, --student, --epochs, --synthetic-cifar, --seeds, --out, "
                             "--set and --device; drop --study, --mode, --mask-reuse, --compare-cache, "
                             "--teacher-set and --data-dir")
        from kdlab.experiments.bench_accuracy import accuracy_check

        n = args.synthetic_cifar or 2560
        accuracy_check(bench_out(args), seeds=args.seeds or (0, 1, 2), epochs=args.epochs,
                       data="synthetic" if args.synthetic_cifar else "mnist5k",
                       n_train=n, n_test=max(10, n // 5), teacher=args.teacher, student=args.student,
                       device=args.device if args.device_given else "cpu", extra=overrides)
        return 0
    if args.study:
        if args.synthetic_cifar is not None and args.data_dir:
            raise ValueError("--synthetic-cifar writes its own data to <out>/data; drop --data-dir (or "
                             "--synthetic-cifar to use the data in --data-dir)")
        bench_study(args.study, bench_out(args), seeds=args.seeds, overrides=list(overrides),
                    mode=args.mode, mask_reuse=args.mask_reuse.split(",") if args.mask_reuse is not None else None,
                    compare_cache=args.compare_cache, teacher_overrides=list(args.teacher_set or []),
                    synthetic_cifar=args.synthetic_cifar)
        return 0
    if (args.device_given or args.overrides or args.seeds or args.mode or args.mask_reuse or args.compare_cache
            or args.synthetic_cifar or args.teacher_set or args.data_dir or args.out is not None):
        raise ValueError("--device, --set, --seeds, --out, --mode, --mask-reuse, --compare-cache, --synthetic-cifar, "
                         "--teacher-set and --data-dir apply to --study only (--device, --set, --seeds, --out and "
                         "--synthetic-cifar also to --accuracy); the step benchmark runs on CUDA when "
                         "available, else on the CPU")
    if args.json:
        check_out_file(args.json, "--json file")
    if args.against is not None:
        if args.against != "torchdistill":
            raise ValueError(f"--against takes torchdistill (got {args.against!r})")
        from kdlab.experiments.against import bench_against_torchdistill, check_against

        variants = (args.variants if args.variants is not None else "kd-live").split(",")
        check_against(teacher=args.teacher, student=args.student, amp=args.amp, variants=variants)
        print(f"bench: kdlab vs torchdistill, live KD {args.teacher} -> {args.student}, batch {args.batch_size}, "
              f"{args.steps} step{'s' if args.steps != 1 else ''}, torch {torch.__version__}, threads {torch.get_num_threads()}")
        rows = bench_against_torchdistill(teacher=args.teacher, student=args.student, batch_size=args.batch_size,
                                          steps=args.steps, repeats=args.repeats, amp=args.amp,
                                          channels_last=args.channels_last, compile_=args.compile,
                                          variants=variants)
        if args.json and rows:
            write_json(args.json, rows)
        return 0
    variants = (args.variants if args.variants is not None
                else "baseline,kd-live,kd-cached,full-live,full-cached").split(",")
    step_args = dict(teacher=args.teacher, student=args.student, batch_size=args.batch_size, steps=args.steps,
                     image_size=args.image_size, channels=args.channels, num_classes=args.num_classes,
                     layers=tuple(args.layers.split(",")), mask_steps=args.mask_steps, amp=args.amp,
                     channels_last=args.channels_last, compile_=args.compile, variants=variants,
                     repeats=args.repeats)
    check_steps(**step_args)  # refused before the header is printed
    print(f"bench: {args.teacher} -> {args.student}, batch {args.batch_size}, "
          f"{args.steps} step{'s' if args.steps != 1 else ''}, "
          f"synthetic {args.channels}x{args.image_size}x{args.image_size} data, IG steps {args.mask_steps}, "
          f"torch threads {torch.get_num_threads()}")
    rows = bench_steps(**step_args)
    print(format_table(rows, f"{args.teacher} -> {args.student}, batch {args.batch_size}, "
                             f"threads {torch.get_num_threads()}"))
    if args.json:
        write_json(args.json, rows)
    return 0




def lm_generate(checkpoint, prompt: str, *, max_new: int = 64, temperature: float = 0.0, top_k=None,
                seed: int = 0, kv_cache: bool = True) -> str:
    """`kdlab lm generate`: ``prompt`` continued by the LM in ``checkpoint`` (greedy at
    temperature 0, else sampled with ``seed``)."""
    import torch

    from kdlab.lm.generate import generate
    from kdlab.lm.runs import load_lm

    model, tok, _ = load_lm(checkpoint)
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("--prompt must not be empty")
    limit = getattr(model, "max_len", None)
    if limit is not None and len(ids) + max_new > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + --max-new {max_new} exceeds the model's "
                         f"max_len {limit}; shorten the prompt or lower --max-new")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (got {temperature}); 0 is greedy")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (got {top_k}); leave it out to sample from every token")
    gen = torch.Generator().manual_seed(seed)
    out, mask = generate(model, torch.tensor([ids]), max_new, greedy=temperature == 0,
                         temperature=temperature or 1.0, top_k=top_k, eos_id=tok.eos_id,
                         pad_id=tok.pad_id, use_cache=kv_cache, generator=gen)
    new = out[0, len(ids):][mask[0]].tolist()
    return prompt + tok.decode(new)
