"""Issue 29 (train-features): small settings reach the teacher and DeepInversion, the thread rule,
progress lines when piped, and kdlab.fit's visible signature."""

import inspect
import io
import json

import pytest
import torch
from torch import nn

from kdlab.core.progress import PlainLines, Silent, progress_bar
from kdlab.core.threads import choose_threads


# -- small settings reach everything -------------------------------------------------------------
def test_synthesis_runs_the_given_steps_per_batch():
    from kdlab.distill.inversion import synthesize

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    teacher.eval()
    steps = []
    x, y = synthesize(teacher, 5, (1, 6, 6), 3, iters=3, batch_size=2, steps_done=steps)
    assert steps == [3, 3, 3]  # ceil(5 / 2) batches of 3 steps each
    assert x.shape == (5, 1, 6, 6) and y.shape == (5,)


def test_train_epochs_bounds_deepinversion_and_its_teacher():
    from kdlab.experiments.paradigms.deepinv import DeepInvParams, synthesis_steps
    from kdlab.experiments.paradigms.spec import load_paradigm

    assert synthesis_steps(DeepInvParams(iters=200), 2) == 20  # 10 steps per epoch × 2 epochs
    assert synthesis_steps(DeepInvParams(iters=200), 30) == 200  # the full setting is unchanged
    full = load_paradigm("paradigms/digits/deepinv")
    small = load_paradigm("paradigms/digits/deepinv", ["train.epochs=2"])
    assert full.recipe.teacher.epochs is None
    assert small.recipe.teacher.epochs == 2
    ck_full, ck_small = full.recipe.teacher.checkpoint, small.recipe.teacher.checkpoint
    from pathlib import Path

    assert Path(ck_small).parent.name == Path(ck_full).parent.name + "-e2"  # never the full teacher's file
    assert synthesis_steps(small.params, small.recipe.train.epochs) == 20


def test_train_epochs_reaches_the_teacher_trained_on_the_way(tmp_path, monkeypatch):
    from kdlab.train.recipe import load_recipe
    from kdlab.train import build

    r = load_recipe("methods/digits/kd", ["train.epochs=1"])
    assert r.teacher.epochs == 1 and "-e1" in r.teacher.checkpoint
    ck = tmp_path / "teacher-e1" / "best.pt"
    r = r.derive(teacher={**r.teacher.model_dump(mode="json"), "checkpoint": str(ck)})
    trained = []

    class Stop(Exception):
        pass

    def fake_train(rec, out, **k):  # record the epochs the teacher would train for, then stop
        trained.append(rec.train.epochs)
        raise Stop

    monkeypatch.setattr(build, "train", fake_train)
    with pytest.raises(Stop):
        build.ensure_teachers(r, progress=False, log=lambda *a: None)
    assert trained == [1]  # the teacher recipe's 30 epochs bounded to 1


# -- threads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_params, cpus, load, want", [
    (60_000, 16, 0.0, 1),        # tiny model: one thread even on an idle 16-core machine
    (5_000_000, 16, 0.0, 2),     # medium: at most 2
    (5_000_000, 2, 1.8, 1),      # medium on a busy 2-core machine: round(2 - 1.8) = 0 -> 1
    (20_000_000, 16, 0.0, 16),   # large on an idle machine: every core
    (20_000_000, 16, 11.6, 4),   # large, 11.6 runnable: round(4.4) = 4 free cores
    (20_000_000, 4, 9.0, 1),     # overloaded: still one
])
def test_thread_choice_rule(n_params, cpus, load, want):
    assert choose_threads(n_params, cpus=cpus, load=load) == want


