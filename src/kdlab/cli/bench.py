"""`kdlab bench`: step throughput with and without the teacher cache, and study wall time."""

from __future__ import annotations

from kdlab.cli import args as A


def cmd_bench(args) -> int:
    from kdlab.experiments.commands import bench_command

    return bench_command(args, A.recipe_overrides(args, with_data_dir=False) if args.accuracy else
                         A.recipe_overrides(args) if args.study else [])


def on_interrupt(args) -> str:
    """What to do after a Ctrl-C (timings never resume: a finished run would be reused, not timed)."""
    from kdlab.experiments.commands import bench_interrupted

    return bench_interrupted(args)


def register(sub) -> None:
    p = sub.add_parser("bench", help="images/s of baseline, KD and full-method steps with and without "
                                     "the teacher cache; or where a study's time goes (--study)")
    p.add_argument("--teacher", help="teacher model name (default resnet56)")
    p.add_argument("--student", help="student model name (default resnet20)")
    p.add_argument("--batch-size", type=A.POSITIVE, help="images per step (default 64)")
    p.add_argument("--steps", type=A.POSITIVE, help="timed steps per variant and round (default 5)")
    p.add_argument("--repeats", type=A.POSITIVE, help="rounds (variants take turns); median counts (default 3)")
    p.add_argument("--image-size", type=A.POSITIVE, help="side of the synthetic images (default 32)")
    p.add_argument("--channels", type=A.POSITIVE, help="channels of the synthetic images (default 3)")
    p.add_argument("--num-classes", type=A.whole(2), help="classes of the synthetic labels (default 10)")
    p.add_argument("--layers", help="student,teacher layer of the masked terms (default layer3,layer3)")
    p.add_argument("--mask-steps", type=A.POSITIVE, help="Integrated-Gradients steps (default 16)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (default none)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--variants", default=None,
                   help="comma-separated steps to time (default baseline,kd-live,kd-cached,full-live,full-cached; "
                        "with --against: kd-live); a suffix -asloaded (teacher unfolded), -default (today's "
                        "defaults) or -fast (bf16, channels-last, teacher folded) sets a variant's own settings")
    p.add_argument("--threads", type=A.COUNT, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--against", metavar="TOOL",
                   help="instead: time kdlab's live KD step next to TOOL's on the same generated data "
                        "(torchdistill; needs torchdistill and torchvision installed, else skipped)")
    p.add_argument("--json", metavar="FILE", help="also write the rows to this JSON file")
    p.add_argument("--study", metavar="RECIPE",
                   help="instead: run this study (the ablation ladder) and report the seconds in student "
                        "steps, teacher forward passes and masks, ending with 'study/students: <ratio>'")
    p.add_argument("--accuracy", action="store_true",
                   help="instead: train live KD --teacher -> --student for --epochs on mnist5k (or with "
                        "--synthetic-cifar N on N generated CIFAR-format images) with today's defaults "
                        "and with the fast settings (bf16, channels-last, fast_teacher), --seeds (default "
                        "0 1 2), and print test accuracy per seed and the paired difference's t-interval")
    p.add_argument("--epochs", type=A.POSITIVE, default=3, help="--accuracy: training epochs (default %(default)s)")
    p.add_argument("--mask-reuse", metavar="MODES",
                   help="--study: run the study once per mask.reuse mode, e.g. per-view,per-image "
                        "(default: the recipe's own, once)")
    p.add_argument("--compare-cache", action="store_true",
                   help="--study: also run each study with the teacher cache off; report the speed-up "
                        "and whether the results are identical")
    p.add_argument("--synthetic-cifar", type=A.whole(10), metavar="N",
                   help="--study: generate N CIFAR-format training images (kdlab.data.cifar_synthetic) "
                        "in <out>/data, read them as the recipe's data and keep the teacher in <out>/teacher")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--study: override a value of the teacher's recipe when the teacher is trained "
                        "first, e.g. --teacher-set student.model=resnet56 (repeatable)")
    A.add_data_dir(p)
    A.add_out(p, "runs/bench-study, with --accuracy runs/bench-accuracy; --study and --accuracy only")
    A.add_seeds(p)
    p.add_argument("--mode", choices=["ladder", "loo", "both"],
                   help="--study: which methods (default: the recipe's study.methods)")
    A.add_set(p, "the --study recipe")
    A.add_device(p, recipe=True)
    p.set_defaults(func=cmd_bench, on_interrupt=on_interrupt)
