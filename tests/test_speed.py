"""Issue 30: the folded frozen teacher, the compiled step, bf16 teacher cache (see docs/speed.md)."""

import copy
import os
import time

import pytest
import torch
from torch import nn

from kdlab.models import create_model
from kdlab.models.fold import conv_bn_pairs, fold_batchnorm
from kdlab.models.taps import Taps


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def _bn_output_by_hand(conv: nn.Conv2d, bn: nn.BatchNorm2d, x):
    """The BatchNorm formula written out (not through torch's BN module)."""
    y = conv(x)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
    return (y - bn.running_mean.view(1, -1, 1, 1)) * s + bn.bias.view(1, -1, 1, 1)


def test_fold_single_pair_matches_formula():
    torch.manual_seed(0)
    m = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 5, 5)
    f = fold_batchnorm(m)
    assert f.pairs == [("0", "1")] and isinstance(f.model[1], nn.Identity)
    with torch.no_grad():
        want = _bn_output_by_hand(m[0], m[1], x)
        assert torch.allclose(f.model(x), want, atol=1e-5, rtol=0)
    assert isinstance(m[1], nn.BatchNorm2d)  # the original is untouched


CASES = [  # (model, kwargs, input shape, tapped layers)
    ("resnet56", {}, (4, 3, 32, 32), ["layer3", "layer2"]),
    ("resnet20", {}, (4, 3, 32, 32), ["layer3"]),
    ("resnet18", {"width": 0.5, "cbam": True}, (4, 1, 8, 8), ["layer2"]),
    ("cnn_small", {}, (4, 3, 32, 32), ["stage2"]),
]


@pytest.mark.parametrize("name,kw,shape,layers", CASES)
def test_folded_teacher_logits_and_features_equal(name, kw, shape, layers):
    torch.manual_seed(1)
    model = _randomise_bn(create_model(name, num_classes=10, in_channels=shape[1], **kw))
    before = copy.deepcopy(model.state_dict())
    f = fold_batchnorm(model, keep=layers)
    assert f.reason is None
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(f.pairs) >= n_bn - 4 and len(f.pairs) > 0  # (nearly) every BN follows a conv
    assert not any(isinstance(f.model.get_submodule(b), nn.BatchNorm2d) for _, b in f.pairs)
    x = torch.randn(*shape)
    with torch.inference_mode(), Taps(model, layers, detach=True) as t0, Taps(f.model, layers, detach=True) as t1:
        a = model(x)
        b = f.model(x.contiguous(memory_format=torch.channels_last))
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))
        for layer in layers:
            fa, fb = t0[layer], t1[layer]
            assert (fa - fb).abs().max() <= 1e-5 * max(1.0, float(fa.abs().max())), layer
    for k, v in model.state_dict().items():  # never edited in place
        assert torch.equal(v, before[k]), k
    assert model.training is False


def test_tapped_conv_is_not_folded():
    m = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    pairs, reason = conv_bn_pairs(m, keep=["0"])
    assert reason is None and pairs == [("3", "4")]


def test_conv_with_two_users_is_not_folded():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the raw conv output is used too: folding would change it

    assert conv_bn_pairs(Two().eval())[0] == []


def test_untraceable_model_is_not_folded():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.bn(self.conv(x))
            return x

    f = fold_batchnorm(Dyn())
    assert f.pairs == [] and "cannot be traced" in f.reason


def _tiny_recipe(tmp_path, **train):
    from kdlab.train.recipe import Recipe

    return Recipe.model_validate({
        "name": "speed-tiny", "data": {"name": "digits", "val_fraction": 0.1},
        "teacher": {"model": "cnn_small"}, "student": {"model": "cnn_tiny"},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "device": "cpu", **train},
        "loss": [{"term": "kd", "weight": 1.0, "T": 4.0}],
    })


def test_live_source_runs_a_folded_copy_with_the_same_outputs():
    from kdlab.distill.teachers import build_teacher_source, teacher_plan

    torch.manual_seed(0)
    t = _randomise_bn(create_model("resnet20", num_classes=10, in_channels=3))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    fast = build_teacher_source(t, plan=teacher_plan("live"), layers=["layer3"], channels_last=True)
    slow = build_teacher_source(t, plan=teacher_plan("live"), layers=["layer3"], fast=False)
    assert slow.teacher is t and fast.teacher is not t
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.teacher.modules())
    a, b = slow(x, y), fast(x, y)
    assert (a.logits - b.logits).abs().max() <= 1e-5 * max(1.0, float(a.logits.abs().max()))
    fa, fb = a.feats["layer3"], b.feats["layer3"]
    assert fb.is_contiguous() and (fa - fb).abs().max() <= 1e-5 * max(1.0, float(fa.abs().max()))
    # the same teacher and layers: one shared copy; weights changed in place: a new copy
    again = build_teacher_source(t, plan=teacher_plan("live"), layers=["layer3"], channels_last=True)
    assert again.teacher is fast.teacher
    with torch.no_grad():
        t.fc.weight.add_(1.0)
    changed = build_teacher_source(t, plan=teacher_plan("live"), layers=["layer3"], channels_last=True)
    assert changed.teacher is not fast.teacher
    assert torch.allclose(changed(x, y).logits, slow(x, y).logits, atol=1e-4)