def test_explicit_thread_settings_win(monkeypatch):
    from types import SimpleNamespace

    from kdlab.train.trainer import Determinism

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("KDLAB_THREADS", raising=False)
    assert Determinism(SimpleNamespace(threads=None), n_params=1000).threads == 1  # chosen
    assert Determinism(SimpleNamespace(threads=3), n_params=1000).threads == 3  # train.threads
    assert Determinism(SimpleNamespace(threads=None), n_params=1000, recorded=2).threads == 2  # resumed
    monkeypatch.setenv("KDLAB_THREADS", "3")  # a command's --threads (pin_threads)
    assert Determinism(SimpleNamespace(threads=None), n_params=1000).threads is None
    monkeypatch.delenv("KDLAB_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert Determinism(SimpleNamespace(threads=None), n_params=1000).threads is None  # the environment's


# -- progress -------------------------------------------------------------------------------------
def test_piped_progress_is_plain_lines():
    out = io.StringIO()  # not a terminal
    bar = progress_bar(8, "DeepInversion batch 3 of 8", "step", stream=out, every_s=0.0)
    assert isinstance(bar, PlainLines)
    for _ in range(8):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 8  # every_s=0: a line per step before the last, and one at the end
    assert lines[-1].startswith("DeepInversion batch 3 of 8: 8/8 step (100%)")


def test_progress_silent_off_rank_zero_and_when_disabled(monkeypatch):
    out = io.StringIO()
    assert isinstance(progress_bar(5, "x", stream=out, enabled=False), Silent)
    monkeypatch.setenv("RANK", "1")
    assert isinstance(progress_bar(5, "x", stream=out), Silent)
    monkeypatch.setenv("RANK", "0")
    assert isinstance(progress_bar(5, "x", stream=out), PlainLines)


def test_robustness_progress_piped_has_no_carriage_returns(capsys):
    from kdlab.data.splits import TensorSet
    from kdlab.evaluate.robustness import evaluate_robustness
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    ts = TensorSet(torch.rand(6, 3, 8, 8), torch.arange(6) % 10)
    info = SimpleNamespace(name="t", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=10)
    evaluate_robustness({"m": model}, ts, info, corruptions=["gaussian_noise"], severities=[1],
                        batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "robustness: 4/4 batch (100%)" in err  # 2 batches × (clean + 1)


# -- kdlab.fit ------------------------------------------------------------------------------------
def test_fit_shows_its_real_signature():
    import kdlab
    import kdlab.api

    for name in ("fit", "fit_recipe"):
        lazy, real = inspect.signature(getattr(kdlab, name)), inspect.signature(getattr(kdlab.api, name))
        assert [(p.name, p.kind, p.default) for p in lazy.parameters.values()] == \
            [(p.name, p.kind, p.default) for p in real.parameters.values()]


# -- MLflow ---------------------------------------------------------------------------------------
def test_mlflow_logger_logs_params_steps_epochs_and_test(tmp_path, monkeypatch):
    """``train.log_to: [mlflow]`` through a stand-in ``mlflow`` module that records the calls."""
    import sys
    import types

    from kdlab.api import fit

    calls = []
    fake = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(fake, name, (lambda n: lambda *a, **k: calls.append((n, a, k)))(name))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 4, 4, generator=g), torch.arange(24) % 2
    fit(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), train_data=(x, y), val_data=(x, y), test_data=(x, y),
        run_dir=tmp_path / "r", train={"epochs": 2, "batch_size": 8, "log_to": ["csv", "mlflow"]}, progress=False)
    names = [c[0] for c in calls]
    assert names[:4] == ["set_tracking_uri", "set_experiment", "start_run", "log_params"] and names[-1] == "end_run"
    assert calls[0][1][0] == (tmp_path / "r" / "mlruns").resolve().as_uri()
    assert calls[3][1][0]["epochs"] == 2 and calls[3][1][0]["batch_size"] == 8
    metric_calls = [c for c in calls if c[0] == "log_metrics"]
    step_calls = [c for c in metric_calls if "step_loss" in c[1][0]]
    assert [c[2]["step"] for c in step_calls] == list(range(1, 7))  # 24/8 = 3 batches × 2 epochs
    epoch_calls = [c for c in metric_calls if "val_acc" in c[1][0]]
    assert [c[2]["step"] for c in epoch_calls] == [1, 2]
    assert "test_acc" in metric_calls[-1][1][0]
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3


