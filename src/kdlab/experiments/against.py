"""`kdlab bench --against torchdistill`: kdlab's live KD step next to torchdistill's, same data.

Both train the same student from the same teacher (CIFAR ResNets, each tool's own model code:
kdlab's registry and ``torchdistill.models.classification.resnet``) with CE + KD (T = 4, weights
0.1 / 0.9: torchdistill's ``KDLoss(alpha=0.1)``) and SGD, on the same generated CIFAR-shape
tensors (``bench._synthetic_splits``: uniform images, random labels; already normalised, no
augmentation on either side), batch ``batch_size``, ``steps`` batches per epoch. torchdistill runs
its own ``DistillationBox`` (its training box: teacher forward under ``no_grad``, its hooks, its
loss registry, its ``post_forward_process`` backward and optimiser step) over a ``DataLoader``
(0 workers), always with its own defaults (fp32, contiguous memory, eager); kdlab runs its
``Trainer.train_epoch`` with ``teacher_mode: live``, the teacher folded (``fast_teacher``) and
kdlab's speed options as given (``amp``: ``none`` / ``bf16`` / ``fp16``, ``channels_last``,
``compile``: ``kdlab bench --against torchdistill --amp bf16 --channels-last``). Each side's settings
are printed and returned (``settings``). Each side gets one untimed warm-up epoch; then they take
turns, ``repeats`` rounds of one epoch each. Every round is reported, and the median's ratio.

torchdistill and torchvision are optional: without them the comparison is skipped with one line.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _torchdistill_box(teacher, student, dataset, batch_size: int, lr: float):
    import torch
    from torchdistill.core.distillation import get_distillation_box

    train_config = {
        "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", "requires_supp": True,
                              "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": batch_size, "num_workers": 0, "drop_last": False}},
        "teacher": {"sequential": [], "requires_grad": False, "forward_proc": "forward_batch_only"},
        "student": {"sequential": [], "requires_grad": True, "forward_proc": "forward_batch_only"},
        "optimizer": {"key": "SGD", "kwargs": {"lr": lr, "momentum": 0.9, "weight_decay": 5e-4}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": 4.0, "alpha": 0.1, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    return get_distillation_box(teacher, student, {"train": dataset}, train_config, torch.device("cpu"),
                                None, False, 1.0)


def _td_epoch(box, epoch: int) -> None:
    box.pre_epoch_process(epoch=epoch)
    for sample_batch, targets, supp_dict in box.train_data_loader:
        box.pre_forward_process(sample_batch=sample_batch, targets=targets, supp_dict=supp_dict)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)


TD_SETTINGS = {"amp": "none", "channels_last": False, "compile": False, "fast_teacher": False,
               "teacher_mode": "live (no_grad)"}
KD_VARIANTS = ("kd-live", "kd-live-asloaded", "kd-live-default", "kd-live-fast")


def side_settings(*, amp: str = "none", channels_last: bool = False, compile_: bool = False,
                  fast_teacher: bool = True, variants=("kd-live",)) -> dict:
    """What each side of the comparison runs with: kdlab's ``variants`` (``kdlab.experiments.bench.
    variant_settings``: ``kd-live`` with the options as given and the teacher folded, ``-asloaded``
    unfolded, ``-default`` today's defaults, ``-fast`` bf16 + channels-last + folded), and
    torchdistill's own defaults (``DistillationBox``: fp32, contiguous, eager, teacher as loaded
    under ``no_grad``). With the one variant ``kd-live`` the kdlab side is named ``kdlab``, else
    ``kdlab <variant>``."""
    from kdlab.experiments.bench import variant_settings

    variants = list(variants)
    if variants and not all(variants):
        raise ValueError(f"--variants: an empty name in {','.join(variants)!r}; give comma-separated names "
                         f"from {', '.join(KD_VARIANTS)}")
    bad = [v for v in variants if v not in KD_VARIANTS]
    if bad or not variants or len(set(variants)) != len(variants):
        raise ValueError(f"--against torchdistill times live KD: --variants takes distinct {', '.join(KD_VARIANTS)} "
                         f"(got {', '.join(variants) or 'none'})")
    out = {}
    for v in variants:
        st = variant_settings(v, amp=amp, channels_last=channels_last, compile_=compile_)
        if v == "kd-live":
            st["fast_teacher"] = bool(fast_teacher)
        name = "kdlab" if variants == ["kd-live"] else f"kdlab {v}"
        out[name] = {k: st[k] for k in ("amp", "channels_last", "compile", "fast_teacher")} | {"teacher_mode": "live"}
    out["torchdistill"] = dict(TD_SETTINGS)
    return out


#: The CIFAR ResNets both kdlab's registry and ``torchdistill.models.classification.resnet`` have.
SHARED_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


def check_against(*, teacher: str = "resnet56", student: str = "resnet20", amp: str = "none",
                  variants=("kd-live",)) -> None:
    """Refuse bad arguments of :func:`bench_against_torchdistill` with one line, before anything
    is printed and whether or not torchdistill is installed."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp takes none, bf16 or fp16 (got {amp!r})")
    side_settings(amp=amp, variants=variants)
    for flag, name in (("--teacher", teacher), ("--student", student)):
        if name not in SHARED_RESNETS:
            raise ValueError(f"--against torchdistill needs a CIFAR ResNet both tools have ({', '.join(SHARED_RESNETS)}); "
                             f"got {flag} {name}")


