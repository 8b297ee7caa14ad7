"""``kdlab robustness``: corruption robustness (CIFAR-10-C style) of any set of checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def register(sub) -> None:
    p = sub.add_parser(
        "robustness",
        help="accuracy under the 19 CIFAR-10-C corruptions x 5 severities; mCA, mCE, rel. mCE",
        description="Evaluate checkpoints on the test set corrupted on the fly (CIFAR-10-C "
                    "settings, seeded) or on the published CIFAR-10-C files; write "
                    "robustness.csv/.json/.md and robustness_heatmap.png to --out.")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="model checkpoints (best.pt)")
    p.add_argument("--study", metavar="DIR",
                   help="a finished `kdlab ablate` folder: evaluate every method and seed, add "
                        "mCA / mCE columns to its table and write its corruption x method heat map")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="one name per checkpoint (default: from the checkpoint paths)")
    p.add_argument("--reference", metavar="NAME",
                   help="model that CE / mCE are relative to, normally the baseline student "
                        "(default: a model named 'baseline' if any, else the first)")
    p.add_argument("--dataset", help="default: the first checkpoint's data set")
    p.add_argument("--data-dir", help="folder with the data set files (CIFAR pickles)")
    p.add_argument("--corruptions", nargs="+", default=["all"], metavar="C",
                   help="'all' (default), 'standard' (the 15), 'extra' (the 4) or names")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5], metavar="S")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions' random draws")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, metavar="N",
                   help="use only the first N test images (quick looks)")
    p.add_argument("--cifar-c", metavar="DIR",
                   help="read the published CIFAR-10-C .npy files from DIR instead of "
                        "corrupting on the fly")
    p.add_argument("--out", default="runs/robustness", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_robustness)


def default_names(paths: Sequence[str]) -> list[str]:
    """Names from checkpoint paths: the file's folder for ``best.pt``/``last.pt`` (else the file
    stem); longer path suffixes where that is ambiguous, then ``#i``."""
    parts = [Path(p).with_suffix("").parts for p in paths]

    def name(i: int, depth: int) -> str:
        ps = list(parts[i])
        if ps and ps[-1] in ("best", "last") and len(ps) > 1:
            ps = ps[:-1]
        return "/".join(ps[-depth:])

    names = [name(i, 1) for i in range(len(paths))]
    for depth in (2, 3, 4):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        names = [name(i, depth) if names[i] in dup else names[i] for i in range(len(paths))]
    return [f"{n} #{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def cmd_robustness(args) -> int:
    from kdlab.core import checkpoint as ckpt_mod
    from kdlab import data as data_mod
    from kdlab.data.corruptions import parse_corruptions
    from kdlab.data.splits import TensorSet
    from kdlab.evaluate.robustness import evaluate_robustness

    if args.study:
        from kdlab.evaluate.robustness import study_robustness

        study_robustness(args.study, corruptions=parse_corruptions(args.corruptions),
                         severities=args.severities, seed=args.seed, batch_size=args.batch_size,
                         device=args.device, data_dir=args.data_dir, limit=args.limit,
                         progress=not args.no_progress)
        return 0
    paths = list(args.checkpoints)
    if not paths:
        raise ValueError("give checkpoints to evaluate, or --study DIR")
    names = list(args.names) if args.names else default_names(paths)
    if len(names) != len(paths):
        raise ValueError(f"give --names once per checkpoint ({len(paths)}), got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--names must be distinct, got {names}")
    corruptions = parse_corruptions(args.corruptions)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")

    models, cks = {}, []
    for name, path in zip(names, paths):
        model, ck = ckpt_mod.load_model(path, args.device)
        models[name] = model
        cks.append(ck)
    dataset = args.dataset or cks[0].get("dataset") or "digits"
    splits = data_mod.load_dataset(dataset, args.data_dir)
    info = splits.info
    for path, ck in zip(paths, cks):
        if ck.get("num_classes") != info.num_classes or ck.get("in_channels") != info.in_channels:
            raise ValueError(
                f"{path} is a {ck.get('num_classes')}-class, {ck.get('in_channels')}-channel "
                f"model but {info.name} has {info.num_classes} classes, {info.in_channels} "
                f"channel(s); pass the matching --dataset")
    test = splits.test
    if args.limit is not None:
        test = TensorSet(test.x[:args.limit], test.y[:args.limit])
    if args.cifar_c and info.name.lower().replace("-", "") != "cifar10":
        raise ValueError(f"--cifar-c holds CIFAR-10-C; the checkpoints are {info.name} models "
                         f"(drop --cifar-c to corrupt {info.name} on the fly)")
    reference = args.reference or ("baseline" if "baseline" in models else names[0])
    if reference not in models:
        raise ValueError(f"--reference {reference!r} is not one of the names: {', '.join(names)}")

    res = evaluate_robustness(
        models, test, info, corruptions, args.severities, args.seed, args.batch_size,
        args.device, reference=reference, cifar_c_dir=args.cifar_c, out_dir=None,
        progress=not args.no_progress)
    res.settings.update({"checkpoints": dict(zip(names, map(str, paths))), "limit": args.limit,
                         "torch": torch.__version__})
    written = res.write(args.out)
    print(res.markdown())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