# -- weight EMA -----------------------------------------------------------------------------------
def test_ema_update_by_hand():
    from kdlab.train.trainer import ema_update

    ema = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(0)}
    ema_update(ema, {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(5)}, 0.75)
    assert ema["w"].tolist() == [1.5, 1.5] and int(ema["n"]) == 5  # 0.75·1 + 0.25·3, 0.75·2 + 0


class Snap:
    """A callback keeping the student's weights after every optimiser step."""

    def __init__(self):
        self.seen = []

    def on_fit_start(self, t):
        self.seen.append({k: v.clone() for k, v in t.objective.models()[t.primary].state_dict().items()})

    def on_step_end(self, t, ctx):
        self.seen.append({k: v.clone() for k, v in t.objective.models()[t.primary].state_dict().items()})

    def on_epoch_end(self, t, row):
        pass

    def on_fit_end(self, t, res):
        pass


def _ema_fit(run_dir, callbacks=(), epochs=2, **kw):
    from kdlab.api import fit

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 4, 4, generator=g), torch.arange(16) % 2
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    return fit(student, train_data=(x, y), val_data=(x, y), test_data=(x, y), run_dir=run_dir,
               train={"epochs": epochs, "batch_size": 8, "lr": 0.5, "ema": 0.5, "patience": None, **kw},
               progress=False, callbacks=callbacks)


def test_ema_weights_are_validated_and_saved(tmp_path):
    snap = Snap()
    _ema_fit(tmp_path / "r", callbacks=[snap], epochs=1)
    w = snap.seen  # initial weights, then after steps 1 and 2 (16 images, batch 8)
    assert len(w) == 3
    for k in w[0]:
        e = 0.5 * (0.5 * w[0][k] + 0.5 * w[1][k]) + 0.5 * w[2][k]  # two EMA steps at decay 0.5
        best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)["model"][k]
        assert torch.allclose(best, e, atol=1e-6)
        assert not torch.allclose(best, w[2][k])  # not the live weights


def test_ema_resumes_exactly(tmp_path):
    from kdlab.train import trainer as trainer_mod

    full = _ema_fit(tmp_path / "full", epochs=3)
    real_fit = trainer_mod.Trainer.fit
    trainer_mod.Trainer.fit = lambda self, **kw: real_fit(self, stop_after=1)
    try:
        part = _ema_fit(tmp_path / "part", epochs=3)
    finally:
        trainer_mod.Trainer.fit = real_fit
    assert part.get("interrupted")
    resumed = _ema_fit(tmp_path / "part", epochs=3)
    assert resumed["val_acc"] == full["val_acc"]
    a = torch.load(tmp_path / "full" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- kdlab evaluate reads what the pipeline makes ---------------------------------------------------
def _folder(root, classes=("a", "b"), n=8):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c_i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            base = 40 + 160 * c_i  # class a dark, class b bright: learnable in a few steps
            px = (base + torch.randint(0, 30, (8, 8, 3), generator=g)).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def test_evaluate_imagefolder_checkpoint_from_its_metadata(tmp_path, capsys):
    from kdlab.cli.main import main

    root = _folder(tmp_path / "imgs")
    (tmp_path / "r.yaml").write_text(
        f"name: imf\ndata: {{name: imagefolder, root: {root}, image_size: [8, 8]}}\n"
        f"student: {{model: cnn_tiny}}\ntrain: {{epochs: 1, patience: null, batch_size: 8, lr: 0.05, device: cpu}}\n")
    assert main(["train-teacher", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "best.pt"), "--device", "cpu"]) == 0  # no --dataset, no --data-dir
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["dataset"] == "imagefolder" and res["acc"] == result["test_acc"]


def _digits_test_acc(model, x, y):
    with torch.no_grad():
        return (torch.as_tensor(model(x)).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def digits_test():
    from kdlab.data import load_dataset

    s = load_dataset("digits")
    info = s.info
    x, y = s.test.x, s.test.y
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x - mean) / std, y, info


