"""Measurements behind docs/masks.md: IG completeness vs steps, reused-vs-exact mask agreement,
gradient × activation vs IG agreement, and batched vs step-by-step IG speed.

Run ``python -m kdlab.experiments.mask_report {completeness,agreement,speed} [options]``; each prints
a Markdown table. Keep ``OMP_NUM_THREADS`` fixed when timing.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kdlab.core.io import read_json
from kdlab.distill.mask_reuse import EpochViews, map_masks, mask_agreement
from kdlab.distill.masks import RULES, completeness_table, importance_maps, layer_attribution, to_mask


def _md(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def load_recipe_teacher(recipe_name: str, overrides=()):
    """(recipe, splits, teacher in eval mode) of a recipe whose teacher checkpoint exists."""
    from kdlab.train.recipe import load_recipe
    from kdlab.data import load_dataset
    from kdlab.train.build import load_teacher

    r = load_recipe(recipe_name, list(overrides))
    d = r.data
    splits = load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction,
                          label_fraction=d.label_fraction, seed=r.train.seed)
    teacher = load_teacher(r, splits.info, "cpu").eval()
    return r, splits, teacher


def completeness_rows(teacher, x, y, layer, steps=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    """:func:`kdlab.distill.masks.completeness_table` rows with the layer name added."""
    return [dict(r, layer=layer) for r in completeness_table(teacher, x, y, layer, steps, RULES)]


def agreement_rows(teacher, loader, layer: str, cfg: dict, epochs=(0, 1), center=None) -> list[dict]:
    """Agreement with the exact per-view masks (IG as configured) over the views ``loader``
    yields in ``epochs``, for masks of ``kind: binary`` (``iou``) and ``kind: soft``
    (``spearman``); means over samples:

    * ``per-image (mapped)``: the un-augmented image's importance map mapped to the view, then
      masked (what ``mask.reuse: per-image`` serves);
    * ``per-image (unmapped)``: the un-augmented image's mask as is (a reference: no mapping);
    * ``grad vs ig``: gradient × activation on the view;
    * ``ig 4x steps``: IG with four times the steps on the view (how settled the exact mask is);
    * ``one fixed mask``: the same mask for every view, made from the mean importance map of all
      un-augmented training images (how much of the exact masks is tied to the image frame).
    """
    views = EpochViews(loader)
    size = tuple(loader.x.shape[-2:])
    c = _Cfg(**cfg)
    acc = {}
    allx = loader.x if loader.mean is None else (loader.x - loader.mean) / loader.std
    prior = torch.cat([importance_maps(teacher, allx[i:i + 256], loader.y[i:i + 256], [layer], c)[layer]
                       for i in range(0, allx.shape[0], 256)]).mean(0, keepdim=True)

    def add(name, kind, a, b):
        r = mask_agreement(a, b)
        ent = acc.setdefault((name, kind), {"iou": 0.0, "spearman": 0.0, "n": 0})
        ent["iou"] += r["iou"] * r["n"]
        ent["spearman"] += r["spearman"] * r["n"]
        ent["n"] += r["n"]

    for e in epochs:
        for x, y, idx in loader.epoch(e):
            plain = loader.x[idx]
            if loader.mean is not None:
                plain = (plain - loader.mean) / loader.std
            params = views(e, idx)
            exact = importance_maps(teacher, x, y, [layer], c)[layer]
            base = importance_maps(teacher, plain, y, [layer], c)[layer]
            mapped = map_masks(base, loader.augment, params, size, center)
            grad = importance_maps(teacher, x, y, [layer], _Cfg(**dict(cfg, method="grad")))[layer]
            fine = importance_maps(teacher, x, y, [layer], _Cfg(**dict(cfg, steps=4 * c.steps)))[layer]
            for kind in ("binary", "soft"):
                ex = to_mask(exact, c.q, kind, c.reduce)
                for name, imp in (("per-image (mapped)", mapped), ("per-image (unmapped)", base),
                                  ("one fixed mask", prior.expand_as(base)),
                                  ("grad vs ig", grad), (f"ig {4 * c.steps} vs {c.steps} steps", fine)):
                    add(name, kind, to_mask(imp, c.q, kind, c.reduce), ex)
    rows = []
    for (name, kind), ent in acc.items():
        metric = "iou" if kind == "binary" else "spearman"
        rows.append({"compare": name, "mask": kind, "metric": metric, "value": ent[metric] / ent["n"],
                     "samples": ent["n"]})
    return rows


def _load_file_module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kdlab_masks_compared", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_time(f, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``f()``, after one untimed warm-up call."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def speed_rows(model_name="resnet56", layers=("layer2", "layer3"), batch=64, steps=16, repeats=3,
               shape=(3, 32, 32), seed=0, compare_file=None) -> list[dict]:
    """Seconds per batch of gradient × activation, step-by-step IG and batched IG, side by side in
    this process (best of ``repeats`` after one warm-up each), random weights, and their ratios.
    ``compare_file``: another ``masks.py`` (e.g. an older version) whose
    ``layer_attribution(model, x, y, layer, "ig", steps)`` is timed too (column ``other s``)."""
    from kdlab.models import create_model

    torch.manual_seed(seed)
    m = create_model(model_name, num_classes=10, in_channels=shape[0]).eval()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    other = _load_file_module(compare_file) if compare_file else None
    rows = []
    for layer in layers:
        fns = {"grad": lambda: layer_attribution(m, x, y, layer, "grad"),
               "step-by-step": lambda: layer_attribution(m, x, y, layer, "ig", steps, batched=False),
               "batched": lambda: layer_attribution(m, x, y, layer, "ig", steps)}
        if other is not None:
            fns["other"] = lambda: other.layer_attribution(m, x, y, layer, "ig", steps)
        t = {name: best_time(f, repeats) for name, f in fns.items()}
        row = {"model": model_name, "layer": layer, "batch": batch, "steps": steps,
               "grad s": t["grad"], "step-by-step s": t["step-by-step"], "batched s": t["batched"],
               "step/batched": t["step-by-step"] / t["batched"], "batched/grad": t["batched"] / t["grad"]}
        if other is not None:
            row["other s"] = t["other"]
            row["other/batched"] = t["other"] / t["batched"]
            row["max |diff|"] = float((fns["batched"]() - fns["other"]()).abs().max())
        rows.append(row)
        print(row, flush=True)
    return rows


def step_cost_rows(teacher_name="resnet56", student_name="resnet20", layer="layer3", batch=64, steps=16,
                   shape=(3, 32, 32), crop_pad=4, q=0.3, repeats=3, seed=0) -> list[dict]:
    """Seconds per batch (best of ``repeats``) of one student training step and of each teacher
    cost a masked method adds, side by side in this process (random weights), and each as a
    multiple of the student step: the teacher forward, batched and step-by-step IG at ``layer``,
    and the per-image mapping (crop + flip of a stored map, then top-q)."""
    from kdlab.data.augment import AugmentSpec, draw_params
    from kdlab.models import create_model

    torch.manual_seed(seed)
    t = create_model(teacher_name, num_classes=10, in_channels=shape[0]).eval()
    s = create_model(student_name, num_classes=10, in_channels=shape[0])
    opt = torch.optim.SGD(s.parameters(), lr=0.01)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    spec = AugmentSpec(crop_pad=crop_pad, flip=True)
    params = draw_params(batch, spec, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        h = layer_attribution(t, x[:1], y[:1], layer, "grad").shape[-2:]
    imp = torch.rand(batch, *h)

    def student_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(s(x), y).backward()
        opt.step()

    def teacher_forward():
        with torch.inference_mode():
            t(x)

    fns = {"student step": student_step, "teacher forward": teacher_forward,
           f"IG {steps} steps, batched": lambda: layer_attribution(t, x, y, layer, "ig", steps),
           f"IG {steps} steps, step-by-step": lambda: layer_attribution(t, x, y, layer, "ig", steps, batched=False),
           "per-image map + top-q": lambda: to_mask(map_masks(imp, spec, params, shape[-2:]), q)}
    out = {name: best_time(f, repeats) for name, f in fns.items()}
    base = out["student step"]
    return [{"cost": k, "ms": 1000 * v, "x student step": v / base} for k, v in out.items()]


def paired_rows(recipe_name: str, seeds, out_dir, overrides=(), modes=("per-view", "per-image")) -> list[dict]:
    """Train ``recipe_name`` for every seed in both mask modes (same seed: same data, init and
    augmentation draws; live teacher) and return one row per (seed, mode) with test accuracy
    and training-loop time. The ``per-image`` runs share one `MaskStore` (across seeds)."""
    from pathlib import Path

    from kdlab.train.recipe import load_recipe
    from kdlab.train.build import train

    rows = []
    for seed in seeds:
        for mode in modes:
            r = load_recipe(recipe_name, [*overrides, f"train.seed={seed}", f"mask.reuse={mode}"])
            t0 = time.perf_counter()
            res = train(r, Path(out_dir) / mode / f"seed{seed}", progress=False, resume=False,
                        method=f"{r.name}-{mode}")
            rows.append({"seed": seed, "mode": mode, "test_acc": res["test_acc"], "val_acc": res["val_acc"],
                         "best_epoch": res["best_epoch"], "train_time_s": res["train_time_s"],
                         "wall_s": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    return rows


def paired_summary(rows: list[dict]) -> dict:
    """Mean test accuracy per mode and the paired difference per-image − per-view over seeds
    (mean, sample sd, n)."""
    import statistics

    by = {}
    for r in rows:
        by.setdefault(r["seed"], {})[r["mode"]] = r
    d = [v["per-image"]["test_acc"] - v["per-view"]["test_acc"] for v in by.values()
         if "per-image" in v and "per-view" in v]
    mean = lambda k, m: statistics.fmean(r[k] for r in rows if r["mode"] == m)  # noqa: E731
    return {"per-view acc": mean("test_acc", "per-view"), "per-image acc": mean("test_acc", "per-image"),
            "diff mean": statistics.fmean(d) if d else math.nan,
            "diff sd": statistics.stdev(d) if len(d) > 1 else math.nan, "n": len(d),
            "per-view train s": mean("train_time_s", "per-view"),
            "per-image train s": mean("train_time_s", "per-image")}


def study_rows(recipe_name: str, out_dir, seeds, overrides=(), modes=("per-view", "per-image")) -> list[dict]:
    """Run the recipe's ablation study (with the teacher cache) once per mask mode
    (``mask.reuse``, honoured by :func:`kdlab.distill.teachers.build_teacher_source`): per mode the study's wall
    time, the sum of its runs' training-loop times, and each method's mean training-loop time."""
    import statistics
    from pathlib import Path

    from kdlab.train.recipe import load_recipe
    from kdlab.experiments.study import run_ablation
    from kdlab.train.build import ensure_teachers

    ensure_teachers(load_recipe(recipe_name, list(overrides)), progress=False, log=lambda *a: None)
    rows = []
    for mode in modes:
        d = Path(out_dir) / mode
        t0 = time.perf_counter()
        run_ablation(recipe_name, out_dir=d, seeds=seeds, overrides=[*overrides, f"mask.reuse={mode}"],
                     progress=False, log=lambda *a: None)
        wall = time.perf_counter() - t0
        runs = [read_json(p, "run result") for p in d.glob("*/seed*/result.json")]
        row = {"mode": mode, "wall_s": wall, "sum_train_s": sum(r["train_time_s"] for r in runs),
               "runs": len(runs)}
        for m in sorted({r["method"] for r in runs}):
            row[m] = statistics.fmean(r["train_time_s"] for r in runs if r["method"] == m)
            row[m + " acc"] = statistics.fmean(r["test_acc"] for r in runs if r["method"] == m)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kdlab.experiments.mask_report")
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("completeness")
    c.add_argument("--recipe", default="digits/full")
    c.add_argument("--layers", nargs="+", default=["layer2"])
    c.add_argument("--n", type=int, default=256)
    a = sub.add_parser("agreement")
    a.add_argument("--recipe", default="digits/full")
    a.add_argument("--layer", default="layer2")
    a.add_argument("--epochs", type=int, default=2)
    a.add_argument("--flip", action="store_true", help="also flip (the digits recipe only crops)")
    a.add_argument("set", nargs="*", default=[], help="recipe overrides, e.g. mask.steps=16")
    pa = sub.add_parser("paired")
    pa.add_argument("--recipe", default="digits/full")
    pa.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    pa.add_argument("--out", default="runs/mask-paired")
    pa.add_argument("set", nargs="*", default=[], help="recipe overrides")
    st = sub.add_parser("study")
    st.add_argument("--recipe", default="digits/full")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    st.add_argument("--out", default="runs/mask-study")
    st.add_argument("set", nargs="*", default=[], help="recipe overrides, e.g. train.epochs=15")
    sc = sub.add_parser("step-costs")
    sc.add_argument("--layer", default="layer3")
    s = sub.add_parser("speed")
    s.add_argument("--model", default="resnet56")
    s.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--steps", type=int, default=16)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--compare-file", default=None, help="another masks.py to time side by side")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.what == "completeness":
        r, splits, teacher = load_recipe_teacher(args.recipe)
        from kdlab.data.augment import normalize

        x = normalize(splits.test.x[: args.n], splits.info.mean, splits.info.std)
        y = splits.test.y[: args.n]
        rows = [row for l in args.layers for row in completeness_rows(teacher, x, y, l)]
        print(_md(rows, ["layer", "rule", "steps", "abs", "rel"]))
    elif args.what == "agreement":
        from kdlab.data.augment import AugmentSpec
        from kdlab.data.loader import BatchLoader

        r, splits, teacher = load_recipe_teacher(args.recipe, args.set)
        aug = r.data.augment
        spec = AugmentSpec(crop_pad=aug.crop_pad, flip=aug.flip or args.flip)
        loader = BatchLoader(splits.train, r.train.batch_size, seed=r.train.seed, augment=spec,
                             mean=splits.info.mean, std=splits.info.std)
        cfg = r.mask.model_dump()
        rows = agreement_rows(teacher, loader, args.layer, cfg, epochs=range(args.epochs))
        print(f"recipe {args.recipe}, layer {args.layer}, augment {spec}, mask {cfg}")
        print(_md(rows, ["compare", "mask", "metric", "value", "samples"]))
    elif args.what == "step-costs":
        rows = step_cost_rows(layer=args.layer)
        print(_md(rows, ["cost", "ms", "x student step"]))
    elif args.what == "study":
        rows = study_rows(args.recipe, args.out, args.seeds, args.set)
        print(_md(rows, list(rows[0])))
    elif args.what == "paired":
        rows = paired_rows(args.recipe, args.seeds, args.out, args.set)
        print(_md(rows, ["seed", "mode", "test_acc", "val_acc", "best_epoch", "train_time_s", "wall_s"]))
        summ = paired_summary(rows)
        print(_md([summ], list(summ)))
    else:
        rows = speed_rows(args.model, args.layers, args.batch, args.steps, args.repeats,
                          compare_file=args.compare_file)
        print(f"torch threads: {torch.get_num_threads()}")
        print(_md(rows, list(rows[0])))


if __name__ == "__main__":
    main()
