"""Attributions, region importance, alignment metrics, overlays and `kdlab explain`.

Expected numbers are worked out by hand in the comments (or come from closed forms such as the
gradient of a linear model), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("captum")

from kdlab.evaluate import alignment as al  # noqa: E402
from kdlab.evaluate import explain as ex  # noqa: E402

nan = float("nan")


# ---------------------------------------------------------------------------------------------
# Spearman


def test_spearman_reversed_and_identical():
    r = al.spearman(torch.tensor([[1.0, 2, 3, 4], [1.0, 2, 3, 4]]),
                    torch.tensor([[4.0, 3, 2, 1], [10.0, 20, 30, 40]]))
    assert r.tolist() == pytest.approx([-1.0, 1.0])


def test_spearman_no_ties_formula():
    # ranks of a: 1..5; b = [0.2, 0.1, 0.4, 0.3, 0.5] has ranks [2, 1, 4, 3, 5]
    # d = [-1, 1, -1, 1, 0], sum d^2 = 4, rho = 1 - 6*4 / (5*(25-1)) = 1 - 24/120 = 0.8
    r = al.spearman([10.0, 20, 30, 40, 50], [0.2, 0.1, 0.4, 0.3, 0.5])
    assert r.shape == (1,)
    assert float(r[0]) == pytest.approx(0.8)


def test_spearman_ties_average_ranks():
    # a = [1, 2, 2, 3] -> average ranks [1, 2.5, 2.5, 4]; b ranks [1, 2, 3, 4]
    # centred: [-1.5, 0, 0, 1.5] and [-1.5, -0.5, 0.5, 1.5]
    # cov = 2.25 + 2.25 = 4.5; var_a = 4.5; var_b = 5 -> rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    r = al.spearman([1.0, 2, 2, 3], [1.0, 2, 3, 4])
    assert float(r[0]) == pytest.approx(math.sqrt(0.9))


def test_spearman_constant_row_is_nan_and_nan_entries_dropped():
    r = al.spearman(torch.tensor([[1.0, 1, 1, 1], [1.0, 2, nan, 3]]),
                    torch.tensor([[1.0, 2, 3, 4], [5.0, 6, 0, 7]]))
    assert math.isnan(float(r[0]))
    # second row after dropping position 2: [1, 2, 3] vs [5, 6, 7] -> 1
    assert float(r[1]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        al.spearman([1.0, 2], [1.0, 2, 3])


def test_rank_and_logit_alignment_by_hand():
    # logits [1, 2, 3] vs [0.1, 0.5, 0.2]: ranks [1, 2, 3] vs [1, 3, 2],
    # d = [0, -1, 1], rho = 1 - 6*2/(3*8) = 0.5
    s = torch.tensor([[1.0, 2, 3], [3.0, 2, 1]])
    t = torch.tensor([[0.1, 0.5, 0.2], [0.1, 0.5, 0.2]])
    # second row: ranks [3, 2, 1] vs [1, 3, 2]: d = [2, -1, -1], sum 6 -> 1 - 36/24 = -0.5
    assert al.logit_alignment(s, t).tolist() == pytest.approx([0.5, -0.5])
    assert al.rank_alignment(s, t).tolist() == pytest.approx([0.5, -0.5])


# ---------------------------------------------------------------------------------------------
# top-k focus, agreement, KL, CI


def test_topk_focus_constructed_map():
    teacher = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 1, 1, 0, 0, 0]])
    student = torch.tensor([[1.0, 1, 2, 2, 2, 2], [3.0, 1, 1, 1, 0, 0]])
    # row 0: teacher's top-2 parts = {0, 1}; inside = 1 + 1 = 2, outside = 8 -> 0.25
    # row 1: tie 1,1,1 -> lower indices first: top-2 = {0, 1}; inside = 4, outside = 2 -> 2.0
    assert al.topk_focus(student, teacher, k=2).tolist() == pytest.approx([0.25, 2.0])
    # fractions: 2/10 and 4/6
    assert al.topk_fraction(student, teacher, k=2).tolist() == pytest.approx([0.2, 4 / 6])
    # student's sign does not matter: mass is |importance|
    assert al.topk_focus(-student, teacher, k=2).tolist() == pytest.approx([0.25, 2.0])


def test_topk_focus_division_guards():
    teacher = torch.tensor([[3.0, 2, 1], [3.0, 2, 1]])
    student = torch.tensor([[5.0, 0, 0], [0.0, 0, 0]])
    f = al.topk_focus(student, teacher, k=1)
    assert math.isinf(float(f[0])) and math.isnan(float(f[1]))
    assert al.summarize(f)[2] == 0  # both excluded
    with pytest.raises(ValueError):
        al.topk_focus(student, teacher, k=3)  # no part left outside
    with pytest.raises(ValueError):
        al.topk_focus(student, teacher, k=0)


def test_top1_agreement_by_hand():
    s = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 5.0]])
    t = torch.tensor([[0.0, 3.0], [0.0, 1.0], [9.0, 5.0]])
    assert al.top1_agreement(s, t).tolist() == [1.0, 0.0, 0.0]


def test_kl_to_teacher_two_classes_by_hand():
    t = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # p_t = [1/2, 1/2]
    s = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_s = [3/4, 1/4]
    # KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    assert float(al.kl_to_teacher(s, t)[0]) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    # T = 2: p_s = softmax([ln3/2, 0]) = [sqrt3, 1] / (sqrt3 + 1)
    r3 = math.sqrt(3.0)
    ps = [r3 / (r3 + 1), 1 / (r3 + 1)]
    want = 0.5 * math.log(0.5 / ps[0]) + 0.5 * math.log(0.5 / ps[1])
    assert float(al.kl_to_teacher(s, t, T=2.0)[0]) == pytest.approx(want, abs=1e-12)
    assert float(al.kl_to_teacher(t, t)[0]) == pytest.approx(0.0, abs=1e-12)


def test_mean_ci_hand_t_quantile():
    # [1..5]: mean 3, s = sqrt(2.5); t_{0.975, 4} = 2.7764451 (table)
    m, h = al.mean_ci([1.0, 2, 3, 4, 5])
    assert m == pytest.approx(3.0)
    assert h == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    # 90%: t_{0.95, 4} = 2.1318468
    assert al.mean_ci([1.0, 2, 3, 4, 5], conf=0.90)[1] == pytest.approx(
        2.1318468 * math.sqrt(0.5), rel=1e-6)
    # non-finite values are dropped and counted out
    assert al.summarize([1.0, nan, 3.0, math.inf]) == pytest.approx(
        (2.0, 12.7062047 * math.sqrt(2.0) / math.sqrt(2), 2))
    m1, h1 = al.mean_ci([4.0])
    assert m1 == 4.0 and math.isnan(h1)
    assert al.summarize([])[2] == 0


# ---------------------------------------------------------------------------------------------
# region importance


def test_region_importance_grid_8x8_in_2x2_cells():
    a = torch.zeros(1, 8, 8)
    a[0, 0:2, 0:2] = 1.0  # cell (0, 0): 4 pixels of 1 -> 4
    a[0, 6, 7] = -3.0  # cell (3, 3): |-3| -> 3
    a[0, 2, 4] = 0.5  # cell (1, 2) -> 0.5
    imp = ex.region_importance(a, (4, 4))
    want = torch.zeros(16)
    want[0], want[15], want[1 * 4 + 2] = 4.0, 3.0, 0.5
    assert imp.shape == (1, 16)
    assert torch.allclose(imp[0], want)


def test_region_importance_uneven_grid_rule():
    # 5 pixels in 2 parts: bounds floor(i*5/2) = 0, 2, 5 -> sizes 2 and 3
    assert ex.grid_bounds(5, 2) == [0, 2, 5]
    assert ex.grid_bounds(10, 4) == [0, 2, 5, 7, 10]
    imp = ex.region_importance(torch.ones(2, 5, 5), (2, 2))
    assert imp.tolist() == [[4.0, 6.0, 6.0, 9.0]] * 2
    with pytest.raises(ValueError):
        ex.region_importance(torch.ones(1, 3, 3), (4, 4))


def test_region_importance_segments():
    a = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])
    seg = torch.tensor([[[0, 0], [2, 2]]])  # label 1 absent -> NaN
    imp = ex.region_importance(a, segments=seg)
    assert imp[0, 0] == 3.0 and imp[0, 2] == 7.0 and math.isnan(float(imp[0, 1]))
    # NaN parts are ignored by the metrics: [3, nan, 7] vs [1, 5, 2] -> [3, 7] vs [1, 2] -> 1
    assert float(al.spearman(imp, torch.tensor([[1.0, 5.0, 2.0]]))[0]) == pytest.approx(1.0)


def test_superpixels_optional():
    pytest.importorskip("skimage")
    img = torch.zeros(1, 1, 16, 16)
    img[:, :, :, 8:] = 1.0
    seg = ex.superpixels(img, 4)
    assert seg.shape == (1, 16, 16) and int(seg.min()) == 0


# ---------------------------------------------------------------------------------------------
# attributions


def _linear(c=2, h=4, w=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(c * h * w, k)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, c * h * w, generator=g))
        lin.bias.copy_(torch.randn(k, generator=g))
    return nn.Sequential(nn.Flatten(), lin), lin


def test_saliency_of_linear_model_is_abs_weight_summed_over_channels():
    model, lin = _linear()
    x = torch.randn(3, 2, 4, 4)
    target = torch.tensor([0, 2, 1])
    sal = ex.attribute(model, x, target, "saliency")
    want = torch.stack([lin.weight[t].detach().view(2, 4, 4).abs().sum(0) for t in target])
    assert sal.shape == (3, 4, 4)
    assert torch.allclose(sal, want, atol=1e-6)


@pytest.mark.parametrize("baseline", ["zeros", "mean", "tensor"])
def test_ig_of_linear_model_is_input_minus_baseline_times_weight(baseline):
    model, lin = _linear()
    x = torch.randn(3, 2, 4, 4)
    if baseline == "zeros":
        b = torch.zeros_like(x)
    elif baseline == "mean":  # each image's per-channel mean colour
        b = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        baseline = b = torch.full((1, 2, 1, 1), 0.3).expand_as(x).clone()
    w = lin.weight.detach()[1].view(1, 2, 4, 4)
    raw = ex.attribute_raw(model, x, 1, "ig", baseline=baseline, steps=8)
    assert torch.allclose(raw, (x - b) * w, atol=1e-5)
    red = ex.attribute(model, x, 1, "ig", baseline=baseline, steps=8, internal_batch_size=5)
    assert torch.allclose(red, ((x - b) * w).abs().sum(1), atol=1e-5)
    err = ex.ig_completeness(model, x, 1, baseline, steps=8, relative=False)
    assert float(err.max()) < 1e-4


class _Square(nn.Module):
    """F(x) = [sum x^2, sum x]; IG of class 0 from the zero baseline:
    x_i * integral_0^1 2 a x_i da = x_i^2."""

    def forward(self, x):
        return torch.stack([(x ** 2).flatten(1).sum(1), x.flatten(1).sum(1)], dim=1)


def test_ig_of_square_is_x_squared():
    x = torch.randn(2, 1, 3, 3)
    raw = ex.attribute_raw(_Square(), x, 0, "ig", steps=4)
    assert torch.allclose(raw, x ** 2, atol=1e-5)


def _smooth_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_ig_completeness_small_nonlinear_net():
    net = _smooth_net()
    x = torch.randn(4, 1, 8, 8) * 2
    err = ex.ig_completeness(net, x, torch.tensor([0, 1, 2, 0]), "zeros", steps=64)
    assert err.shape == (4,)
    assert float(err.max()) < 1e-2


def test_gradcam_hand_value_at_full_resolution():
    # layer "feat" is the identity on the input, logits = W @ mean_hw(A) (+b):
    # dF_t/dA_k(i,j) = W[t,k] / (h*w)  ->  alpha_k = W[t,k] / (h*w), cam = relu(sum_k alpha_k A_k)
    model = nn.Sequential()
    model.add_module("feat", nn.Identity())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(2, 3))
    x = torch.randn(2, 2, 4, 4)
    cam = ex.attribute(model, x, 1, "gradcam", layer="feat")
    w = model.fc.weight.detach()[1]
    want = torch.relu((w.view(1, 2, 1, 1) / 16 * x).sum(1))
    assert torch.allclose(cam, want, atol=1e-6)


def test_gradcam_nonnegative_and_input_size():
    from kdlab.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn_tiny", num_classes=10, in_channels=1)
    model.train()
    x = torch.randn(5, 1, 8, 8)
    cam = ex.attribute(model, x, torch.arange(5), "gradcam")  # default layer: last stage (2x2)
    assert cam.shape == (5, 8, 8) and float(cam.min()) >= 0.0
    cam2 = ex.attribute(model, x, 3, "gradcam", layer="stage2")
    assert cam2.shape == (5, 8, 8) and float(cam2.min()) >= 0.0
    assert model.training  # previous mode restored
    with pytest.raises(KeyError):
        ex.attribute(model, x, 0, "gradcam", layer="nope")
    with pytest.raises(ValueError):
        ex.attribute(model, x, 0, "lime")


# ---------------------------------------------------------------------------------------------
# compare_models, overlays, CLI


def test_compare_models_identical_models_align_perfectly():
    net = _smooth_net()
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    res, per = al.compare_models(net, net, (x, y), "saliency", (4, 4), 5, batch_size=4,
                                 return_per_image=True)
    assert res["rank_alignment"][0] == pytest.approx(1.0)
    assert res["logit_alignment"][0] == pytest.approx(1.0)
    assert res["top1_agreement"][:2] == pytest.approx((1.0, 0.0))
    assert res["kl_to_teacher"][0] == pytest.approx(0.0, abs=1e-12)
    assert res["student_acc"][0] == res["teacher_acc"][0]
    assert all(v[2] == 6 for v in res.values())
    assert per["rank_alignment"].shape == (6,)
    res_ig = al.compare_models(net, _smooth_net(1), x, "ig", (2, 2), 1, target="teacher", steps=16)
    assert res_ig["ig_completeness_student"][0] < 1e-2
    assert "student_acc" not in res_ig  # no labels


def _png_ok(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlay_grid_writes_png(tmp_path):
    from kdlab.report.overlays import normalize_map, overlay_grid, plot_sweep

    assert normalize_map(torch.tensor([[1.0, 3.0], [2.0, 2.0]])).tolist() == [[0.0, 1.0], [0.5, 0.5]]
    assert normalize_map(torch.ones(2, 2)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    maps = {"teacher": torch.rand(3, 8, 8), "student": torch.rand(3, 8, 8)}
    p1 = overlay_grid(torch.rand(3, 1, 8, 8), maps, tmp_path / "grey.png", n=2,
                      titles=["a", "b", "c"])
    p3 = overlay_grid(torch.randn(3, 3, 8, 8), maps, tmp_path / "rgb.png",
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert _png_ok(p1) and _png_ok(p3)
    rows = [{"student": s, "alpha": a, "student_acc": 0.9 - a / 10, "student_acc_ci": 0.01,
             "rank_alignment": 0.5} for s in ("tiny", "small") for a in (1.0, 0.5, 0.1)]
    assert _png_ok(plot_sweep(rows, tmp_path / "sweep.png"))
    with pytest.raises(ValueError):
        overlay_grid(torch.rand(3, 1, 8, 8), {"t": torch.rand(3, 4, 4)}, tmp_path / "bad.png")


def test_cli_explain_end_to_end(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from kdlab.core.checkpoint import atomic_save, model_checkpoint
    from kdlab.cli.main import main
    from kdlab.models import create_model

    torch.manual_seed(0)
    paths = {}
    for name, kw in (("teacher", {}), ("s1", {}), ("s2", {"width": 0.5})):
        m = create_model("cnn_tiny", num_classes=10, in_channels=1, **kw)
        paths[name] = atomic_save(model_checkpoint(
            m, model_name="cnn_tiny", model_kwargs=kw, num_classes=10, in_channels=1,
            dataset="digits"), tmp_path / name / "best.pt")
    out = tmp_path / "out"
    rc = main(["explain", "--teacher", str(paths["teacher"]), "--student", str(paths["s1"]),
               "--student", str(paths["s2"]), "--alpha", "1.0", "--alpha", "0.5",
               "--dataset", "digits", "--method", "ig", "--steps", "8", "--grid", "4", "4",
               "--k", "5", "--n-images", "12", "--n-overlay", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| student" in text and "rank_alignment" in text and "cnn_tiny(w=0.5)" in text
    for f in ("explain.csv", "explain.json", "explain.md", "per_image.csv"):
        assert (out / f).stat().st_size > 0
    assert _png_ok(out / "overlays.png") and _png_ok(out / "sweep.png")
    import json

    rows = json.loads((out / "explain.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [1.0, 0.5] and rows[0]["n_images"] == 12
    # a count mismatch is a clean CLI error (exit 2)
    rc = main(["explain", "--teacher", str(paths["teacher"]), "--student", str(paths["s1"]),
               "--alpha", "1", "--alpha", "0.5", "--out", str(out)])
    assert rc == 2 and "--alpha" in capsys.readouterr().err
