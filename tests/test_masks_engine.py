"""Causal masks, gradient flow, recipe validation, checkpoints and resume."""

import json
import math

import pytest
import torch
from torch import nn

from kdlab.core.checkpoint import CheckpointError, atomic_save, load_checkpoint
from kdlab.core.config import RecipeError
from kdlab.distill.masks import layer_attribution, to_mask
from kdlab.models.adapters import load_model
from kdlab.models.taps import Taps
from kdlab.train.recipe import load_recipe, recipe_from_dict


class Tiny(nn.Module):
    """conv -> (tapped 'feat') -> mean pool -> linear; small enough to reason about."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(1, 2, 1, bias=False)
        self.head = nn.Linear(2, 3, bias=False)

    def forward(self, x):
        h = self.feat(x)
        return self.head(torch.relu(h).mean(dim=(2, 3)))


def test_grad_x_activation_by_hand():
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.feat.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        m.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = torch.tensor([2])
    s = layer_attribution(m, x, y, "feat", "grad")
    # F_c = w_c * x (all positive, relu is identity); z_2 = mean(F_0) + mean(F_1)
    # dz/dF_c = 1/4 each position -> S = sum_c F_c / 4 = (1 + 2) * x / 4
    assert s[0].flatten().tolist() == pytest.approx([0.75, 1.5, 2.25, 3.0])
    assert all(p.grad is None for p in m.parameters())


def test_integrated_gradients_completeness_on_layer():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    x = torch.randn(5, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    s = layer_attribution(teacher, x, y, "1", "ig", steps=256)
    with Taps(teacher, ["1"]) as taps:
        z = teacher(x).gather(1, y.view(-1, 1)).squeeze(1)
        f = taps["1"].detach()
    tail = nn.Sequential(*list(teacher)[2:])
    z0 = tail(torch.zeros_like(f)).gather(1, y.view(-1, 1)).squeeze(1)
    # completeness: the attributions sum to z(F) - z(0)
    assert s.sum(dim=(1, 2)).detach().tolist() == pytest.approx((z - z0).detach().tolist(), abs=2e-3)


def test_to_mask_binary_top_q_and_soft():
    s = torch.tensor([[[0.1, -0.9], [0.5, 0.2]]])
    bin_ = to_mask(s, q=0.5, kind="binary", reduce="abs")
    assert bin_[0].tolist() == [[0.0, 1.0], [1.0, 0.0]]  # |.| top 2: 0.9 and 0.5
    relu = to_mask(s, q=0.25, kind="binary", reduce="relu")
    assert relu[0].tolist() == [[0.0, 0.0], [1.0, 0.0]]
    soft = to_mask(s, kind="soft")
    assert soft[0].flatten().tolist() == pytest.approx([0.1 / 0.9, 1.0, 0.5 / 0.9, 0.2 / 0.9])


def _digits_recipe(**over):
    d = {
        "name": "t", "data": {"name": "digits", "label_fraction": 0.3},
        "student": {"model": "cnn_tiny"},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.05, "patience": None, "seed": 3},
        "loss": [{"term": "ce"}],
    }
    d.update(over)
    return recipe_from_dict(d)


def test_recipe_validation_errors_name_the_path(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.lrr: unknown key"):
        _digits_recipe(train={"lrr": 0.1})
    with pytest.raises(RecipeError, match=r"train\.lr"):
        _digits_recipe(train={"lr": -1})
    with pytest.raises(RecipeError, match=r"loss\[1\]\.term: unknown loss 'kdd'; did you mean kd"):
        _digits_recipe(loss=[{"term": "ce"}, {"term": "kdd"}])
    with pytest.raises(RecipeError, match=r"loss\[0\]\.Tee: term 'kd' has no parameter 'Tee'"):
        _digits_recipe(loss=[{"term": "kd", "Tee": 4}], teacher={"model": "cnn_small"})
    with pytest.raises(RecipeError, match="need a 'teacher' section"):
        _digits_recipe(loss=[{"term": "kd"}])
    with pytest.raises(RecipeError, match="needs a 'mask' section"):
        _digits_recipe(loss=[{"term": "attn", "layers": "stage2"}], teacher={"model": "cnn_small"})
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nstudent: {model: cnn_tiny}\ndata: {name: mnist}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: data\.name"):
        load_recipe(p)


def test_shipped_recipes_all_load():
    from kdlab.core.config import list_recipes

    names = list_recipes()
    assert {"digits/full", "digits/baseline", "digits/kd", "digits/kd_align", "digits/kd_attn",
            "cifar10/full", "cifar10/teacher"} <= set(names)
    for n in names:
        load_recipe(n)


def test_overrides_and_extends():
    r = load_recipe("digits/kd", ["train.epochs=3", "data.label_fraction=0.5"])
    assert r.train.epochs == 3 and r.data.label_fraction == 0.5
    assert [t.term for t in r.loss] == ["ce", "kd"] and r.mask is None
    assert r.student.model == "cnn_tiny"  # inherited from full.yaml


def test_gradients_reach_student_never_teacher():
    from kdlab.models import create_model
    from kdlab.train.build import make_trainer

    teacher = create_model("cnn_small", num_classes=10, in_channels=1)
    r = _digits_recipe(
        teacher={"model": "cnn_small"},
        loss=[{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9},
              {"term": "align", "layers": "stage2"}, {"term": "attn", "layers": "stage2"}],
        mask={"method": "ig", "steps": 4, "q": 0.5},
    )
    tr = make_trainer(r, "/tmp/unused", teacher=teacher, progress=False)
    rec = tr.objective.record(next(iter(tr.train_loader.epoch(0))), 0, 0)
    total, parts = tr.objective.losses(rec)
    assert set(parts) == {"ce", "kd", "align", "attn"}
    assert not rec.t_logits.requires_grad and not rec.t_feats["stage2"].requires_grad
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in tr.objective.student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_resume_gives_the_same_result(tmp_path):
    from kdlab.train.build import train

    r = _digits_recipe()
    full = train(r, tmp_path / "a", progress=False)
    part = train(r, tmp_path / "b", progress=False, stop_after=2)
    assert part == {"interrupted": True, "epoch": 2}
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = train(r, tmp_path / "b", progress=False)
    for k in ("test_acc", "val_acc", "best_epoch", "epochs_run"):
        assert resumed[k] == full[k]
    a = load_checkpoint(tmp_path / "a" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "b" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4
    # a finished run is skipped and returns the stored result
    again = train(r, tmp_path / "b", progress=False)
    assert again == json.loads((tmp_path / "b" / "result.json").read_text())


def test_resume_refuses_a_different_recipe(tmp_path):
    from kdlab.train.build import train

    train(_digits_recipe(), tmp_path / "r", progress=False, stop_after=1)
    with pytest.raises(ValueError, match="different recipe"):
        train(_digits_recipe(train={"epochs": 4, "lr": 0.02, "patience": None, "seed": 3}),
              tmp_path / "r", progress=False)


def test_corrupt_and_missing_checkpoints(tmp_path):
    p = tmp_path / "c.pt"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    atomic_save({"model": {}, "model_name": "cnn_tiny"}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks 'num_classes'"):
        load_model(tmp_path / "partial.pt")
    assert not list(tmp_path.glob("*.tmp"))


def test_teacher_with_other_class_count_is_refused(tmp_path):
    from kdlab.core.checkpoint import model_checkpoint
    from kdlab.train.build import train
    from kdlab.models import create_model

    t = create_model("cnn_tiny", num_classes=5, in_channels=1)
    atomic_save(model_checkpoint(t, model_name="cnn_tiny", model_kwargs={}, num_classes=5,
                                 in_channels=1, dataset="x"), tmp_path / "t.pt")
    r = _digits_recipe(teacher={"model": "cnn_tiny", "checkpoint": str(tmp_path / "t.pt")},
                       loss=[{"term": "kd"}])
    with pytest.raises(ValueError, match="predicts 5 classes but data set 'digits' has 10"):
        train(r, tmp_path / "run", progress=False)


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    from kdlab.train.build import train
    from kdlab.train.trainer import TrainingError

    r = _digits_recipe(train={"epochs": 3, "lr": 1e30, "patience": None, "seed": 0})
    with pytest.raises(TrainingError, match="non-finite.*lower train.lr"):
        train(r, tmp_path / "nan", progress=False)
