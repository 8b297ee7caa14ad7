"""`kdlab bench`: training throughput of baseline, KD and full-method steps, with and without the
teacher cache, measured side by side in one process; and a study's wall time with and without it.

Step throughput uses *synthetic* data (uniform random images of the named shape, random labels)
and a randomly initialised teacher: throughput does not depend on the values. Every variant runs
the real `kdlab.train.trainer.Trainer` epoch loop (`train_epoch`) over the same batches:

* ``baseline``: cross-entropy only (no teacher);
* ``kd (live)`` / ``kd (cached)``: CE + KD, the teacher run every step (``teacher_mode: live``)
  or served from a filled `kdlab.distill.teachers.TeacherStore` (``cache-fp16``);
* ``full (live)`` / ``full (cached)``: CE + KD + masked alignment + masked attention transfer with
  Integrated-Gradients masks, live or cached.

The cached variants are filled by one untimed pass over the same batches first; every variant
gets one untimed warm-up step. Then the variants take turns, one epoch of ``steps`` batches each,
for ``repeats`` rounds; the median round is reported.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch


def _synthetic_splits(n: int, channels: int, size: int, num_classes: int, seed: int = 0):
    from kdlab.data.splits import DatasetInfo, Splits, TensorSet

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    info = DatasetInfo(name="synthetic", num_classes=num_classes, in_channels=channels, image_size=size,
                       mean=(0.5,) * channels, std=(0.25,) * channels,
                       classes=tuple(str(i) for i in range(num_classes)))
    small = TensorSet(x[:8], y[:8])
    return Splits(train=TensorSet(x, y), val=small, test=small, info=info)


def _recipe(kind: str, *, student, teacher, batch_size, layer_pair, mask_steps, mode, amp,
            channels_last, compile_):
    from kdlab.core.config import recipe_from_dict

    loss = [{"term": "ce", "weight": 1.0 if kind == "baseline" else 0.1}]
    if kind != "baseline":
        loss.append({"term": "kd", "weight": 0.9, "T": 4.0})
    if kind == "full":
        loss += [{"term": "align", "weight": 0.5, "layers": [list(layer_pair)], "form": "contrastive",
                  "tau": 0.1},
                 {"term": "attn", "weight": 100.0, "layers": [list(layer_pair)]}]
    return recipe_from_dict({
        "name": f"bench-{kind}", "data": {"name": "cifar10"},
        "student": {"model": student}, "teacher": {"model": teacher} if kind != "baseline" else None,
        "train": {"epochs": 1, "batch_size": batch_size, "device": "cpu" if not torch.cuda.is_available() else "auto",
                  "teacher_mode": mode, "amp": amp, "channels_last": channels_last, "compile": compile_,
                  "patience": None},
        "loss": loss,
        "mask": {"method": "ig", "steps": mask_steps, "q": 0.3, "kind": "binary"} if kind == "full" else None,
    }, "bench")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(*, teacher: str = "resnet56", student: str = "resnet20", batch_size: int = 64,
                steps: int = 5, image_size: int = 32, channels: int = 3, num_classes: int = 10,
                layers=("layer3", "layer3"), mask_steps: int = 16, amp: str = "none",
                channels_last: bool = False, compile_: bool = False,
                variants=("baseline", "kd-live", "kd-cached", "full-live", "full-cached"),
                repeats: int = 3, log=print) -> list[dict]:
    """Images per second of each variant's training steps (see the module doc)."""
    from kdlab.distill.teachers import TeacherStore
    from kdlab.models import create_model
    from kdlab.train.build import build_run
    from kdlab.train.objective import StepContext
    from kdlab.train.trainer import Trainer

    splits = _synthetic_splits(batch_size * steps, channels, image_size, num_classes)
    torch.manual_seed(0)
    t_model = create_model(teacher, num_classes=num_classes, in_channels=channels)
    trainers = {}
    times: dict[str, list] = {v: [] for v in variants}
    stores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            kind, _, how = v.partition("-")
            mode = "cache-fp16" if how == "cached" else "live"
            r = _recipe(kind, student=student, teacher=teacher, batch_size=batch_size, layer_pair=layers,
                        mask_steps=mask_steps, mode=mode, amp=amp, channels_last=channels_last,
                        compile_=compile_)
            store = stores[v] = TeacherStore() if how == "cached" else None
            run = build_run(r, splits=splits, teacher=t_model if kind != "baseline" else None, store=store)
            tr = trainers[v] = Trainer(run.objective, run.train_loader, None, None, r.train, Path(tmp) / v,
                                       runtime=run.runtime, progress=False, method=v)
            if store is not None:  # fill the cache: one untimed pass over the same batches
                src = run.objective.teacher
                for step, (x, y, idx) in enumerate(tr.train_loader.epoch(0)):
                    src(x, y, idx, 0, step)
            # untimed warm-up step (allocator, compile)
            batch = next(iter(tr.train_loader.epoch(1)))
            run.objective.step(batch, StepContext(1, 0, run.runtime))[0].backward()
            tr.opt.zero_grad(set_to_none=True)
        # side by side: the variants take turns, `repeats` rounds; the median round counts
        for _ in range(repeats):
            for v in variants:
                tr = trainers[v]
                _sync(tr.runtime.device)
                t0 = time.perf_counter()
                tr.train_epoch(0)
                _sync(tr.runtime.device)
                times[v].append(time.perf_counter() - t0)
    rows = []
    for v in variants:
        dt = sorted(times[v])[len(times[v]) // 2]
        n = len(trainers[v].train_loader)
        ips = batch_size * n / dt
        out = {"variant": v, "images_per_s": ips, "ms_per_step": 1000 * dt / n}
        if stores[v] is not None:
            out["cache_hits"] = stores[v].hits
        rows.append(out)
        log(f"  {v:<12} {ips:9.1f} img/s  ({out['ms_per_step']:.0f} ms/step)")
    base = next((r["images_per_s"] for r in rows if r["variant"] == "baseline"), None)
    for r in rows:
        r["cost_vs_baseline"] = base / r["images_per_s"] if base else float("nan")
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| step | images/s | ms/step | cost vs baseline |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.0f} | "
                     f"{r['cost_vs_baseline']:.2f}x |")
    return "\n".join(lines)


