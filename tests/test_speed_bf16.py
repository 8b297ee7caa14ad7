"""Issue 30, the fast settings end to end: bf16 + channels-last for live, cached and masked runs,
the one line on CPUs that only emulate bf16, `kdlab bench`'s table without a baseline and
`--against`'s settings of each side."""

import tempfile
from pathlib import Path

import pytest
import torch

from kdlab.data.splits import DatasetInfo, Splits, TensorSet
from kdlab.models import create_model
from kdlab.train.recipe import recipe_from_dict

KD = [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0}]
MASKED = KD + [{"term": "attn", "weight": 10.0, "layers": [["stage2", "stage2"]]}]


def _splits(n=32, c=3, size=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, c, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
    info = DatasetInfo(name="synthetic", num_classes=classes, in_channels=c, image_size=size,
                       mean=(0.5,) * c, std=(0.25,) * c, classes=tuple(map(str, range(classes))))
    small = TensorSet(x[:8], y[:8])
    return Splits(train=TensorSet(x, y), val=small, test=small, info=info)


def _recipe(loss, *, amp="none", channels_last=False, mode="live", model="resnet20", epochs=5, batch=32,
            fast=True):
    masked = any(t["term"] == "attn" for t in loss)
    return recipe_from_dict({
        "name": "bf16-test", "data": {"name": "cifar10"},
        "student": {"model": model}, "teacher": {"model": model},
        "train": {"epochs": epochs, "batch_size": batch, "lr": 0.05, "device": "cpu", "teacher_mode": mode,
                  "amp": amp, "channels_last": channels_last, "fast_teacher": fast, "patience": None},
        "loss": loss,
        "mask": {"method": "ig", "steps": 2, "q": 0.5, "kind": "binary"} if masked else None,
    }, "test")


def _losses(recipe, splits, teacher, store=None):
    """Per-epoch training losses (one step per epoch when the batch holds the whole set)."""
    from kdlab.train.build import build_run
    from kdlab.train.trainer import Trainer

    run = build_run(recipe, splits=splits, teacher=teacher, store=store)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(run.objective, run.train_loader, None, None, recipe.train, Path(tmp) / "r",
                     runtime=run.runtime, progress=False, method="kd")
        return [tr.train_epoch(e)["loss"] for e in range(recipe.train.epochs)], run


def test_bf16_channels_last_kd_follows_the_fp32_trajectory():
    """5 live KD steps of resnet20 -> resnet20 (both models under bf16 autocast, channels-last,
    teacher folded) against the same 5 steps in fp32. bf16 keeps 8 significant bits: one rounding
    is off by at most 2^-9 relative; a convolution's output is rounded once, so resnet20's ~20
    layers bound the logits' relative error by about 20 * 2^-9 = 3.9 % (errors of that size
    at worst, usually far smaller and partly cancelling). Each step's loss must stay within 5 %
    of fp32's, and differ from it (bf16 really ran)."""
    splits = _splits()
    torch.manual_seed(1)
    teacher = create_model("resnet20", num_classes=4, in_channels=3).eval()
    fp32, _ = _losses(_recipe(KD), splits, teacher)
    bf16, run = _losses(_recipe(KD, amp="bf16", channels_last=True), splits, teacher)
    seen = {}
    hooks = [run.objective.student.fc.register_forward_hook(lambda m, i, o: seen.update(student=o.dtype)),
             run.objective.teacher.teacher.fc.register_forward_hook(lambda m, i, o: seen.update(teacher=o.dtype))]
    x, y, idx = next(iter(run.train_loader.epoch(0)))
    run.objective.record((x, y, idx), 0, 0)
    for h in hooks:
        h.remove()
    assert seen == {"student": torch.bfloat16, "teacher": torch.bfloat16}
    assert run.objective.teacher.teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(fp32) == len(bf16) == 5
    rel = [abs(b - f) / abs(f) for b, f in zip(bf16, fp32)]
    assert max(rel) <= 0.05, rel
    assert max(rel) > 0  # not the fp32 run again


def _digits():
    from kdlab.data import load_dataset

    return load_dataset("digits", val_fraction=0.1, label_fraction=0.1, seed=0)


@pytest.mark.parametrize("mode", ["cache-fp16", "cache-bf16"])
def test_bf16_cached_and_masked_runs_equal_their_uncached_reruns(mode):
    """bf16 + channels-last with the teacher cache (stored in fp16 or bf16): KD fills the logits, the
    masked method adds the IG masks; each run's loss history equals the same run without the store,
    exactly (the live path rounds through the storage precision like the store)."""
    from kdlab.distill.teachers import TeacherStore

    splits = _digits()
    torch.manual_seed(123)
    teacher = create_model("cnn_tiny", num_classes=10, in_channels=1).eval()
    kw = dict(amp="bf16", channels_last=True, mode=mode, model="cnn_tiny", epochs=2)
    store = TeacherStore()
    kd_c, _ = _losses(_recipe(KD, **kw), splits, teacher, store)
    misses = store.misses
    full_c, _ = _losses(_recipe(MASKED, **kw), splits, teacher, store)
    assert store.misses == 2 * misses  # the masked run computed its masks (features), once per batch
    kd_l, _ = _losses(_recipe(KD, **kw), splits, teacher)
    full_l, _ = _losses(_recipe(MASKED, **kw), splits, teacher)
    assert kd_c == kd_l and full_c == full_l
    assert full_c != kd_c  # the masked term took part


def test_masks_stay_fp32_under_bf16():
    """With train.amp: bf16 the teacher's logits come from a bf16 forward, its causal masks from an
    fp32 one: they equal causal_masks of the same (folded) teacher computed in fp32, exactly."""
    from kdlab.core.config import MaskCfg
    from kdlab.distill.masks import causal_masks
    from kdlab.distill.teachers import build_teacher_source, teacher_plan

    torch.manual_seed(0)
    t = create_model("resnet20", num_classes=10, in_channels=3).eval()
    cfg = MaskCfg(method="ig", steps=2, q=0.5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    src = build_teacher_source(t, plan=teacher_plan("live"), mask_layers=["layer2"], mask_cfg=cfg, amp="bf16",
                               channels_last=True)
    out = src(x.contiguous(memory_format=torch.channels_last), y)
    want = causal_masks(src.teacher, x, y, ["layer2"], cfg)["layer2"]
    assert out.masks["layer2"].dtype == torch.float32
    assert torch.equal(out.masks["layer2"], want.float())
    with torch.no_grad():
        fp32_logits = src.teacher(x)
    assert not torch.equal(out.logits, fp32_logits)  # the logits' forward did run in bf16


def test_channels_last_without_folding_runs_an_unfolded_copy():
    """train.fast_teacher: false with train.channels_last: true: the source runs a channels-last copy
    of the teacher as loaded (BatchNorm kept); the user's model is not edited; same outputs."""
    from kdlab.distill.teachers import build_teacher_source, teacher_plan

    torch.manual_seed(0)
    t = create_model("resnet20", num_classes=10, in_channels=3).eval()
    src = build_teacher_source(t, plan=teacher_plan("live"), layers=["layer2"], fast=False, channels_last=True)
    assert src.teacher is not t
    assert isinstance(src.teacher.bn1, torch.nn.BatchNorm2d)  # not folded
    assert src.teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert t.conv1.weight.is_contiguous()  # the user's teacher keeps its layout
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    got = src(x, y)
    with torch.no_grad():
        want = t(x)
    assert torch.allclose(got.logits, want, atol=1e-5 * float(want.abs().max()))
    assert got.feats["layer2"].is_contiguous()  # losses get the contiguous layout
    plain = build_teacher_source(t, plan=teacher_plan("live"), fast=False)
    assert plain.teacher is t  # neither option: the teacher as loaded


def test_emulated_bf16_is_said_in_exactly_one_line(monkeypatch, capsys):
    import kdlab.core.device as device
    from kdlab.train.runtime import Runtime

    monkeypatch.setattr(device, "_BF16_NOTED", set())
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: False)
    Runtime("cpu", "bf16", dist=None)
    Runtime("cpu", "bf16", dist=None)
    Runtime("cpu", "none", dist=None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "emulated" in err[0] and err[0].startswith("kdlab:")
    monkeypatch.setattr(device, "_BF16_NOTED", set())
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: True)
    Runtime("cpu", "bf16", dist=None)
    assert capsys.readouterr().err == ""


def test_native_bf16_check_reads_the_cpu_flags():
    """On Linux x86 the answer is the kernel's flag list: avx512_bf16 or amx_bf16/amx_tile."""
    import platform

    from kdlab.core.device import cpu_native_bf16

    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.is_file():
        pytest.skip("needs Linux on x86-64")
    flags = set(next(l for l in info.read_text().splitlines() if l.startswith("flags")).split(":", 1)[1].split())
    assert cpu_native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


def test_bench_table_without_a_baseline_says_dash():
    from kdlab.experiments.bench import bench_steps, format_table

    rows = bench_steps(teacher="cnn_tiny", student="cnn_tiny", batch_size=8, steps=1, image_size=8, channels=1,
                       variants=("kd-live",), repeats=1, log=lambda *a: None)
    assert rows[0]["cost_vs_baseline"] is None
    table = format_table(rows)
    assert "| kd-live |" in table and "| — |" in table and "nan" not in table
    rows = bench_steps(teacher="cnn_tiny", student="cnn_tiny", batch_size=8, steps=1, image_size=8, channels=1,
                       variants=("baseline", "kd-live"), repeats=1, log=lambda *a: None)
    assert rows[0]["cost_vs_baseline"] == 1.0
    assert rows[1]["cost_vs_baseline"] == pytest.approx(rows[0]["images_per_s"] / rows[1]["images_per_s"])


def test_against_settings_apply_to_kdlab_only():
    from kdlab.experiments.against import side_settings
    from kdlab.experiments.bench import format_settings

    s = side_settings(amp="bf16", channels_last=True)
    assert list(s) == ["kdlab", "torchdistill"]
    assert s["kdlab"]["amp"] == "bf16" and s["kdlab"]["channels_last"] and not s["kdlab"]["compile"]
    assert s["torchdistill"]["amp"] == "none" and not s["torchdistill"]["channels_last"]
    assert format_settings(s["kdlab"]) == "amp bf16, channels-last, eager, teacher folded"
    assert format_settings(s["torchdistill"]) == "amp none, contiguous, eager, teacher as loaded"
    # several kdlab sides, one torchdistill: today's defaults and the fast settings, whatever the flags
    s = side_settings(amp="fp16", variants=["kd-live-default", "kd-live-fast"])
    assert list(s) == ["kdlab kd-live-default", "kdlab kd-live-fast", "torchdistill"]
    assert format_settings(s["kdlab kd-live-default"]) == "amp none, contiguous, eager, teacher as loaded"
    assert format_settings(s["kdlab kd-live-fast"]) == "amp bf16, channels-last, eager, teacher folded"
    with pytest.raises(ValueError, match="live KD"):
        side_settings(variants=["full-live"])


def test_variant_suffixes_set_their_own_settings():
    from kdlab.experiments.bench import bench_steps, variant_settings

    flags = dict(amp="fp16", channels_last=True, compile_=False)
    assert variant_settings("kd-live", **flags) == {"kind": "kd", "how": "live", "amp": "fp16", "channels_last": True,
                                                    "compile": False, "fast_teacher": True}
    assert variant_settings("kd-cached-asloaded", **flags)["fast_teacher"] is False
    assert variant_settings("full-live-default", **flags) == {"kind": "full", "how": "live", "amp": "none",
                                                              "channels_last": False, "compile": False,
                                                              "fast_teacher": False}
    assert variant_settings("baseline-fast")["amp"] == "bf16" and variant_settings("baseline-fast")["kind"] == "baseline"
    for bad in ("kd", "kd-live-slow", "kd-live-fast-fast"):
        with pytest.raises(ValueError, match="unknown"):
            variant_settings(bad)
    lines = []
    rows = bench_steps(teacher="cnn_tiny", student="cnn_tiny", batch_size=8, steps=1, image_size=8, channels=1,
                       variants=("kd-live-default", "kd-live-fast"), repeats=1, log=lines.append)
    assert [r["settings"]["amp"] for r in rows] == ["none", "bf16"]
    assert [r["settings"]["channels_last"] for r in rows] == [False, True]
    assert "amp bf16, channels-last" in lines[1]
