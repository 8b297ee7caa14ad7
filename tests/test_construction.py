"""One construction path and the Objective contract (issue 22, items 3 and 4)."""

import math

import pytest
import torch
from torch import nn


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    return x, y


def _student(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 2))


def _teacher():
    torch.manual_seed(99)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_fit_uses_the_teacher_cache_of_its_teacher_mode(tmp_path):
    import kdlab
    from kdlab.distill.teachers import TeacherStore

    x, y = _data(40)
    teacher = _teacher()
    # 40 samples in batches of 16: ceil(40 / 16) = 3 steps an epoch, 2 epochs
    steps, epochs = 3, 2
    train = {"epochs": epochs, "batch_size": 16, "device": "cpu", "teacher_mode": "cache-fp16", "patience": None}
    store = TeacherStore()
    kw = dict(train_data=(x, y), val_data=(x, y), train=train, progress=False, teacher_cache=store)
    first = kdlab.fit(_student(0), teacher, run_dir=tmp_path / "a", **kw)
    # every (epoch, step) computed once; the setup probe (epoch 0, step 0) came first, so the
    # training step 0 of epoch 0 was already served
    assert store.misses == epochs * steps and store.hits == 1
    second = kdlab.fit(_student(1), teacher, run_dir=tmp_path / "b", **kw)
    assert store.misses == epochs * steps  # nothing computed again
    assert store.hits == 1 + epochs * steps + 1  # every step and the probe served from the store
    # served values are the ones the run computes itself (rounded to fp16 alike): same numbers
    alone = kdlab.fit(_student(1), teacher, run_dir=tmp_path / "c", train_data=(x, y), val_data=(x, y),
                      train=train, progress=False)
    assert alone["val_acc"] == second["val_acc"] and alone["val_loss"] == second["val_loss"]
    assert first["epochs_run"] == epochs
    # a live teacher never touches the store
    live = TeacherStore()
    kdlab.fit(_student(1), teacher, run_dir=tmp_path / "d", train_data=(x, y), val_data=(x, y),
              train={**train, "teacher_mode": "live"}, progress=False, teacher_cache=live)
    assert live.hits == 0 and live.misses == 0


def test_fit_rounds_the_teacher_as_its_teacher_mode_says(tmp_path):
    """kdlab.fit honours train.teacher_mode (it used to run every teacher live, unrounded): its
    teacher source gives fp16-rounded logits under cache-fp16 and the exact ones under live."""
    import kdlab
    from kdlab.train.callbacks import Callback

    class Grab(Callback):
        def on_fit_start(self, trainer):
            self.source = trainer.objective.teacher

    x, y = _data(8)
    teacher = _teacher()
    with torch.no_grad():
        exact = teacher(x)
    for mode, want in (("cache-fp16", exact.half().float()), ("live", exact)):
        grab = Grab()
        kdlab.fit(_student(0), teacher, train_data=(x, y), loss=[{"term": "kd"}], run_dir=tmp_path / mode,
                  train={"epochs": 1, "batch_size": 8, "device": "cpu", "teacher_mode": mode}, progress=False,
                  callbacks=[grab])
        assert torch.equal(grab.source(x, y).logits, want), mode
    assert not torch.equal(exact.half().float(), exact)  # the two modes are told apart


def test_the_trainer_takes_only_objectives(tmp_path):
    from kdlab.core.config import TrainCfg
    from kdlab.train.trainer import Trainer

    class NotAnObjective:
        monitor = ("acc", "max")

        def models(self):
            return {"m": nn.Linear(1, 1)}

        def parameters(self):
            return list(self.models()["m"].parameters())

    with pytest.raises(TypeError, match="subclass"):
        Trainer(NotAnObjective(), None, None, None, TrainCfg(device="cpu"), tmp_path)


def test_image_runs_count_images_per_second(tmp_path):
    import kdlab

    x, y = _data(40)
    res = kdlab.fit(_student(0), train_data=(x, y), val_data=(x, y), run_dir=tmp_path / "r",
                    train={"epochs": 2, "batch_size": 16, "device": "cpu", "patience": None}, progress=False)
    assert res["sample_unit"] == "images" and "tokens_per_s" not in res
    # 2 epochs over 40 images
    assert res["images_per_s"] * res["train_time_s"] == pytest.approx(2 * 40)


def test_language_model_runs_count_tokens_per_second(tmp_path):
    from kdlab.core.config import TrainCfg
    from kdlab.lm.corpora import EvalLoader, WindowLoader
    from kdlab.lm.models import GPT
    from kdlab.lm.objective import LMObjective
    from kdlab.train.trainer import Trainer

    torch.manual_seed(0)
    stream = torch.tensor([1, 2, 3, 4] * 50)
    obj = LMObjective(GPT(6, d_model=16, n_layer=1, n_head=2, max_len=16), pad_id=5,
                      meta={"model_name": "lm:gpt", "model_kwargs": {}})
    ev = EvalLoader(stream, 8, 8, pad_id=5, max_tokens=32)
    seq, batch, steps, epochs = 8, 4, 3, 2
    cfg = TrainCfg(epochs=epochs, lr=1e-2, optimizer="adamw", device="cpu", patience=None)
    res = Trainer(obj, WindowLoader(stream, seq, batch, steps, seed=0), ev, ev, cfg, tmp_path, progress=False).fit()
    assert res["sample_unit"] == "tokens" and "images_per_s" not in res
    # every target of every window is a real token: epochs x steps x batch x seq_len of them
    assert res["tokens_per_s"] * res["train_time_s"] == pytest.approx(epochs * steps * batch * seq)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert "tokens_per_s" in rows[0].split(",") and "images_per_s" not in rows[0].split(",")


def test_runtime_scales_a_ddp_loss_by_the_process_share():
    from types import SimpleNamespace

    from kdlab.train.runtime import Runtime

    rt = Runtime("cpu", dist=None)
    loss = torch.tensor(2.0)
    loader = SimpleNamespace(dataset_size=10, global_batch_size=8)
    assert rt.local_loss(loss, 3.0, loader, 1) is loss  # no DDP-wrapped model: the loss as it is
    rt.dist, rt.ddp_params = (0, 2), {1}  # as if a model were wrapped on 2 processes
    # global batch 1 holds min(8, 10 - 8) = 2 samples; this process has 3 of a pretend world of 2:
    # loss x 3 x 2 / 2
    assert float(rt.local_loss(loss, 3.0, loader, 1)) == pytest.approx(2.0 * 3 * 2 / 2)
    assert math.isclose(float(rt.local_loss(loss, 4.0, loader, 0)), 2.0 * 4 * 2 / 8)