def bench_against_torchdistill(*, teacher: str = "resnet56", student: str = "resnet20", batch_size: int = 64,
                               steps: int = 5, repeats: int = 3, amp: str = "none", channels_last: bool = False,
                               compile_: bool = False, fast_teacher: bool = True, variants=("kd-live",),
                               log=print) -> list[dict]:
    """Images/s of kdlab's and torchdistill's live KD epochs, alternating (see the module doc);
    ``[]`` (and one line) when torchdistill or torchvision is not installed. ``amp``,
    ``channels_last``, ``compile_``, ``fast_teacher``, ``variants`` (:func:`side_settings`): kdlab's
    sides only; each row holds its side's ``settings`` and its ratio over torchdistill."""
    check_against(teacher=teacher, student=student, amp=amp, variants=variants)  # before the optional imports
    try:
        import torchvision  # noqa: F401
        from torchdistill.models.classification import resnet as td_resnet
    except ImportError as e:
        log(f"bench: --against torchdistill skipped: {e.name or e} is not installed "
            f"(pip install torchdistill torchvision, in a separate environment; see docs/speed.md)")
        return []
    import torch

    from kdlab.experiments.bench import bench_recipe, format_settings, synthetic_splits
    from kdlab.models import create_model
    from kdlab.train.build import build_run
    from kdlab.train.trainer import Trainer

    settings = side_settings(amp=amp, channels_last=channels_last, compile_=compile_, fast_teacher=fast_teacher,
                             variants=variants)
    splits = synthetic_splits(batch_size * steps, 3, 32, 10)
    mean, std = torch.tensor(splits.info.mean).view(1, 3, 1, 1), torch.tensor(splits.info.std).view(1, 3, 1, 1)
    x = (splits.train.x - mean) / std
    dataset = torch.utils.data.TensorDataset(x, splits.train.y)
    torch.manual_seed(0)
    td_box = _torchdistill_box(getattr(td_resnet, teacher)(num_classes=10).eval(),
                               getattr(td_resnet, student)(num_classes=10), dataset, batch_size, 0.05)
    for name, st in settings.items():
        log(f"  {name:<22} settings: {format_settings(st)}")
    t_model = create_model(teacher, num_classes=10, in_channels=3).eval()
    times: dict = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        for name, st in settings.items():
            if name == "torchdistill":
                sides[name] = lambda e: _td_epoch(td_box, e)
                continue
            r = bench_recipe("kd", student=student, teacher=teacher, batch_size=batch_size,
                             layer_pair=("layer3", "layer3"), mask_steps=1, mode="live", amp=st["amp"],
                             channels_last=st["channels_last"], compile_=st["compile"],
                             fast_teacher=st["fast_teacher"])
            r = r.model_copy(update={"train": r.train.model_copy(update={"lr": 0.05, "device": "cpu"})})
            run = build_run(r, splits=splits, teacher=t_model)
            tr = Trainer(run.objective, run.train_loader, None, None, r.train, Path(tmp) / name.replace(" ", "_"),
                         runtime=run.runtime, progress=False, method="kd")
            sides[name] = tr.train_epoch
        for side in sides.values():  # untimed warm-up epoch each
            side(0)
        for k in range(repeats):
            for name, side in sides.items():
                t0 = time.perf_counter()
                side(k + 1)
                times[name].append(time.perf_counter() - t0)
    n = batch_size * steps
    rows = []
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        rows.append({"tool": name, "images_per_s": n / med, "images_per_s_rounds": [n / t for t in ts],
                     "settings": settings[name]})
        log(f"  {name:<22} {n / med:9.1f} img/s (median of {len(ts)}; rounds "
            f"{', '.join(f'{n / t:.1f}' for t in ts)})")
    td = next(r["images_per_s"] for r in rows if r["tool"] == "torchdistill")
    for row in rows:
        row["ratio_over_torchdistill"] = row["images_per_s"] / td
        if row["tool"] != "torchdistill":
            log(f"{row['tool']}/torchdistill: {row['ratio_over_torchdistill']:.2f}x "
                f"({format_settings(row['settings'])})")
    return rows