def _trained_tiny(info):
    """cnn_tiny with seeded random weights (its accuracy is what it is: the checks compare the file's
    evaluation with the in-memory model's, computed here by hand)."""
    from kdlab.models import create_model

    torch.manual_seed(0)
    return create_model("cnn_tiny", num_classes=info.num_classes, in_channels=info.in_channels).eval()


def _base(info):
    return {"model_name": "cnn_tiny", "model_kwargs": {}, "num_classes": info.num_classes,
            "in_channels": info.in_channels, "dataset": "digits"}


def test_evaluate_pruned_checkpoint(tmp_path, digits_test, capsys):
    pytest.importorskip("torch_pruning")
    from kdlab.cli.main import main
    from kdlab.compress import save_compressed
    from kdlab.compress.prune import layer_specs, prune_structured

    x, y, info = digits_test
    pruned = prune_structured(_trained_tiny(info), 0.5, (info.in_channels, 8, 8)).eval()
    path = save_compressed(pruned, tmp_path / "student_pruned50.pt", _base(info),
                           pruned={"method": "structured", "ratio": 0.5, "arch": layer_specs(pruned)},
                           input_shape=[info.in_channels, 8, 8])
    assert main(["evaluate", str(path), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["acc"] == pytest.approx(_digits_test_acc(pruned, x, y), abs=1e-9)
    assert res["n"] == len(y)


def test_evaluate_fp32_and_int8_onnx(tmp_path, digits_test, capsys):
    pytest.importorskip("onnxruntime")
    from kdlab.cli.main import main
    from kdlab.compress.export import OnnxModel, export_onnx
    from kdlab.compress.quantize import quantize_onnx_static

    x, y, info = digits_test
    model = _trained_tiny(info)
    fp32 = export_onnx(model, tmp_path / "student_fp32.onnx", (info.in_channels, 8, 8))
    int8 = quantize_onnx_static(fp32, tmp_path / "student_int8.onnx", [x[:64]])
    for path in (fp32, int8):
        capsys.readouterr()
        assert main(["evaluate", str(path), "--dataset", "digits", "--device", "cpu"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["acc"] == pytest.approx(_digits_test_acc(OnnxModel(path), x, y), abs=1e-9), path.name
    # without --dataset: one error line naming the fix
    assert main(["evaluate", str(int8), "--device", "cpu"]) == 2
    assert "--dataset" in capsys.readouterr().err


# -- RandAugment-lite -----------------------------------------------------------------------------
def test_randaugment_ops_by_hand():
    from kdlab.data.augment import RA_OPS, AugmentParams, AugmentSpec, apply_params

    x = torch.tensor([[0.2, 0.6], [0.8, 0.4]]).view(1, 1, 2, 2)
    spec = AugmentSpec(randaugment=1, magnitude=0.5)

    def run(op, sign=1.0):
        p = AugmentParams(ra_op=torch.tensor([[RA_OPS.index(op)]]), ra_sign=torch.tensor([[sign]]))
        return apply_params(x, spec, p).flatten().tolist()

    assert run("identity") == pytest.approx([0.2, 0.6, 0.8, 0.4])
    assert run("brightness") == pytest.approx([0.29, 0.87, 1.0, 0.58])  # ×1.45, clamped at 1
    assert run("brightness", -1.0) == pytest.approx([0.11, 0.33, 0.44, 0.22])  # ×0.55
    # contrast: μ = 0.5; 0.5 + 1.45·(x − 0.5) = 0.065, 0.645, 0.935, 0.355
    assert run("contrast") == pytest.approx([0.065, 0.645, 0.935, 0.355])
    assert run("solarize") == pytest.approx([0.2, 0.4, 0.2, 0.4])  # x ≥ 0.5 → 1 − x
    # posterize: b = 8 − 2 = 6 bits, floor(x·64)/64
    assert run("posterize") == pytest.approx([12 / 64, 38 / 64, 51 / 64, 25 / 64])
    assert run("autocontrast") == pytest.approx([0.0, 4 / 6, 1.0, 2 / 6])  # (x − 0.2) / 0.6
    two = AugmentSpec(randaugment=2, magnitude=0.5)  # two ops in turn: solarize, then brightness ×0.55
    p = AugmentParams(ra_op=torch.tensor([[3, 1]]), ra_sign=torch.tensor([[1.0, -1.0]]))
    assert apply_params(x, two, p).flatten().tolist() == pytest.approx([0.11, 0.22, 0.11, 0.22])


def test_randaugment_is_seeded_per_epoch_position():
    from kdlab.data import BatchLoader, TensorSet
    from kdlab.data.augment import AugmentSpec

    g = torch.Generator().manual_seed(0)
    ts = TensorSet(torch.rand(12, 3, 6, 6, generator=g), torch.arange(12) % 3)
    spec = AugmentSpec(crop_pad=1, flip=True, randaugment=2, magnitude=0.7)
    a = BatchLoader(ts, 4, shuffle=True, seed=5, augment=spec, mean=(0.5,) * 3, std=(0.25,) * 3)
    b = BatchLoader(ts, 4, shuffle=True, seed=5, augment=spec, mean=(0.5,) * 3, std=(0.25,) * 3)
    e1a = [x for x, _, _ in a.epoch(1)]
    assert all(torch.equal(u, v) for u, v in zip(e1a, [x for x, _, _ in b.epoch(1)]))  # same seed, same epoch
    assert all(torch.equal(u, v) for u, v in zip(e1a, [x for x, _, _ in a.epoch(1)]))  # re-run the epoch
    assert not all(torch.equal(u, v) for u, v in zip(e1a, [x for x, _, _ in a.epoch(2)]))  # another epoch
    plain = BatchLoader(ts, 4, shuffle=True, seed=5, augment=AugmentSpec(crop_pad=1, flip=True), mean=(0.5,) * 3,
                        std=(0.25,) * 3)
    assert not all(torch.equal(u, v) for u, v in zip(e1a, [x for x, _, _ in plain.epoch(1)]))  # it changes images
    assert repr(AugmentSpec(crop_pad=1, flip=True)) == "AugmentSpec(crop_pad=1, flip=True)"  # cache keys kept


def test_randaugment_recipe_trains(tmp_path):
    from kdlab.api import fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 6, 6, generator=g), torch.arange(16) % 2
    res = fit(nn.Sequential(nn.Flatten(), nn.Linear(108, 2)), train_data=(x, y), val_data=(x, y),
              test_data=(x, y), run_dir=tmp_path / "r", augment={"randaugment": 2, "magnitude": 0.3},
              train={"epochs": 1, "batch_size": 8}, progress=False)
    assert res["epochs_run"] == 1


# -- mixup / CutMix -------------------------------------------------------------------------------
def test_mixup_and_cutmix_by_hand():
    from kdlab.data.augment import MixParams, apply_mix

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    perm = torch.tensor([1, 0])
    m = apply_mix(x, MixParams(0.25, perm))
    assert torch.allclose(m[0], 0.25 * x[0] + 0.75 * x[1]) and torch.allclose(m[1], 0.25 * x[1] + 0.75 * x[0])
    c = apply_mix(x, MixParams(0.75, perm, (0, 2, 1, 3)))  # a 2×2 box: rows 0-1, columns 1-2
    assert torch.equal(c[0, 0, 0:2, 1:3], x[1, 0, 0:2, 1:3]) and torch.equal(c[0, 0, 2:, :], x[0, 0, 2:, :])
    assert torch.equal(c[0, 0, :, 0], x[0, 0, :, 0]) and torch.equal(c[0, 0, :, 3], x[0, 0, :, 3])


def test_mix_draws_are_seeded_and_cutmix_lambda_is_the_area_left():
    from kdlab.data.augment import MixSpec, draw_mix

    spec = MixSpec(mixup=0.4, cutmix=1.0)
    a = [draw_mix(8, 6, 6, spec, torch.Generator().manual_seed(s)) for s in range(20)]
    b = [draw_mix(8, 6, 6, spec, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(u.lam == v.lam and torch.equal(u.perm, v.perm) and u.box == v.box for u, v in zip(a, b))
    cuts = [p for p in a if p.box is not None]
    assert cuts and len(cuts) < len(a)  # both modes occur over 20 batches
    for p in cuts:
        y1, y2, x1, x2 = p.box
        assert p.lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 36)


def test_mixup_label_terms_mix_the_losses(tmp_path):
    """A CE-only step with mixup: the loss is λ·CE(s(x̃), y) + (1−λ)·CE(s(x̃), y[π]), by hand."""
    import torch.nn.functional as F

    from kdlab.core.seeding import derive_seed
    from kdlab.data.augment import MixSpec, apply_mix, draw_mix
    from kdlab.core.config import TermCfg
    from kdlab.distill.losses import build_terms
    from kdlab.train.objective import DistillObjective, StepContext
    from kdlab.train.runtime import Runtime

    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).train()
    rt = Runtime("cpu", "none", dist=None)
    spec = MixSpec(mixup=0.5)
    obj = DistillObjective(student, build_terms([TermCfg(term="ce", weight=1.0)]), runtime=rt, mix=spec, mix_seed=7)
    g = torch.Generator().manual_seed(3)
    x, y, idx = torch.rand(6, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)
    loss, logs = obj.step((x, y, idx), StepContext(epoch=2, step=5, runtime=rt))
    p = draw_mix(6, 4, 4, spec, torch.Generator().manual_seed(derive_seed(7, "mix", 2, 5)))
    out = student(apply_mix(x, p))
    want = p.lam * F.cross_entropy(out, y) + (1 - p.lam) * F.cross_entropy(out, y[p.perm])
    assert 0 < p.lam < 1 and float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def test_mixup_with_a_cached_teacher_is_refused():
    from kdlab.train.recipe import load_recipe
    from kdlab.train.build import build_run

    r = load_recipe("methods/digits/kd", ["train.mixup=0.2"])
    with pytest.raises(ValueError, match="teacher_mode: live"):
        build_run(r, teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


def test_stop_after_epochs_ends_a_longer_schedule_where_it_says(tmp_path):
    """train.stop_after_epochs: 2 of a 3-epoch cosine schedule trains exactly the first two epochs of
    the full run (same losses) at the full schedule's learning rates, then finishes from the best."""
    import csv

    import torch

    import kdlab

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 8, 8, generator=g), torch.arange(48) % 3
    base = {"epochs": 3, "lr": 0.1, "schedule": "cosine", "warmup_epochs": 0, "patience": None,
            "batch_size": 16, "threads": 1}

    def run(name, **extra):
        res = kdlab.fit("cnn_tiny", train_data=(x, y), val_data=(x[:24], y[:24]), num_classes=3,
                        train={**base, **extra}, run_dir=tmp_path / name, progress=False)
        with open(tmp_path / name / "metrics.csv") as f:
            return res, list(csv.DictReader(f))

    full, full_rows = run("full")
    cut, cut_rows = run("cut", stop_after_epochs=2)
    assert (full["epochs_run"], full["stopped_early"]) == (3, False)
    assert (cut["epochs_run"], cut["stopped_early"]) == (2, True)
    assert len(cut_rows) == 2
    # epoch 2 runs at the 3-epoch cosine's lr: 0.1 * (1 + cos(pi/3)) / 2 = 0.075 (a 2-epoch schedule: 0.05)
    assert abs(float(cut_rows[1]["lr"]) - 0.075) < 1e-9
    for a, b in zip(cut_rows, full_rows[:2]):
        assert a["loss"] == b["loss"]


def test_a_bounded_teacher_drops_a_stop_beyond_its_epochs():
    from kdlab.train.recipe import load_recipe
    from kdlab.train.build import bound_epochs

    r = load_recipe("digits/baseline", ["train.epochs=6", "train.stop_after_epochs=4"])
    assert (bound_epochs(r, 2).train.epochs, bound_epochs(r, 2).train.stop_after_epochs) == (2, None)
    assert (bound_epochs(r, 5).train.epochs, bound_epochs(r, 5).train.stop_after_epochs) == (5, 4)
    assert bound_epochs(r, None) is r and bound_epochs(r, 9) is r
