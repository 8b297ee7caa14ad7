"""Generator-based data-free paradigms (DAFL, ZSKT) and their noise control: the losses against
hand values and the authors' definitions, the generators' shapes, and tiny runs through the
Trainer that never read a training image."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.distill.generators import (dafl_entropy_term, dafl_generator, dafl_generator_losses, kl_batchmean,
                                      zskt_divergence, zskt_generator, zskt_generator_loss, zskt_student_loss)
from kdlab.experiments.paradigms import PARADIGMS
from kdlab.experiments.paradigms.dafl import DaflParams, run_dafl
from kdlab.experiments.paradigms.noisekd import NoiseParams, run_noise
from kdlab.experiments.paradigms.zskt import ZsktParams, run_zskt
from kdlab.train.recipe import recipe_from_dict

TINY = {"epochs": 2, "batch_size": 64, "lr": 0.002, "optimizer": "adamw", "weight_decay": 0.0,
        "patience": None, "seed": 0, "device": "cpu"}


def test_dafl_entropy_term_is_minus_log10_k_for_a_uniform_mean():
    # ten confident rows, one per class: the batch-mean softmax is uniform -> Σ 0.1·log10 0.1 = −1
    t = torch.eye(10) * 8.0
    assert dafl_entropy_term(t).item() == pytest.approx(-math.log10(10), abs=1e-6)
    assert dafl_entropy_term(torch.zeros(3, 10)).item() == pytest.approx(-1.0, abs=1e-6)
    # two classes, mean softmax [0.8, 0.2]: 0.8 log10 0.8 + 0.2 log10 0.2 (greater than −log10 2)
    t2 = torch.tensor([[math.log(4.0), 0.0]])
    want = 0.8 * math.log10(0.8) + 0.2 * math.log10(0.2)
    assert dafl_entropy_term(t2).item() == pytest.approx(want, abs=1e-6) and want > -math.log10(2)


def test_dafl_one_hot_and_activation_terms_by_hand():
    t = torch.tensor([[math.log(4.0), 0.0], [0.0, math.log(4.0)]])  # both 0.8 on their argmax
    f = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    parts = dafl_generator_losses(t, f)
    assert parts["oh"].item() == pytest.approx(-math.log(0.8), abs=1e-6)
    assert parts["a"].item() == pytest.approx(-(1 + 3 + 0.5 + 0.5) / 4, abs=1e-6)


@pytest.mark.filterwarnings("ignore:reduction")
def test_zskt_generator_loss_is_minus_the_student_kl():
    # B = 1, K = 2: p_T = [0.8, 0.2], p_S = [0.5, 0.5]: KL = 0.8 ln 1.6 + 0.2 ln 0.4, element-wise mean / 2
    s, t = torch.zeros(1, 2), torch.tensor([[math.log(4.0), 0.0]])
    kl = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert zskt_divergence(s, t).item() == pytest.approx(kl / 2, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    ref = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="mean")  # the authors' call (element mean)
    assert zskt_divergence(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert zskt_generator_loss(s, t).item() == pytest.approx(-ref.item(), rel=1e-5)
    # the student's loss with no attention pairs is that same KL term
    assert zskt_student_loss(s, t, [], [], beta=250.0).item() == pytest.approx(ref.item(), rel=1e-5)
    # attention term: one 1-channel 1x2 map [1, 0] vs [0, 1]: a = [1, 0] and [0, 1] -> mean sq diff 1
    fs, ft = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]])
    s1, t1 = torch.zeros(1, 2), torch.zeros(1, 2)
    assert zskt_student_loss(s1, t1, [fs], [ft], beta=250.0).item() == pytest.approx(250.0, rel=1e-6)
    assert kl_batchmean(s1, t1).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("size,ch", [(8, 1), (28, 1), (32, 3)])
def test_generator_shapes(size, ch):
    for make in (dafl_generator, zskt_generator):
        torch.manual_seed(0)
        x = make(100, size, ch)(torch.randn(4, 100))
        assert x.shape == (4, ch, size, size) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from kdlab.train.build import train

    out = tmp_path_factory.mktemp("teacher")
    r = recipe_from_dict({"name": "t", "data": {"name": "digits"}, "student": {"model": "cnn_small"},
                          "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "patience": None, "seed": 0,
                                    "device": "cpu"}, "loss": [{"term": "ce"}]})
    train(r, out, progress=False)
    return out / "best.pt"


def _recipe(ckpt):
    return recipe_from_dict({"name": "tiny-df", "data": {"name": "digits", "label_fraction": 0.2},
                             "student": {"model": "cnn_tiny"}, "train": dict(TINY),
                             "teacher": {"model": "cnn_small", "checkpoint": str(ckpt)},
                             "loss": [{"term": "kd"}]})


@pytest.mark.parametrize("name", ["dafl", "zskt", "noise"])
def test_data_free_runs_never_read_training_images(name, teacher_ckpt, tmp_path, monkeypatch):
    from kdlab.data import loader as loader_mod

    seen = []
    orig = loader_mod.BatchLoader.epoch

    def spy(self, e):  # every real loader epoch: only val/test (unshuffled) may be read
        seen.append(getattr(self, "shuffle", None))
        return orig(self, e)

    monkeypatch.setattr(loader_mod.BatchLoader, "epoch", spy)
    params = {"dafl": DaflParams(iters=3, batch_size=16),
              "zskt": ZsktParams(iters=8, batch_size=16, n_student=7,
                                 at_layers=[["stage2", "stage2"], ["stage3", "stage3"]]),
              "noise": NoiseParams(iters=3, batch_size=16)}[name]
    run = {"dafl": run_dafl, "zskt": run_zskt, "noise": run_noise}[name]
    res = run(_recipe(teacher_ckpt), params, tmp_path, log=lambda *a: None)
    r = json.loads((tmp_path / "student" / "result.json").read_text())
    assert r["epochs_run"] == 2 and 0.0 <= r["test_acc"] <= 1.0
    assert res["student"]["test_acc"] == r["test_acc"]
    assert (tmp_path / "samples.png").stat().st_size > 1000
    assert sum(res["samples"]["teacher_classes"]) == 64
    assert not any(seen)  # no shuffled (training) loader was iterated
    if name != "noise":  # the generator was trained and saved with the run
        last = torch.load(tmp_path / "student" / "last.pt", weights_only=True)
        assert "generator" in last["objective"] and last["objective"]["count"] == 2 * params.iters


def test_paradigms_registered_with_references():
    from kdlab.experiments.paradigms.base import list_paradigms

    refs = {n: r for n, _, r in list_paradigms()}
    assert "ICCV 2019" in refs["dafl"] and "NeurIPS 2019" in refs["zskt"] and "noise" in PARADIGMS.names()
