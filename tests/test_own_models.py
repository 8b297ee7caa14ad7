"""Your own models and your own data (issue 10): any nn.Module through kdlab.fit, model specs,
output adapters, image folders streamed from disk, optimisers and schedules, logs."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.cli.main import main
from kdlab.core.config import TrainCfg
from kdlab.models.adapters import as_logits
from kdlab.train.recipe import recipe_from_dict

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_as_logits_adapts_every_output_form():
    t = torch.arange(6.0).view(2, 3)
    assert as_logits(t) is t
    assert as_logits((t, "aux")) is t and as_logits([t]) is t
    assert as_logits({"logits": t, "hidden": None}) is t
    assert as_logits(SimpleNamespace(logits=t)) is t
    with pytest.raises(ValueError, match="logits"):
        as_logits({"scores": t})


def test_fit_own_modules_then_profile_export_evaluate(tmp_path, monkeypatch, capsys):
    # the example script: an unregistered teacher returning .logits, an nn.Sequential student,
    # a Dataset of 24x40 two-channel images; then the CLI reads the saved checkpoint
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import own_model

    out = tmp_path / "own"
    res = own_model.main(str(out), epochs=1, progress=False)
    s = res["student"]
    assert s["n_test"] == 256 and s["epochs_run"] == 1 and 0.0 <= s["test_acc"] <= 1.0
    ck = torch.load(out / "student" / "best.pt", weights_only=False)
    assert ck["model_name"] is None and ck["program"] and ck["input_shape"] == [2, 24, 40]
    best = str(out / "student" / "best.pt")
    assert main(["profile", best, "--out", str(tmp_path / "prof"), "--quiet", "--repeats", "3",
                 "--warmup", "1"]) == 0
    prof = json.loads((tmp_path / "prof" / "profile.json").read_text())
    n_params = sum(p.numel() for p in own_model.student().parameters())
    flat = json.dumps(prof)
    assert f'"params": {n_params}' in flat or f'"total": {n_params}' in flat
    assert main(["export", best, "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.onnx").stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", best, "--dataset", "own_model:make_data"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["n"] == 256 and ev["acc"] == pytest.approx(s["test_acc"])


def factory(num_classes, in_channels, width: int = 4):
    """A model factory for the ``module:function`` spec test."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))


def _digits(student, **train):
    return recipe_from_dict({"name": "own", "data": {"name": "digits", "label_fraction": 0.3},
                             "student": student, "loss": [{"term": "ce"}],
                             "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "patience": None, **train}})


def test_module_function_spec_with_weights_and_rebuild(tmp_path):
    from kdlab.models.adapters import load_model
    from kdlab.train.build import train

    spec = f"{__name__}:factory"
    res = train(_digits({"model": spec, "kwargs": {"width": 6}}), tmp_path / "a", progress=False)
    model, ck = load_model(tmp_path / "a" / "best.pt")
    assert ck["model_name"] == spec and ck["model_kwargs"] == {"width": 6}
    assert model[0].out_channels == 6
    # weights: a local state dict loads into the built model before training
    sd = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    from kdlab.train.build import build_run

    run = build_run(_digits({"model": spec, "kwargs": {"width": 6}, "weights": str(tmp_path / "w.pt")}))
    assert torch.equal(run.objective.student[0].weight, torch.full_like(run.objective.student[0].weight, 0.5))
    assert 0.0 <= res["test_acc"] <= 1.0


def test_hf_image_classifier_from_an_offline_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    from kdlab.models.adapters import load_model
    from kdlab.train.build import train

    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=10)
    cfg.save_pretrained(tmp_path / "hfres")
    r = _digits({"model": f"hf:{tmp_path / 'hfres'}"})
    res = train(r, tmp_path / "run", progress=False)  # the ModelOutput's .logits are used
    model, ck = load_model(tmp_path / "run" / "best.pt")
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10) and 0.0 <= res["test_acc"] <= 1.0