def test_bf16_cache_plan_rounds_through_bf16():
    from kdlab.distill.teachers import build_teacher_source, teacher_plan

    plan = teacher_plan("cache-bf16")
    assert plan.round_to == torch.bfloat16 and plan.cached
    lin = nn.Linear(4, 3)
    src = build_teacher_source(lin, plan=plan)
    x = torch.randn(5, 4)
    got = src(x, torch.zeros(5, dtype=torch.long)).logits
    with torch.no_grad():
        want = lin(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, want.to(torch.bfloat16).float())  # exactly one bf16 rounding
    assert (got - want).abs().max() <= 2 ** -8 * want.abs().max()


def _kd_losses(compile_: bool, epochs: int = 5):
    """Per-step training losses of a tiny KD run (one step per epoch) on synthetic data."""
    import tempfile
    from pathlib import Path

    from kdlab.train.recipe import recipe_from_dict
    from kdlab.data.splits import DatasetInfo, Splits, TensorSet
    from kdlab.train.build import build_run
    from kdlab.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    info = DatasetInfo(name="synthetic", num_classes=3, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,),
                       classes=("0", "1", "2"))
    small = TensorSet(x[:4], y[:4])
    splits = Splits(train=TensorSet(x, y), val=small, test=small, info=info)
    r = recipe_from_dict({
        "name": "compile-test", "data": {"name": "cifar10"}, "student": {"model": "cnn_tiny"},
        "teacher": {"model": "cnn_tiny"},
        "train": {"epochs": epochs, "batch_size": 16, "device": "cpu", "teacher_mode": "live", "lr": 0.05,
                  "compile": compile_, "patience": None},
        "loss": [{"term": "ce", "weight": 0.5}, {"term": "kd", "weight": 0.5, "T": 4.0}],
    }, "test")
    torch.manual_seed(0)
    teacher = create_model("cnn_tiny", num_classes=3, in_channels=1)
    run = build_run(r, splits=splits, teacher=teacher)
    warmup_at_setup = run.objective.compile_warmup_s if compile_ else 0.0  # after the probe batch
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(run.objective, run.train_loader, None, None, r.train, Path(tmp) / "r",
                     runtime=run.runtime, progress=False, method="kd")
        losses = [tr.train_epoch(e)["loss"] for e in range(epochs)]
        assert len(tr.first_steps_s) == (2 if compile_ else 0)
        assert tr.compile_train_warmup_s == (max(0.0, tr.first_steps_s[0] - tr.first_steps_s[1]) if compile_ else 0.0)
        train_warmup = tr.compile_train_warmup_s
    return losses, run.objective, warmup_at_setup, train_warmup


def test_compiled_step_follows_the_eager_trajectory():
    import shutil

    if not hasattr(torch, "compile") or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile needs a C++ compiler on the CPU; none here")
    t0 = time.perf_counter()
    eager, _, _, _ = _kd_losses(False)
    compiled, obj, warmup_at_setup, train_warmup = _kd_losses(True)
    from kdlab.models.compiled import Compiled

    assert isinstance(obj.forward_model, Compiled)
    if obj.forward_model.fallback:
        pytest.skip(f"torch.compile failed here ({obj.forward_model.fallback}); the run fell back to eager")
    assert obj.forward_model.compiled is not None and obj.compile_warmup_s > 0
    # the first compiled calls are the set-up's probe batch (docs/speed.md): training adds nothing
    assert obj.forward_model.warmup_s > 0 and obj.teacher.runner.warmup_s > 0
    assert obj.compile_warmup_s == warmup_at_setup
    # the first training step compiles again (train mode, the backward graph): measured apart
    assert train_warmup > 0.05
    assert obj.teacher.runner is not obj.teacher.teacher  # KD taps nothing: the teacher forward compiles too
    assert len(eager) == 5 and eager[0] != eager[-1]  # the run learns: the trajectory is not flat
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (eager, compiled)
    print(f"compile test: {time.perf_counter() - t0:.1f} s")


def test_compile_falls_back_with_one_line(capsys):
    from kdlab.models.compiled import Compiled

    class Bad(nn.Module):
        def forward(self, x):
            return x + 1

    c = Compiled(Bad(), "student")
    c.compiled = lambda x: (_ for _ in ()).throw(torch._dynamo.exc.Unsupported("no"))  # a compile error
    out = c(torch.zeros(2))
    assert torch.equal(out, torch.ones(2)) and c.compiled is None and c.fallback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: student not compiled")


