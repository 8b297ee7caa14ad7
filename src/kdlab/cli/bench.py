"""`kdlab bench`: step throughput with and without the teacher cache, and study wall time."""

from __future__ import annotations

import json

from kdlab.cli import args as A


def cmd_bench(args) -> int:
    import torch

    from kdlab.experiments.bench import bench_steps, bench_study, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.study:
        out = args.out or "runs/bench-study"
        overrides = A.recipe_overrides(args)
        teacher_set = list(args.teacher_set or [])
        if args.synthetic_cifar is not None and args.synthetic_cifar < 10:
            raise ValueError(f"--synthetic-cifar needs at least 10 training images (got {args.synthetic_cifar})")
        if args.synthetic_cifar is not None and args.data_dir:
            raise ValueError("--synthetic-cifar writes its own data to <out>/data; drop --data-dir (or "
                             "--synthetic-cifar to use the data in --data-dir)")
        reuse = args.mask_reuse.split(",") if args.mask_reuse is not None else None
        if reuse is not None and (len(set(reuse)) != len(reuse) or not all(reuse)):
            raise ValueError(f"--mask-reuse takes per-view and/or per-image, each once (got {args.mask_reuse!r})")
        if args.synthetic_cifar:
            from pathlib import Path

            from kdlab.data.cifar_synthetic import write_synthetic_cifar

            data = Path(out) / "data"
            if not (data / "cifar-10-batches-py" / "test_batch").is_file():
                write_synthetic_cifar(data, args.synthetic_cifar, max(10, args.synthetic_cifar // 5))
                print(f"bench: generated CIFAR-format data ({args.synthetic_cifar} training images) in {data}")
            else:
                print(f"bench: using the generated CIFAR-format data already in {data}")
            # the generated data's teacher lives in the bench folder, never at the recipe's own path
            overrides = [f"data.data_dir={data}", f"teacher.checkpoint={Path(out) / 'teacher' / 'best.pt'}",
                         *overrides]
        bench_study(args.study, out, seeds=args.seeds, overrides=overrides, mode=args.mode,
                    mask_reuse=reuse, compare_cache=args.compare_cache, teacher_overrides=teacher_set)
        return 0
    if (args.device_given or args.overrides or args.seeds or args.mode or args.mask_reuse or args.compare_cache
            or args.synthetic_cifar or args.teacher_set or args.data_dir):
        raise ValueError("--device, --set, --seeds, --mode, --mask-reuse, --compare-cache, --synthetic-cifar, "
                         "--teacher-set and --data-dir apply to --study only; the step benchmark runs on "
                         "CUDA when available, else on the CPU")
    variants = args.variants.split(",")
    print(f"bench: {args.teacher} -> {args.student}, batch {args.batch_size}, {args.steps} steps, "
          f"synthetic {args.channels}x{args.image_size}x{args.image_size} data, IG steps {args.mask_steps}, "
          f"torch threads {torch.get_num_threads()}")
    rows = bench_steps(teacher=args.teacher, student=args.student, batch_size=args.batch_size,
                       steps=args.steps, image_size=args.image_size, channels=args.channels,
                       num_classes=args.num_classes, layers=tuple(args.layers.split(",")),
                       mask_steps=args.mask_steps, amp=args.amp, channels_last=args.channels_last,
                       compile_=args.compile, variants=variants,
                       repeats=args.repeats)
    print(format_table(rows, f"{args.teacher} -> {args.student}, batch {args.batch_size}, "
                             f"threads {torch.get_num_threads()}"))
    if args.json:
        from kdlab.core.io import write_json

        write_json(args.json, rows)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="images/s of baseline, KD and full-method steps with and without "
                                     "the teacher cache; or where a study's time goes (--study)")
    p.add_argument("--teacher", default="resnet56", help="teacher model name (default %(default)s)")
    p.add_argument("--student", default="resnet20", help="student model name (default %(default)s)")
    p.add_argument("--batch-size", type=A.POSITIVE, default=64, help="images per step (default %(default)s)")
    p.add_argument("--steps", type=A.POSITIVE, default=5, help="timed steps per variant and round (default %(default)s)")
    p.add_argument("--repeats", type=A.POSITIVE, default=3, help="rounds (variants take turns); median counts (default %(default)s)")
    p.add_argument("--image-size", type=A.POSITIVE, default=32, help="side of the synthetic images (default %(default)s)")
    p.add_argument("--channels", type=A.POSITIVE, default=3, help="channels of the synthetic images (default %(default)s)")
    p.add_argument("--num-classes", type=A.whole(2), default=10, help="classes of the synthetic labels (default %(default)s)")
    p.add_argument("--layers", default="layer3,layer3", help="student,teacher layer of the masked terms (default %(default)s)")
    p.add_argument("--mask-steps", type=A.POSITIVE, default=16, help="Integrated-Gradients steps (default %(default)s)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision (default %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--variants", default="baseline,kd-live,kd-cached,full-live,full-cached",
                   help="comma-separated steps to time (default %(default)s)")
    p.add_argument("--threads", type=A.COUNT, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", metavar="FILE", help="also write the rows to this JSON file")
    p.add_argument("--study", metavar="RECIPE",
                   help="instead: run this study (the ablation ladder) and report the seconds in student "
                        "steps, teacher forward passes and masks, ending with 'study/students: <ratio>'")
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
    A.add_out(p, "runs/bench-study; --study only")
    A.add_seeds(p)
    p.add_argument("--mode", choices=["ladder", "loo", "both"],
                   help="--study: which methods (default: the recipe's study.methods)")
    A.add_set(p, "the --study recipe")
    A.add_device(p, recipe=True)
    p.set_defaults(func=cmd_bench)