def _write_folder(root: Path, n_per_class: int, hw=(12, 20), classes=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = rng.integers(0, 60, size=(*hw, 3)).astype(np.uint8)
            a[:, :, c] += 150  # the class is the dominant colour
            Image.fromarray(a).save(root / f"class{c}" / f"{i:04d}.png")


def test_imagefolder_recipe_trains_and_resumes_identically(tmp_path):
    from kdlab.data import load_dataset
    from kdlab.train.build import train

    _write_folder(tmp_path / "imgs", 20)
    s = load_dataset("imagefolder", root=str(tmp_path / "imgs"), image_size=[12, 20], seed=0)
    assert s.info.input_shape == (3, 12, 20) and s.info.num_classes == 3
    assert len(s.test) == 12 and len(s.train) + len(s.val) == 48  # 20 % test, fixed; 10 % of the rest val
    assert isinstance(s.train, torch.utils.data.Dataset) and not hasattr(s.train, "x")  # streamed
    x, y = s.train[0]
    assert x.shape == (3, 12, 20) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    d = {"name": "imgs", "data": {"name": "imagefolder", "root": str(tmp_path / "imgs"), "image_size": [12, 20],
                                  "augment": {"crop_pad": 1, "flip": True}},
         "student": {"model": "cnn_tiny"}, "loss": [{"term": "ce"}],
         "train": {"epochs": 3, "batch_size": 8, "lr": 0.05, "device": "cpu", "patience": None}}
    full = train(recipe_from_dict(d), tmp_path / "full", progress=False)
    part = train(recipe_from_dict(d), tmp_path / "part", progress=False, stop_after=1)
    assert part == {"interrupted": True, "epoch": 1}
    again = train(recipe_from_dict(d), tmp_path / "part", progress=False)
    w1 = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["models"]["student"]
    w2 = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["models"]["student"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert again["test_acc"] == full["test_acc"]
    # the CLI: kdlab distill on the same recipe file
    (tmp_path / "r.yaml").write_text(json.dumps(d))
    assert main(["distill", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "cli"), "--quiet"]) == 0


def test_imagefolder_with_train_val_test_folders(tmp_path):
    from kdlab.data import load_dataset

    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        _write_folder(tmp_path / split, n, hw=(9, 7), classes=2, seed=len(split))
    s = load_dataset("imagefolder", str(tmp_path), image_size=[9, 7], label_fraction=0.5, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 4, 6)  # label_fraction keeps 3 of 6 per class
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(ValueError, match="does not apply"):
        load_dataset("digits", root=str(tmp_path))


def test_lr_schedule_with_warmup_by_hand():
    from kdlab.train.trainer import lr_factor

    cfg = TrainCfg(epochs=10, warmup_epochs=2, schedule="cosine")
    # warm-up: (e+1)/2 for e = 0, 1; then ½(1 + cos(π e / 10))
    assert [lr_factor(cfg, e) for e in (0, 1)] == [0.5, 1.0]
    assert lr_factor(cfg, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr_factor(TrainCfg(epochs=10, schedule="step", step_size=3, gamma=0.1), 7) == pytest.approx(0.01)


def test_adamw_warmup_cosine_accumulation_and_clip_train(tmp_path):
    from kdlab.train.build import make_trainer

    r = _digits({"model": "cnn_tiny"}, epochs=3, optimizer="adamw", lr=3e-3, warmup_epochs=1,
                schedule="cosine", grad_accum=2, grad_clip=1.0)
    tr = make_trainer(r, tmp_path / "run", progress=False)
    assert isinstance(tr.opt, torch.optim.AdamW)
    res = tr.fit()
    lrs = [row["lr"] for row in tr.state.history]
    # LambdaLR: epoch 0 warm-up 1/1; epoch 1 ½(1+cos(π/3)); epoch 2 ½(1+cos(2π/3))
    assert lrs == pytest.approx([3e-3, 3e-3 * 0.75, 3e-3 * 0.25])
    # two batches per optimiser step: steps = ceil(batches / 2) per epoch
    assert tr.state.step == 3 * math.ceil(len(tr.train_loader) / 2)
    assert res["test_acc"] > 0.3  # 3 epochs on 30 % of digits learn something


def test_piped_log_has_one_line_per_epoch_and_tensorboard_files(tmp_path, capsys):
    d = _digits({"model": "cnn_tiny"}, epochs=2).to_dict()
    d["train"]["log_to"] = ["csv", "tensorboard"]
    (tmp_path / "r.yaml").write_text(json.dumps(d))
    pytest.importorskip("tensorboard")
    assert main(["distill", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if " epoch " in l]
    assert len(lines) == 2 and lines[0].split("] ")[1].startswith("epoch 1/2") and "\r" not in err
    assert "val_acc" in lines[1]
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert sum(" epoch " in l and "/2 " in l for l in log) == 2 and log[-1].split(" ", 2)[2].startswith("finished:")
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/ce", "val/val_acc", "train/lr", "speed/images_per_s"} <= set(tags)
    # per step: the batch loss and lr at batch counts 1..N (N = 2 epochs of equal batches)
    steps = [e.step for e in acc.Scalars("step/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2 and len(steps) % 2 == 0
    lr_epoch1 = acc.Scalars("train/lr")[0].value
    assert [e.value for e in acc.Scalars("step/lr")[:len(steps) // 2]] == pytest.approx([lr_epoch1] * (len(steps) // 2))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {"kdlab", "python", "torch", "numpy", "threads", "git_commit"} <= set(run)


def test_fit_accepts_dataloader_and_tensor_pairs(tmp_path):
    import kdlab

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 6, 10, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    student = nn.Sequential(nn.Flatten(), nn.Linear(60, 2))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    res = kdlab.fit(student, train_data=(x, y), val_data=dl, test_data=(x, y), run_dir=tmp_path / "f",
                    train={"epochs": 2, "batch_size": 16, "device": "cpu"}, progress=False)
    assert res["n_test"] == 64 and res["epochs_run"] == 2
    # twice in a row (a notebook): the finished run is returned, nothing registered globally
    assert kdlab.fit(student, train_data=(x, y), val_data=dl, run_dir=tmp_path / "f",
                     train={"epochs": 2, "batch_size": 16, "device": "cpu"}, progress=False)["test_acc"] == res["test_acc"]
    with pytest.raises(ValueError, match="teacher"):
        kdlab.fit(student, train_data=(x, y), loss=[{"term": "kd"}], run_dir=tmp_path / "g", progress=False)
