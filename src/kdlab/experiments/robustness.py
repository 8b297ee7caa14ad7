"""Corruption robustness of a set of checkpoints (``kdlab robustness CKPT ...``): load them, check
they fit one data set, evaluate them under the corruptions (:mod:`kdlab.evaluate.robustness`)
and write the tables and the heat map."""

from __future__ import annotations

from kdlab.core.checkpoint import check_fits

from pathlib import Path
from typing import Sequence


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


def checkpoints_robustness(paths: Sequence[str], *, names: Sequence[str] | None = None,
                           reference: str | None = None, dataset: str | None = None, data_dir=None,
                           corruptions="all", severities=(1, 2, 3, 4, 5), seed: int = 0,
                           batch_size: int = 256, device="auto", limit: int | None = None,
                           cifar_c_dir=None, out_dir=None, progress: bool = True):
    """Evaluate the checkpoints ``paths`` on the test set corrupted on the fly (CIFAR-10-C
    settings, seeded by ``seed``) or, with ``cifar_c_dir``, on the published CIFAR-10-C files.

    ``names`` default to :func:`default_names`; CE / mCE are relative to ``reference`` (default:
    a model named ``baseline`` if any, else the first); ``dataset`` defaults to the first
    checkpoint's; ``limit`` keeps the first N test images. Writes robustness.csv/.json/.md and
    robustness_heatmap.png to ``out_dir`` (default ``runs/robustness``). Returns
    ``(result, written)``: the :class:`kdlab.evaluate.robustness` result and the paths written.
    """
    import torch

    from kdlab.core.checkpoint import load_model
    from kdlab.data import load_dataset
    from kdlab.data.corruptions import parse_corruptions
    from kdlab.data.splits import TensorSet
    from kdlab.train.runtime import resolve_device
    from kdlab.evaluate.robustness import evaluate_robustness

    paths = list(paths)
    if not paths:
        raise ValueError("give checkpoints to evaluate, or --study DIR")
    names = list(names) if names else default_names(paths)
    from kdlab.core.io import check_out_dir

    check_out_dir(out_dir or "runs/robustness", "--out folder")  # before the evaluation
    if len(names) != len(paths):
        raise ValueError(f"give --names once per checkpoint ({len(paths)}), got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--names must be distinct, got {names}")
    corruptions = parse_corruptions(corruptions)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    device = str(resolve_device(device))

    models, cks = {}, []
    for name, path in zip(names, paths):
        model, ck = load_model(path, device)
        models[name] = model
        cks.append(ck)
    splits = load_dataset(dataset or cks[0].get("dataset") or "digits", data_dir)
    info = splits.info
    for path, ck in zip(paths, cks):
        check_fits(ck, info, str(path))
    test = splits.test
    if limit is not None:
        test = TensorSet(test.x[:limit], test.y[:limit])
    if cifar_c_dir and info.name.lower().replace("-", "") != "cifar10":
        raise ValueError(f"--cifar-c holds CIFAR-10-C; the checkpoints are {info.name} models "
                         f"(drop --cifar-c to corrupt {info.name} on the fly)")
    reference = reference or ("baseline" if "baseline" in models else names[0])
    if reference not in models:
        raise ValueError(f"--reference {reference!r} is not one of the names: {', '.join(names)}")

    res = evaluate_robustness(
        models, test, info, corruptions, severities, seed, batch_size, device,
        reference=reference, cifar_c_dir=cifar_c_dir, out_dir=None, progress=progress)
    res.settings.update({"checkpoints": dict(zip(names, map(str, paths))), "limit": limit,
                         "torch": torch.__version__})
    written = res.write(out_dir or "runs/robustness")
    return res, written
