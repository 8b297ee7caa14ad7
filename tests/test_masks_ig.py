"""Integrated Gradients for causal masks: quadrature, batched = step-by-step, convergence,
completeness, and agreement with Captum."""

import math

import pytest
import torch
from torch import nn

from kdlab.distill.masks import completeness_error, layer_attribution, quadrature


class Cubic(nn.Module):
    """feat = identity 1x1 conv; logit 0 = Σ F³, logit 1 = Σ F. IG of logit 0 on feat, zero
    baseline: ∂z/∂F at αF is 3α²F², ∫_0^1 3α² dα = 1, so the exact attribution is F³."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.fill_(1.0)

    def forward(self, x):
        f = self.feat(x)
        return torch.stack([(f ** 3).sum(dim=(1, 2, 3)), f.sum(dim=(1, 2, 3))], dim=1)


class Skip(nn.Module):
    """A residual block whose inner conv is the masked layer: the skip bypasses it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + torch.tanh(self.inner(h)))
        return self.head(h.mean(dim=(2, 3)))


def _net():
    """head: conv-relu-conv-tanh (layer "3"); tail: conv-tanh-linear, scaled to be far from linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                        nn.Tanh(), nn.Conv2d(6, 5, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(5 * 25, 4))
    with torch.no_grad():
        net[4].weight.mul_(4.0)
        net[4].bias.mul_(4.0)
    return net.eval()


def test_quadrature_nodes_by_hand():
    a, w = quadrature(4, "midpoint")
    assert a.tolist() == pytest.approx([1 / 8, 3 / 8, 5 / 8, 7 / 8]) and w.tolist() == pytest.approx([0.25] * 4)
    a, w = quadrature(2, "gausslegendre")  # nodes ±1/√3 on [-1, 1], weights 1
    assert a.tolist() == pytest.approx([(1 - 1 / math.sqrt(3)) / 2, (1 + 1 / math.sqrt(3)) / 2])
    assert w.tolist() == pytest.approx([0.5, 0.5])
    a, w = quadrature(3, "gausslegendre")  # nodes 0, ±√(3/5), weights 8/9, 5/9
    assert a.tolist() == pytest.approx([(1 - math.sqrt(0.6)) / 2, 0.5, (1 + math.sqrt(0.6)) / 2])
    assert w.tolist() == pytest.approx([5 / 18, 8 / 18, 5 / 18])
    with pytest.raises(ValueError, match="mask.rule"):
        quadrature(4, "trapezoid")


def test_ig_by_hand_on_a_cubic():
    m = Cubic()
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])
    y = torch.tensor([0])
    f3 = (x[0, 0] ** 3).flatten().tolist()
    # Gauss-Legendre with 2 nodes integrates 3α² exactly
    s = layer_attribution(m, x, y, "feat", "ig", steps=2, rule="gausslegendre")
    assert s[0].flatten().tolist() == pytest.approx(f3, rel=1e-6)
    # midpoint with nodes 1/4, 3/4: (1/2)·3·(1/16 + 9/16) = 15/16 of the exact value
    s = layer_attribution(m, x, y, "feat", "ig", steps=2, rule="midpoint")
    assert s[0].flatten().tolist() == pytest.approx([v * 15 / 16 for v in f3], rel=1e-6)


@pytest.mark.parametrize("rule", ["gausslegendre", "midpoint"])
def test_batched_ig_equals_step_by_step(rule):
    net = _net()
    x = torch.randn(3, 2, 5, 5)
    y = torch.tensor([0, 3, 1])
    ref = layer_attribution(net, x, y, "3", "ig", 7, rule=rule, batched=False)
    one = layer_attribution(net, x, y, "3", "ig", 7, rule=rule)
    chunked = layer_attribution(net, x, y, "3", "ig", 7, chunk=6, rule=rule)  # 2 steps per pass
    assert torch.allclose(one, ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(chunked, ref, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_batched_ig_inside_a_residual_block_falls_back():
    torch.manual_seed(1)
    net = Skip().eval()
    x = torch.randn(4, 2, 6, 6)
    y = torch.tensor([0, 1, 2, 0])
    ref = layer_attribution(net, x, y, "inner", "ig", 5, batched=False)
    got = layer_attribution(net, x, y, "inner", "ig", 5)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
def test_ig_matches_captum_on_the_tail(method):
    captum = pytest.importorskip("captum.attr")
    net = _net()
    x = torch.randn(3, 2, 5, 5)
    y = torch.tensor([2, 0, 1])
    head, tail = net[:4], net[4:]
    with torch.no_grad():
        f = head(x)
    ref = captum.IntegratedGradients(tail).attribute(f, baselines=torch.zeros_like(f), target=y,
                                                      n_steps=6, method=method)
    rule = "gausslegendre" if method == "gausslegendre" else "midpoint"
    ours = layer_attribution(net, x, y, "3", "ig", 6, rule=rule)
    assert torch.allclose(ours, ref.sum(dim=1), atol=1e-5, rtol=1e-4)


def test_rules_converge_to_the_same_attribution():
    net = _net()
    x = torch.randn(4, 2, 5, 5) * 2
    y = torch.tensor([0, 1, 2, 3])
    gaps = []
    for m in (2, 8, 64):
        gl = layer_attribution(net, x, y, "3", "ig", m, rule="gausslegendre")
        mp = layer_attribution(net, x, y, "3", "ig", m, rule="midpoint")
        gaps.append(float((gl - mp).abs().max() / gl.abs().max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_completeness_sum_equals_logit_gap():
    net = _net()
    x = torch.randn(5, 2, 5, 5)
    y = torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        f = net[:4](x)
        gap = (net[4:](f) - net[4:](torch.zeros_like(f))).gather(1, y.view(-1, 1)).squeeze(1)
    for rule in ("gausslegendre", "midpoint"):
        s = layer_attribution(net, x, y, "3", "ig", 64, rule=rule)
        assert s.sum(dim=(1, 2)).tolist() == pytest.approx(gap.tolist(), abs=1e-3)
    e1 = completeness_error(net, x, y, "3", 1, "midpoint")
    e64 = completeness_error(net, x, y, "3", 64, "gausslegendre")
    assert e64["abs"] < 1e-3 < e1["abs"] and e64["rel"] < e1["rel"]
    assert e64["abs"] == pytest.approx(float((s.sum(dim=(1, 2)) - gap).abs().mean()), abs=1e-3)
