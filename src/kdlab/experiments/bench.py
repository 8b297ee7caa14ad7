"""`kdlab bench`: training throughput of baseline, KD and full-method steps, with and without the
teacher cache, measured side by side in one process; and where a whole study's time goes.

**Steps** (:func:`bench_steps`) use *synthetic* data (uniform random images of the named shape,
random labels) and a randomly initialised teacher: throughput does not depend on the values.
Every variant runs the real `kdlab.train.trainer.Trainer` epoch loop (`train_epoch`) over the same
batches:

* ``baseline``: cross-entropy only (no teacher);
* ``kd (live)`` / ``kd (cached)``: CE + KD, the teacher run every step (``teacher_mode: live``)
  or served from a filled `kdlab.distill.teachers.TeacherStore` (``cache-fp16``);
* ``full (live)`` / ``full (cached)``: CE + KD + masked alignment + masked attention transfer with
  Integrated-Gradients masks, live or cached.

A variant's suffix changes its settings (:func:`variant_settings`): none runs with the command's
``--amp`` / ``--channels-last`` / ``--compile`` and the teacher folded; ``-asloaded`` the same with
``train.fast_teacher`` off (the teacher as loaded); ``-default`` today's recipe defaults (fp32,
contiguous, eager, teacher as loaded) whatever the flags; ``-fast`` the fast settings (``amp: bf16``,
``channels_last``, ``fast_teacher``; ``--compile`` as given). ``kd-live-default,kd-live-fast`` thus
times the defaults against the fast settings, alternating, in one process.

The cached variants are filled by one untimed pass over the same batches first; every variant
gets one untimed warm-up step. Then the variants take turns, one epoch of ``steps`` batches each,
for ``repeats`` rounds; the median round is reported.

**A study** (:func:`bench_study`) is run as ``kdlab ablate`` runs it (teacher cache on) after
its teacher is trained (not timed). Each run's ``result.json`` splits its training loop into
``student_time_s`` (the student's forward, backward and optimiser step) and ``teacher_time_s``,
and the latter into teacher forward passes and teacher-cache reads (``teacher_time_s −
mask_time_s``) and ``mask_time_s`` (causal masks: IG or
gradient × activation, live or filling the cache; with ``mask.reuse: per-image`` the mask store's
maps, computed the first time an image is seen, and their mapping to the view). The study's wall
time also holds what no run's loop does (data loading, validation and test evaluation,
checkpoints, the report): ``other``. The figure of merit is ``study/students = wall / Σ
student_time_s``: what the study costs over training its students alone. Timings are host
seconds (``time.perf_counter``); on a GPU, asynchronous kernels make the split approximate.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from kdlab.core.io import atomic_write_text, read_json


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
            channels_last, compile_, fast_teacher: bool = True):
    from kdlab.train.recipe import recipe_from_dict

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
                  "fast_teacher": fast_teacher, "patience": None},
        "loss": loss,
        "mask": {"method": "ig", "steps": mask_steps, "q": 0.3, "kind": "binary"} if kind == "full" else None,
    }, "bench")


synthetic_splits = _synthetic_splits  # public names for kdlab.experiments.against
bench_recipe = _recipe


VARIANT_KINDS = ("baseline", "kd-live", "kd-cached", "full-live", "full-cached")
VARIANT_SUFFIXES = ("", "-asloaded", "-default", "-fast")


def variant_settings(variant: str, *, amp: str = "none", channels_last: bool = False,
                     compile_: bool = False) -> dict:
    """``{kind, how, amp, channels_last, compile, fast_teacher}`` of a bench variant name (see the
    module doc); ValueError naming the known names for another."""
    base = next((k for k in sorted(VARIANT_KINDS, key=len, reverse=True)
                 if variant == k or variant.startswith(k + "-")), None)
    suffix = variant[len(base):] if base else None
    if base is None or suffix not in VARIANT_SUFFIXES:
        raise ValueError(f"--variants: unknown {variant!r}; choose from {', '.join(VARIANT_KINDS)}, each "
                         f"optionally with -asloaded, -default or -fast")
    kind, _, how = base.partition("-")
    out = {"kind": kind, "how": how or "live", "amp": amp, "channels_last": bool(channels_last),
           "compile": bool(compile_), "fast_teacher": suffix != "-asloaded"}
    if suffix == "-default":
        out.update(amp="none", channels_last=False, compile=False, fast_teacher=False)
    elif suffix == "-fast":
        out.update(amp="bf16", channels_last=True, fast_teacher=True)
    return out


def format_settings(s: dict) -> str:
    """``amp bf16, channels-last, eager, teacher folded`` (one side's or variant's settings in words)."""
    return ", ".join([f"amp {s['amp']}", "channels-last" if s["channels_last"] else "contiguous",
                      "compiled" if s["compile"] else "eager",
                      "teacher folded" if s["fast_teacher"] else "teacher as loaded"])


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def check_steps(*, teacher: str = "resnet56", student: str = "resnet20", batch_size: int = 64,
                steps: int = 5, image_size: int = 32, channels: int = 3, num_classes: int = 10,
                layers=("layer3", "layer3"), mask_steps: int = 16, amp: str = "none",
                channels_last: bool = False, compile_: bool = False,
                variants=("baseline", "kd-live", "kd-cached", "full-live", "full-cached"),
                repeats: int = 3) -> dict:
    """Refuse bad :func:`bench_steps` arguments with one line naming the option (before anything
    is printed or timed); returns each variant's settings (:func:`variant_settings`)."""
    from kdlab.models import create_model
    from kdlab.models.taps import Taps

    for flag, v, lo in (("--batch-size", batch_size, 1), ("--steps", steps, 1), ("--repeats", repeats, 1),
                        ("--image-size", image_size, 1), ("--channels", channels, 1),
                        ("--num-classes", num_classes, 2), ("--mask-steps", mask_steps, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"{flag} must be a whole number >= {lo}, got {v}")
    variants = list(variants)
    if not variants or not all(variants):
        raise ValueError(f"--variants: an empty name in {','.join(variants)!r}; give comma-separated names "
                         f"from {', '.join(VARIANT_KINDS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"--variants: each variant once (got {', '.join(variants)})")
    settings = {v: variant_settings(v, amp=amp, channels_last=channels_last, compile_=compile_) for v in variants}
    full = any(st["kind"] == "full" for st in settings.values())
    layers = tuple(layers)
    if full and (len(layers) != 2 or not all(layers)):
        raise ValueError(f"--layers takes the student's and the teacher's layer, comma-separated, e.g. "
                         f"layer3,layer3 (got {','.join(layers)!r})")
    models = [("--student", student, layers[0] if full else None)]
    if any(st["kind"] != "baseline" for st in settings.values()):
        models.append(("--teacher", teacher, layers[1] if full else None))
    with torch.random.fork_rng(devices=[]):  # the models only tell their names and layers here
        for flag, name, layer in models:
            try:
                model = create_model(name, num_classes=num_classes, in_channels=channels)
            except KeyError as e:
                raise ValueError(f"{flag}: {e.args[0]}") from None
            try:
                if layer is not None:
                    Taps(model, [layer])
            except KeyError as e:
                raise ValueError(f"--layers: {e.args[0]}") from None
    return settings


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

    settings = check_steps(teacher=teacher, student=student, batch_size=batch_size, steps=steps,
                           image_size=image_size, channels=channels, num_classes=num_classes, layers=layers,
                           mask_steps=mask_steps, amp=amp, channels_last=channels_last, compile_=compile_,
                           variants=variants, repeats=repeats)
    splits = _synthetic_splits(batch_size * steps, channels, image_size, num_classes)
    torch.manual_seed(0)
    t_model = create_model(teacher, num_classes=num_classes, in_channels=channels)
    trainers = {}
    times: dict[str, list] = {v: [] for v in variants}
    waits: dict[str, list] = {v: [] for v in variants}  # seconds waiting for batches, per round
    stores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            st = settings[v]
            kind, how = st["kind"], st["how"]
            mode = "cache-fp16" if how == "cached" else "live"
            r = _recipe(kind, student=student, teacher=teacher, batch_size=batch_size, layer_pair=layers,
                        mask_steps=mask_steps, mode=mode, amp=st["amp"], channels_last=st["channels_last"],
                        compile_=st["compile"], fast_teacher=st["fast_teacher"])
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
                w0 = tr.state.data_wait_s
                t0 = time.perf_counter()
                tr.train_epoch(0)
                _sync(tr.runtime.device)
                times[v].append(time.perf_counter() - t0)
                waits[v].append(tr.state.data_wait_s - w0)
    rows = []
    for v in variants:
        dt = sorted(times[v])[len(times[v]) // 2]
        n = len(trainers[v].train_loader)
        ips = batch_size * n / dt
        out = {"variant": v, "images_per_s": ips, "ms_per_step": 1000 * dt / n,
               "images_per_s_rounds": [batch_size * n / t for t in times[v]],
               "data_wait_fraction": sum(waits[v]) / sum(times[v]) if sum(times[v]) > 0 else float("nan"),
               "settings": {k: settings[v][k] for k in ("amp", "channels_last", "compile", "fast_teacher")}}
        if stores[v] is not None:
            out["cache_hits"] = stores[v].hits
        rows.append(out)
        log(f"  {v:<18} {ips:9.1f} img/s  ({out['ms_per_step']:.0f} ms/step, waiting for data "
            f"{100 * out['data_wait_fraction']:.1f}% of step time; rounds "
            f"{', '.join(f'{r:.1f}' for r in out['images_per_s_rounds'])}; {format_settings(out['settings'])})")
    base = next((r["images_per_s"] for r in rows if r["variant"] == "baseline"), None)
    for r in rows:
        r["cost_vs_baseline"] = base / r["images_per_s"] if base else None  # no baseline timed: none
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| step | images/s | ms/step | cost vs baseline | waiting for data |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        cost = r.get("cost_vs_baseline")
        cost = "—" if cost is None or cost != cost else f"{cost:.2f}x"  # no baseline among the variants
        lines.append(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.0f} | "
                     f"{cost} | {100 * r.get('data_wait_fraction', float('nan')):.1f}% |")
    return "\n".join(lines)


def _quiet(*_a, **_k):
    pass


_PARTS = ("student_s", "teacher_forward_s", "mask_s", "eval_s", "setup_s", "checkpoint_s")


def study_breakdown(results: list[dict], wall_s: float, report_s: float = 0.0) -> dict:
    """Where a study's time went, from its runs' ``result.json`` dicts and its wall time.

    Per method (in first-seen order) and in total: ``runs``, ``student_s`` (Σ ``student_time_s``:
    the students' own steps, forward/backward/optimiser and their batches, without teacher and
    mask time), ``teacher_forward_s`` (Σ ``teacher_time_s − mask_time_s`` plus the set-up probe's
    teacher outputs ``setup_teacher_time_s − setup_mask_time_s``: teacher forward passes and cache
    reads) and ``mask_s`` (Σ ``mask_time_s + setup_mask_time_s``: IG / gradient × activation,
    per-image map lookups and mapping), ``eval_s`` (Σ ``eval_time_s``: the students' validation
    each epoch and final test, which a CE-only study pays too), ``setup_s`` (Σ ``setup_time_s −
    setup_teacher_time_s``: each run's data, models, teacher source with its cache key, and the
    objective's probe batch) and ``checkpoint_s`` (Σ ``checkpoint_time_s``: best.pt, last.pt,
    metrics.csv, run.json written, best.pt read back). ``report_s``: the study's report (tables,
    statistics, figures, page). ``other_s = wall − all of those`` (loading the teacher, the
    study's own files, the loop between runs) and ``ratio = wall / Σ student_s`` (the
    ``study/students`` line). ``floor = (student_s + teacher_forward_s + mask_s + eval_s) /
    student_s``: the ratio left if set-up, checkpoints, report and other cost nothing -- with the
    teacher cache the teacher runs once per batch and seed and the masks once per image (per
    view), and the students' validation picks their best epoch, so no bookkeeping takes the study
    below it without changing what is computed.
    """
    methods: dict[str, dict] = {}
    for r in results:
        m = methods.setdefault(r["method"], {"runs": 0, **{k: 0.0 for k in _PARTS}})
        mask = float(r.get("mask_time_s", 0.0))
        teacher = float(r.get("teacher_time_s", 0.0))
        s_teacher, s_mask = float(r.get("setup_teacher_time_s", 0.0)), float(r.get("setup_mask_time_s", 0.0))
        m["runs"] += 1
        m["student_s"] += float(r.get("student_time_s", r["train_time_s"] - teacher))
        m["teacher_forward_s"] += teacher - mask + s_teacher - s_mask
        m["mask_s"] += mask + s_mask
        m["eval_s"] += float(r.get("eval_time_s", 0.0))
        m["setup_s"] += float(r.get("setup_time_s", 0.0)) - s_teacher
        m["checkpoint_s"] += float(r.get("checkpoint_time_s", 0.0))
    total = {k: sum(m[k] for m in methods.values()) for k in ("runs",) + _PARTS}
    total["wall_s"] = float(wall_s)
    total["report_s"] = float(report_s)
    total["other_s"] = total["wall_s"] - total["report_s"] - sum(total[k] for k in _PARTS)
    inherent = total["student_s"] + total["teacher_forward_s"] + total["mask_s"] + total["eval_s"]
    total["ratio"] = total["wall_s"] / total["student_s"] if total["student_s"] > 0 else float("nan")
    total["floor"] = inherent / total["student_s"] if total["student_s"] > 0 else float("nan")
    return {"methods": methods, "total": total}


def format_breakdown(block: dict) -> str:
    """The printed block of one measured study: a title, a per-method table, the totals, the
    wall-time line and, last, ``study/students: <ratio>`` (2 decimals)."""
    t = block["total"]
    lines = [block["title"],
             "| method | runs | student s | teacher-forward s | mask s |", "|---|---:|---:|---:|---:|"]
    for name, m in block["methods"].items():
        lines.append(f"| {name} | {m['runs']} | {m['student_s']:.2f} | {m['teacher_forward_s']:.2f} | "
                     f"{m['mask_s']:.2f} |")
    lines.append(f"| total | {t['runs']} | {t['student_s']:.2f} | {t['teacher_forward_s']:.2f} | {t['mask_s']:.2f} |")
    if block.get("vs_live") is not None:
        v = block["vs_live"]
        lines.append(f"teacher cache off: wall {v['wall_s']:.1f} s; with the cache {v['speedup']:.2f}x faster, "
                     f"results identical: {v['identical']}")
    lines.append(f"wall {t['wall_s']:.1f} s = students {t['student_s']:.1f} + teacher forward "
                 f"{t['teacher_forward_s']:.1f} + masks {t['mask_s']:.1f} + students' evaluation "
                 f"{t.get('eval_s', 0.0):.1f} + runs' set-up {t.get('setup_s', 0.0):.1f} + checkpoints "
                 f"{t.get('checkpoint_s', 0.0):.1f} + report {t.get('report_s', 0.0):.1f} + other "
                 f"{t['other_s']:.1f} (teacher loading, study files, the loop between runs)")
    if "floor" in t:
        lines.append(f"floor {t['floor']:.2f}: the ratio if set-up, checkpoints, report and other cost nothing "
                     f"(students + teacher forward + masks + students' evaluation)")
    lines.append(f"study/students: {t['ratio']:.2f}")
    return "\n".join(lines)


def _fresh(folder: Path) -> Path:
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty (a finished run there would be reused, not timed); give "
                         f"kdlab bench --study a new --out folder or delete it")
    return folder


def _ensure_teacher(recipe, teacher_overrides, log) -> None:
    """Train the recipe's teacher when missing: by ``ensure_teachers`` or, with
    ``teacher_overrides``, by its ``teacher.recipe`` with those overrides (never timed)."""
    from kdlab.train.recipe import load_recipe
    from kdlab.train.build import ensure_teachers, teacher_finished, train

    tc = recipe.teacher
    if recipe.task != "classification":  # a task plug-in (detection, ...) trains its teacher itself
        from kdlab.tasks import get_task

        task = get_task(recipe.task)
        if teacher_overrides and tc is not None and tc.checkpoint and not teacher_finished(Path(tc.checkpoint)):
            if not tc.recipe:
                raise ValueError("--teacher-set needs a recipe with teacher.recipe (the teacher's own recipe)")
            t_recipe = task.load_recipe(tc.recipe, list(teacher_overrides))
            ckpt = Path(tc.checkpoint)
            log(f"training teacher {t_recipe.student.model} into {ckpt.parent} (not timed)")
            res = task.train(t_recipe, ckpt.parent, method="teacher", progress=False)
            m = task.metric().name
            log(f"teacher: val {m} {res[f'val_{m}']:.4f}  test {m} {res[f'test_{m}']:.4f}")
        elif hasattr(task, "ensure_teacher"):
            task.ensure_teacher(recipe, progress=False, log=log)
        return
    if teacher_overrides and tc is not None and tc.checkpoint and not teacher_finished(Path(tc.checkpoint)):
        if not tc.recipe:
            raise ValueError("--teacher-set needs a recipe with teacher.recipe (the teacher's own recipe)")
        t_recipe = load_recipe(tc.recipe, list(teacher_overrides))
        if recipe.data.data_dir is not None:
            t_recipe = t_recipe.derive(data={**t_recipe.data.model_dump(), "data_dir": recipe.data.data_dir})
        ckpt = Path(tc.checkpoint)
        log(f"training teacher {t_recipe.student.model} into {ckpt.parent} (not timed)")
        res = train(t_recipe, ckpt.parent, progress=False, method="teacher")
        log(f"teacher: val {res['val_acc']:.4f}  test {res['test_acc']:.4f}")
    ensure_teachers(recipe, data_dir=recipe.data.data_dir, progress=False, log=log)


def bench_study(recipe_ref: str, out_dir, *, seeds=None, overrides=None, mode: Optional[str] = None,
                mask_reuse=None, compare_cache: bool = False, teacher_overrides=None,
                synthetic_cifar: Optional[int] = None, log=print) -> dict:
    """Where a study's time goes: run the study (``kdlab ablate``'s ``run_ablation``) and report,
    per method and in total, the seconds in student steps, teacher forward passes and mask
    computation (:func:`study_breakdown`), and ``study/students = wall / Σ students' own time``.

    ``mask_reuse``: None runs the recipe as configured, once, into ``out_dir/study``; a list of
    ``mask.reuse`` modes (``per-view``, ``per-image``) runs the study once per mode, each into
    ``out_dir/<mode>`` (its own teacher cache and mask store). ``compare_cache``: each study is
    also run with the teacher cache off (``<folder>-live``), reporting the speed-up and whether
    the results are identical. ``synthetic_cifar``: N generated CIFAR-format training images
    (:mod:`kdlab.data.cifar_synthetic`, written to ``out_dir/data`` unless already there) are the
    recipe's data, and its teacher lives in ``out_dir/teacher``. The teacher is trained first when
    missing (not timed; with ``teacher_overrides`` applied to its recipe). Every folder must be new
    (finished runs would be reused, not timed). Every input is checked before anything is logged
    or written. Logs one block per study (:func:`format_breakdown`, the last line of each
    ``study/students: X.XX``) and writes them all to ``out_dir/bench-study.json``.
    """
    from kdlab.core.io import check_out_dir, write_json
    from kdlab.train.recipe import load_recipe
    from kdlab.experiments.study import run_ablation
    from kdlab.tasks import get_task

    out_dir = Path(out_dir)
    overrides = list(overrides or [])
    teacher_overrides = list(teacher_overrides or [])
    modes = list(mask_reuse) if mask_reuse else [None]
    bad = [m for m in modes if m not in (None, "per-view", "per-image")]
    if bad or len(set(modes)) != len(modes):
        raise ValueError(f"--mask-reuse takes per-view and/or per-image, each once (got "
                         f"'{','.join(m or '' for m in modes)}')")
    if synthetic_cifar is not None and (int(synthetic_cifar) != synthetic_cifar or synthetic_cifar < 10):
        raise ValueError(f"--synthetic-cifar needs at least 10 training images (got {synthetic_cifar})")
    check_out_dir(out_dir, "--out folder", create=False)
    data = out_dir / "data"
    if synthetic_cifar:  # the generated data's teacher lives in the bench folder, never at the recipe's own path
        overrides = [f"data.data_dir={data}", f"teacher.checkpoint={out_dir / 'teacher' / 'best.pt'}", *overrides]
    plan = []
    for m in modes:
        ov = overrides + ([f"mask.reuse={m}"] if m else [])
        folder = out_dir / (m or "study")
        plan.append((m, ov, folder))
        _fresh(folder)
        if compare_cache:
            _fresh(folder.with_name(folder.name + "-live"))
    recipe = load_recipe(recipe_ref, overrides)
    task = get_task(recipe.task)
    for _, ov, _ in plan:  # each study's recipe and methods, refused before anything is written
        full = load_recipe(recipe_ref, ov)
        methods = getattr(getattr(full, "study", None), "methods", None)
        task.ablation_methods(full, mode or (methods if isinstance(methods, str) else "ladder"))
    tc = recipe.teacher
    if teacher_overrides:
        if tc is None or not tc.recipe:
            raise ValueError("--teacher-set needs a recipe with teacher.recipe (the teacher's own recipe)")
        (task.load_recipe if recipe.task != "classification" else load_recipe)(tc.recipe, teacher_overrides)
    if synthetic_cifar:
        from kdlab.data.cifar_synthetic import write_synthetic_cifar

        if not (data / "cifar-10-batches-py" / "test_batch").is_file():
            write_synthetic_cifar(data, synthetic_cifar, max(10, synthetic_cifar // 5))
            log(f"bench: generated CIFAR-format data ({synthetic_cifar} training images) in {data}")
        else:
            log(f"bench: using the generated CIFAR-format data already in {data}")
    _ensure_teacher(recipe, teacher_overrides, log)  # not timed

    def one(ov, folder, cache):
        t0 = time.perf_counter()
        lines: list[str] = []
        rep = run_ablation(recipe_ref, out_dir=folder, seeds=seeds, mode=mode, overrides=ov, progress=False,
                           log=lambda *a: lines.append(" ".join(map(str, a))), teacher_cache=cache)
        wall = time.perf_counter() - t0
        atomic_write_text(folder / "study.log", "\n".join(lines) + "\n")
        runs = [read_json(p, "run result") for p in sorted(folder.glob("*/seed*/result.json"))]
        return wall, runs, float((rep or {}).get("report_time_s", 0.0))

    blocks = []
    for m, ov, folder in plan:
        full = load_recipe(recipe_ref, ov)
        live = None
        if compare_cache:
            lwall, lruns, lreport = one(ov, folder.with_name(folder.name + "-live"), False)
        wall, runs, report_s = one(ov, folder, True)
        order = {name: i for i, name in enumerate(dict.fromkeys(json.loads((folder / "report" / "study.json")
                                                                            .read_text())["methods"]))}
        runs.sort(key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
        if compare_cache:
            key = lambda r: (r["method"], r["seed"], r["best_epoch"], r.get("test_loss"),  # noqa: E731
                             sorted((k, v) for k, v in r.items() if k.startswith(("val_", "test_"))
                                    and isinstance(v, (int, float))))
            live = {"wall_s": lwall, "speedup": lwall / wall,
                    "identical": sorted(map(key, lruns)) == sorted(map(key, runs)),
                    **study_breakdown(lruns, lwall, lreport)["total"]}
        seeds_run = sorted({r["seed"] for r in runs})
        block = {"recipe": full.name, "mask_reuse": (full.mask.reuse if full.mask is not None else None),
                 "mask": full.mask.model_dump() if full.mask is not None else None,
                 "folder": str(folder), "seeds": seeds_run, "epochs": full.train.epochs,
                 "threads": torch.get_num_threads(), **study_breakdown(runs, wall, report_s), "vs_live": live}
        block["title"] = (f"study {full.name}: {len(block['methods'])} methods x {len(seeds_run)} seed(s), "
                          f"{full.train.epochs} epoch(s), mask.reuse {block['mask_reuse'] or '-'}, teacher cache on, "
                          f"{block['threads']} thread(s) -> {folder}")
        metric = get_task(full.task).metric().name
        block["task"], block["metric"] = full.task, metric
        block["results"] = [{**{k: r.get(k) for k in ("method", "seed", f"val_{metric}", f"test_{metric}", "best_epoch",
                                                      "train_time_s", "student_time_s", "eval_time_s",
                                                      "mask_time_s")},
                             "teacher_forward_time_s": r.get("teacher_time_s", 0.0) - r.get("mask_time_s", 0.0)}
                            for r in runs]
        blocks.append(block)
        log(format_breakdown(block))
        write_json(out_dir / "bench-study.json", {"studies": blocks})
    return {"studies": blocks}
