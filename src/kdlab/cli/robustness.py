"""``kdlab robustness``: corruption robustness (CIFAR-10-C style) of any set of checkpoints,
or of every run of a finished study."""

from __future__ import annotations

from kdlab.cli import args as A


def register(sub) -> None:
    p = sub.add_parser(
        "robustness",
        help="accuracy under the 19 CIFAR-10-C corruptions x 5 severities; mCA, mCE, rel. mCE "
             "(detectors: mAP, mPC, rPC, mCE)",
        description="Evaluate checkpoints on the test set corrupted on the fly (CIFAR-10-C "
                    "settings, seeded) or on the published CIFAR-10-C files; write "
                    "robustness.csv/.json/.md and robustness_heatmap.png to --out. Detection "
                    "checkpoints and studies are scored by COCO mAP on their recipe's test images "
                    "(boxes unchanged): mPC, rPC = mPC / clean mAP, mCE with error 1 - mAP "
                    "(docs/detection.md).")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="model checkpoints (best.pt)")
    p.add_argument("--study", metavar="DIR",
                   help="a finished `kdlab ablate` folder: evaluate every method and seed, add "
                        "mCA / mCE columns to its table and write its corruption x method heat map")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="one name per checkpoint (default: from the checkpoint paths)")
    p.add_argument("--reference", metavar="NAME",
                   help="model that CE / mCE are relative to, normally the baseline student "
                        "(default: a model named 'baseline' if any, else the first)")
    p.add_argument("--dataset", help="data set name (default: the first checkpoint's)")
    A.add_data_dir(p)
    p.add_argument("--corruptions", nargs="+", default=["all"], metavar="C",
                   help="'all' (default), 'standard' (the 15), 'extra' (the 4) or names")
    p.add_argument("--severities", nargs="+", type=A.whole(1, 5), default=[1, 2, 3, 4, 5], metavar="S",
                   help="severities 1-5 (default all five)")
    p.add_argument("--seed", type=A.SEED, default=0, help="seed of the corruptions' random draws (default 0)")
    p.add_argument("--batch-size", type=A.POSITIVE, default=256, help="images per forward pass (default 256)")
    A.add_device(p)
    p.add_argument("--limit", type=A.POSITIVE, metavar="N",
                   help="use only the first N test images (quick looks)")
    p.add_argument("--cifar-c", metavar="DIR",
                   help="read the published CIFAR-10-C .npy files from DIR instead of "
                        "corrupting on the fly")
    A.add_out(p, "runs/robustness; --study writes into the study's report folder")
    A.add_quiet(p)
    p.set_defaults(func=cmd_robustness)


def cmd_robustness(args) -> int:
    from kdlab.experiments.commands import robustness_command

    robustness_command(args.checkpoints, study=args.study, out=args.out, corruptions=args.corruptions,
                       device=args.device, progress=A.progress(args), names=args.names,
                       reference=args.reference, dataset=args.dataset, data_dir=args.data_dir,
                       severities=args.severities, seed=args.seed, batch_size=args.batch_size,
                       limit=args.limit, cifar_c_dir=args.cifar_c)
    return 0