def bench_study(recipe_ref: str, out_dir, *, seeds=None, overrides=None, mode: Optional[str] = None,
                log=print) -> dict:
    """Run a study twice, with and without the teacher cache (same recipe, separate folders):
    wall times, the sum of the students' own training times, and whether results are identical."""
    from kdlab.core.config import load_recipe
    from kdlab.experiments.study import run_ablation
    from kdlab.train.build import ensure_teachers

    ensure_teachers(load_recipe(recipe_ref, overrides), progress=False, log=log)  # not timed
    out_dir = Path(out_dir)
    res = {}
    for name, cache in (("cached", True), ("live", False)):
        t0 = time.perf_counter()
        run_ablation(recipe_ref, out_dir=out_dir / name, seeds=seeds, mode=mode, overrides=overrides,
                     progress=False, log=lambda *a: None, teacher_cache=cache)
        wall = time.perf_counter() - t0
        runs = [json.loads(p.read_text()) for p in (out_dir / name).glob("*/seed*/result.json")]
        runs = sorted(runs, key=lambda r: (r["method"], r["seed"]))
        res[name] = {"wall_s": wall, "students_train_s": sum(r["train_time_s"] for r in runs),
                     "runs": len(runs),
                     "results": [(r["method"], r["seed"], r["val_acc"], r["test_acc"], r["best_epoch"],
                                  r["test_loss"]) for r in runs]}
        log(f"  study {name:<6}: wall {wall:.1f}s, students' own training {res[name]['students_train_s']:.1f}s "
            f"({len(runs)} runs)")
    res["speedup"] = res["live"]["wall_s"] / res["cached"]["wall_s"]
    res["identical"] = res["live"]["results"] == res["cached"]["results"]
    log(f"  speed-up with the cache: {res['speedup']:.2f}x; results identical: {res['identical']}")
    return res