def test_against_torchdistill_skips_with_one_line_when_missing(capsys):
    import importlib.util

    from kdlab.experiments.against import bench_against_torchdistill

    if importlib.util.find_spec("torchdistill") and importlib.util.find_spec("torchvision"):
        pytest.skip("torchdistill is installed here: the comparison would run (bench/speed_issue30.sh)")
    lines = []
    assert bench_against_torchdistill(steps=1, repeats=1, log=lines.append) == []
    assert len(lines) == 1 and "skipped" in lines[0] and "not installed" in lines[0]


def test_bench_variants_report_before_after_and_data_wait():
    from kdlab.experiments.bench import bench_steps

    lines = []
    rows = bench_steps(teacher="cnn_tiny", student="cnn_tiny", batch_size=8, steps=2, image_size=8,
                       channels=1, variants=("kd-live-asloaded", "kd-live"), repeats=2, log=lines.append)
    assert [r["variant"] for r in rows] == ["kd-live-asloaded", "kd-live"]
    for r in rows:
        assert len(r["images_per_s_rounds"]) == 2  # every round reported
        assert 0.0 <= r["data_wait_fraction"] < 1.0
    assert all("waiting for data" in l for l in lines)


def test_bf16_amp_runs_the_teacher_in_bf16():
    from kdlab.distill.teachers import build_teacher_source, teacher_plan

    torch.manual_seed(0)
    t = _randomise_bn(create_model("resnet20", num_classes=10, in_channels=3))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    fp32 = build_teacher_source(t, plan=teacher_plan("live"), layers=["layer3"])(x, y)
    src = build_teacher_source(t, plan=teacher_plan("live"), layers=["layer3"], amp="bf16")
    seen = {}
    h = src.teacher.fc.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))  # returns None
    bf = src(x, y)
    h.remove()
    assert seen["dtype"] == torch.bfloat16 and bf.logits.dtype == torch.float32
    # bf16 keeps 8 significant bits: the logits agree with fp32 to a few per cent of their scale
    scale = float(fp32.logits.abs().max())
    assert 0 < (bf.logits - fp32.logits).abs().max() <= 0.1 * scale


def test_streamed_loader_with_workers_gives_the_same_batches_every_epoch():
    from kdlab.data.streaming import DatasetLoader

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.rand(10, 1, 4, 4, generator=g), torch.arange(10) % 3)
    plain = DatasetLoader(ds, 4, seed=3, num_workers=0)
    workers = DatasetLoader(ds, 4, seed=3, num_workers=2)
    for e in (0, 1, 2):  # the persistent workers serve each epoch's own order
        a, b = list(plain.epoch(e)), list(workers.epoch(e))
        assert len(a) == len(b) == 3
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert workers.__dict__["_held"][1].persistent_workers
    x0 = [x for x, _, _ in plain.epoch(0)]
    x1 = [x for x, _, _ in plain.epoch(1)]
    assert not all(torch.equal(p, q) for p, q in zip(x0, x1))  # epochs differ (shuffled)


def test_features_only_forward_stops_after_the_deepest_tapped_layer():
    from kdlab.distill.teachers import LiveTeacher

    torch.manual_seed(0)
    t = _randomise_bn(create_model("resnet20", num_classes=10, in_channels=3))
    live = LiveTeacher(t, ["layer2"], [], None)
    x = torch.randn(2, 3, 32, 32)
    ran = []
    h = t.layer3.register_forward_hook(lambda m, i, o: ran.append(1))
    first = live.features(x, ["layer2", "layer1"])  # first call: whole forward, calls counted
    assert len(ran) == 1
    again = live.features(x, ["layer2", "layer1"])  # then: stops after layer2, layer3 never runs
    h.remove()
    assert len(ran) == 1
    _, full = live.forward(x, ["layer2", "layer1"])
    for n in ("layer1", "layer2"):
        assert torch.equal(first[n], full[n]) and torch.equal(again[n], full[n])


def test_features_only_forward_runs_whole_when_a_tapped_module_runs_twice():
    from kdlab.distill.teachers import LiveTeacher

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(2, 2, 1)
            self.head = nn.Linear(2, 3)

        def forward(self, x):
            x = self.block(self.block(x))  # the same module twice: a tap keeps the second output
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    m = Shared()
    live = LiveTeacher(m, ["block"], [], None)
    x = torch.randn(1, 2, 3, 3)
    for _ in range(2):
        got = live.features(x, ["block"])["block"]
        with torch.no_grad():
            want = m.block(m.block(x))
        assert torch.allclose(got, want)
    assert live._single_call[("block",)] is False


def test_uncopyable_model_is_returned_as_it_is():
    class NoCopy(nn.Sequential):
        def __deepcopy__(self, memo):
            raise TypeError("no copies")

    m = NoCopy(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    f = fold_batchnorm(m)
    assert f.model is m and f.pairs == [] and "cannot be copied" in f.reason
    assert isinstance(m[1], nn.BatchNorm2d)
