"""Tests for kdlab.models. Parameter counts are derived from hand formulas written out here
(conv k*k*cin*cout without bias, BN 2*c, Linear in*out+out), cross-checked against published
figures (CIFAR ResNet-18 11,173,962; ResNet-50 23,520,842; resnet20 ~0.27M, resnet56 ~0.86M,
resnet110 ~1.7M)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from kdlab.models import MODELS, create_model, list_models, register_model
from kdlab.models.cbam import CBAM
from kdlab.models.resnet import BasicBlock, Bottleneck

torch.set_num_threads(1)


# --------------------------------------------------------------------------- hand formulas
def conv(cin, cout, k):
    return k * k * cin * cout


def bn(c):
    return 2 * c


def fc(cin, n):
    return cin * n + n


def basic(cin, p, stride):
    n = conv(cin, p, 3) + bn(p) + conv(p, p, 3) + bn(p)
    if stride != 1 or cin != p:
        n += conv(cin, p, 1) + bn(p)
    return n


def bottleneck(cin, p, stride):
    n = conv(cin, p, 1) + bn(p) + conv(p, p, 3) + bn(p) + conv(p, 4 * p, 1) + bn(4 * p)
    if stride != 1 or cin != 4 * p:
        n += conv(cin, 4 * p, 1) + bn(4 * p)
    return n


def resnet_params(kind, blocks, num_classes=10, in_ch=3, width=1.0):
    block, exp = (basic, 1) if kind == "basic" else (bottleneck, 4)
    c = int(64 * width)
    total = conv(in_ch, c, 3) + bn(c)
    cin = c
    for planes, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
        planes = int(planes * width)
        for j in range(n):
            total += block(cin, planes, stride if j == 0 else 1)
            cin = planes * exp
    return total + fc(cin, num_classes)


def cifar_resnet_params(depth, filters=(16, 16, 32, 64), num_classes=10, in_ch=3):
    n = (depth - 2) // 6
    total = conv(in_ch, filters[0], 3) + bn(filters[0])
    cin = filters[0]
    for cout, stride in zip(filters[1:], (1, 2, 2)):
        for j in range(n):
            total += basic(cin, cout, stride if j == 0 else 1)
            cin = cout
    return total + fc(cin, num_classes)


def wrn_params(depth, k, num_classes=10, in_ch=3):
    n = (depth - 4) // 6
    total = conv(in_ch, 16, 3)
    cin = 16
    for cout, stride in zip((16 * k, 32 * k, 64 * k), (1, 2, 2)):
        for j in range(n):
            s = stride if j == 0 else 1
            total += bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if cin != cout or s != 1:
                total += conv(cin, cout, 1)
            cin = cout
    return total + bn(cin) + fc(cin, num_classes)


def cnn_params(channels, convs, num_classes=10, in_ch=3):
    total, cin = 0, in_ch
    for c in channels:
        for _ in range(convs):
            total += conv(cin, c, 3) + bn(c)
            cin = c
    return total + fc(cin, num_classes)


def count(model):
    return sum(p.numel() for p in model.parameters())


def stage_outputs(model, x):
    """Outputs of model.stage_names via forward hooks (independent of kdlab.models.taps)."""
    modules = dict(model.named_modules())
    out, handles = {}, []
    for name in model.stage_names:
        assert name in modules, f"{name} not in named_modules()"
        handles.append(modules[name].register_forward_hook(
            lambda m, i, o, name=name: out.__setitem__(name, o)))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, [out[n] for n in model.stage_names]


# --------------------------------------------------------------------------- parameter counts
def test_resnet18_param_count():
    assert resnet_params("basic", [2, 2, 2, 2]) == 11_173_962  # formula vs published figure
    assert count(create_model("resnet18")) == 11_173_962


def test_resnet50_param_count():
    assert resnet_params("bottleneck", [3, 4, 6, 3]) == 23_520_842
    assert count(create_model("resnet50")) == 23_520_842


def test_resnet34_param_count_formula():
    assert count(create_model("resnet34", num_classes=100, in_channels=1)) == resnet_params(
        "basic", [3, 4, 6, 3], num_classes=100, in_ch=1)


@pytest.mark.parametrize("depth, approx", [(20, 0.27e6), (56, 0.86e6), (110, 1.73e6)])
def test_cifar_resnet_param_counts(depth, approx):
    expected = cifar_resnet_params(depth)
    assert abs(expected - approx) / approx < 0.02  # agrees with the literature's rounded figure
    assert count(create_model(f"resnet{depth}")) == expected


def test_cifar_resnet_hand_sum_resnet20():
    # stem 432+32; layer1 3*(2*2304+64); layer2 14528 + 2*(2*9216+128);
    # layer3 57728 + 2*(2*36864+256); fc 650
    assert cifar_resnet_params(20) == 464 + 14016 + 51648 + 205696 + 650 == 272_474


@pytest.mark.parametrize("name, depth", [("resnet8x4", 8), ("resnet32x4", 32)])
def test_cifar_resnet_x4_param_counts(name, depth):
    m = create_model(name, num_classes=100)
    assert count(m) == cifar_resnet_params(depth, (32, 64, 128, 256), num_classes=100)
    assert m.stage_channels == (64, 128, 256) and m.feature_dim == 256


@pytest.mark.parametrize("name, depth, k", [("wrn_16_2", 16, 2), ("wrn_40_2", 40, 2),
                                            ("wrn_40_1", 40, 1), ("wrn_16_1", 16, 1)])
def test_wrn_param_counts(name, depth, k):
    assert name in MODELS
    assert count(create_model(name)) == wrn_params(depth, k)


def test_wrn_any_depth_width_parsed():
    assert "wrn_22_3" not in MODELS
    m = create_model("wrn_22_3", num_classes=5, in_channels=1)
    assert count(m) == wrn_params(22, 3, num_classes=5, in_ch=1)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wrn_15_2")


@pytest.mark.parametrize("name, channels, convs", [
    ("cnn_tiny", (8, 16, 32), 1), ("cnn_small", (16, 32, 64), 1),
    ("cnn_medium", (32, 64, 128), 2), ("cnn_large", (64, 128, 256), 2)])
def test_small_cnn_param_counts(name, channels, convs):
    assert count(create_model(name, in_channels=1)) == cnn_params(channels, convs, in_ch=1)


def test_small_cnn_size_ladder():
    sizes = [count(create_model(n, in_channels=1)) for n in
             ("cnn_tiny", "cnn_small", "cnn_medium", "cnn_large")]
    assert sizes == sorted(sizes) and sizes[0] < 10_000 and sizes[-1] > 1_000_000
    half = count(create_model("resnet18", in_channels=1, width=0.5))
    assert half > sizes[-1]  # resnet18 at width 0.5 is a bigger teacher than cnn_large


# --------------------------------------------------------------------------- shapes and stages
_HEAVY = {"resnet34", "resnet50", "resnet101", "resnet110", "resnet32x4",
          "wrn_16_8", "wrn_28_10", "wrn_40_4", "wrn_16_4", "wrn_40_2"}
_EMBEDDING = {"iresnet_small", "mobilefacenet_small"}  # face-embedding networks (no classifier): tests/test_faces.py
_DETECTORS = {"gfl_det", "tv_fcos", "tv_retinanet"}  # dense box predictions, not class logits: tests/test_detection*.py
_LIGHT = [n for n, _ in list_models() if n not in _HEAVY and n not in _EMBEDDING and n not in _DETECTORS]


@pytest.mark.parametrize("name", _LIGHT)
def test_output_shapes_and_attributes(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7).eval()
    m1 = create_model(name, num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        assert m1(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    head = dict(m.named_modules())[m.classifier_name]
    assert isinstance(head, nn.Linear)
    assert head.in_features == m.feature_dim and head.out_features == 7
    assert len(m.stage_names) >= 3


@pytest.mark.parametrize("name, channels", [
    ("resnet18", (64, 128, 256, 512)), ("resnet20", (16, 32, 64)), ("resnet8x4", (64, 128, 256)),
    ("wrn_16_2", (32, 64, 128)), ("cnn_small", (16, 32, 64)), ("cnn_medium", (32, 64, 128))])
@pytest.mark.parametrize("size, in_ch", [(32, 3), (8, 1)])
def test_stage_maps(name, channels, size, in_ch):
    m = create_model(name, in_channels=in_ch).eval()
    with torch.no_grad():
        _, feats = stage_outputs(m, torch.randn(2, in_ch, size, size))
    assert [f.shape[1] for f in feats] == list(channels)
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feats)
    # first stage keeps the input resolution, each later stage halves it
    assert [f.shape[-1] for f in feats] == [max(1, size >> i) for i in range(len(channels))]


def test_resnet50_stage_channels():
    m = create_model("resnet50", in_channels=1).eval()
    with torch.no_grad():
        _, feats = stage_outputs(m, torch.randn(2, 1, 8, 8))
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    assert m.feature_dim == 2048 and m.stage_names == ("layer1", "layer2", "layer3", "layer4")


def test_gradients_flow_through_stage_outputs():
    # stage outputs must not be modified in place afterwards (Taps keeps their graph)
    for name in ("resnet18", "resnet20", "wrn_16_1", "cnn_tiny"):
        m = create_model(name, in_channels=1, **({"width": 0.25} if name == "resnet18" else {}))
        logits, feats = stage_outputs(m, torch.randn(4, 1, 8, 8))
        (logits.sum() + sum(f.pow(2).mean() for f in feats)).backward()
        assert all(p.grad is not None for p in m.parameters())


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = create_model("cnn_small")
    torch.manual_seed(3)
    b = create_model("cnn_small")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- CBAM and width
def test_cbam_params_one_block():
    # channel MLP C -> C/16 -> C without bias (2*C*C/16) + 7x7 conv from 2 maps to 1 (98)
    assert count(CBAM(64)) == 2 * 64 * 4 + 2 * 49 == 610
    assert count(BasicBlock(64, 64, cbam=True)) - count(BasicBlock(64, 64)) == 610
    assert count(Bottleneck(64, 64, cbam=True)) - count(Bottleneck(64, 64)) == 2 * 256 * 16 + 98


def test_cbam_resnet18_param_delta():
    delta = sum(2 * (2 * c * (c // 16) + 98) for c in (64, 128, 256, 512))  # 2 blocks per stage
    assert delta == 87_824
    with_cbam = create_model("resnet18", cbam=True)
    assert count(with_cbam) - 11_173_962 == delta
    assert with_cbam.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cbam_attention_is_gating():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5).relu()
    y = CBAM(8)(x)
    assert y.shape == x.shape
    # both gates are sigmoids in (0, 1): the output is x scaled elementwise by (0, 1)
    assert torch.all(y.abs() <= x.abs() + 1e-6)
    assert torch.all((y == 0) == (x == 0))


def test_width_halves_channels():
    full = create_model("resnet18", in_channels=1)
    half = create_model("resnet18", in_channels=1, width=0.5)
    assert half.stage_channels == (32, 64, 128, 256) and half.feature_dim == 256
    assert count(half) == resnet_params("basic", [2, 2, 2, 2], in_ch=1, width=0.5)
    with torch.no_grad():
        _, feats = stage_outputs(half.eval(), torch.randn(2, 1, 8, 8))
    assert [f.shape[1] for f in feats] == [c // 2 for c in full.stage_channels]
    small = create_model("cnn_large", width=0.5)
    assert small.stage_channels == (32, 64, 128)
    assert count(small) == cnn_params((32, 64, 128), 2)  # cnn_large at 0.5 == cnn_medium layout


# --------------------------------------------------------------------------- validation
def test_unknown_name_lists_close_names():
    with pytest.raises(KeyError, match="resnet18"):
        create_model("resnet19")


def test_unknown_kwarg_names_model_and_accepted():
    with pytest.raises(ValueError, match=r"resnet18.*'depth'.*width, cbam"):
        create_model("resnet18", depth=3)
    with pytest.raises(ValueError, match=r"resnet20.*'width'.*none"):
        create_model("resnet20", width=0.5)
    with pytest.raises(ValueError, match=r"wrn_16_2.*drop_rate"):
        create_model("wrn_16_2", cbam=True)


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5])
def test_num_classes_validated(bad):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cnn_tiny", num_classes=bad)


def test_bad_values():
    with pytest.raises(ValueError, match="in_channels"):
        create_model("cnn_tiny", in_channels=0)
    with pytest.raises(ValueError, match="width"):
        create_model("cnn_tiny", width=0)
    with pytest.raises(ValueError, match="dropout"):
        create_model("cnn_tiny", dropout=1.5)
    with pytest.raises(ValueError, match="cbam"):
        create_model("resnet18", cbam="yes")


@pytest.mark.parametrize("prefix", ["timm", "torchvision"])
def test_optional_libraries_clear_import_error(prefix, monkeypatch):
    monkeypatch.setitem(sys.modules, prefix, None)  # makes `import prefix` fail
    with pytest.raises(ImportError, match=r"pip install kdlab\[vision\]"):
        create_model(f"{prefix}:resnet18")


def test_list_and_register_models(monkeypatch):
    names = dict(list_models())
    required = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet20", "resnet32",
                "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2",
                "wrn_40_1", "wrn_16_1", "cnn_tiny", "cnn_small", "cnn_medium", "cnn_large"}
    assert required <= set(names) and all(names[n] for n in required)
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))  # undo the registration

    @register_model("test_linear", "a test model")
    def build(num_classes=10, in_channels=3, hidden=4):
        m = nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Linear(hidden, num_classes))
        m.stage_names, m.feature_dim, m.classifier_name = ("1",), hidden, "2"
        return m

    assert ("test_linear", "a test model") in list_models()
    assert create_model("test_linear", num_classes=3, hidden=5)(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="twice"):
        register_model("test_linear")(build)


def test_cbam_sits_on_residual_branch_before_addition():
    # With zeroed CBAM weights both gates are sigmoid(0) = 0.5, so the branch is scaled by 0.25
    # before the shortcut is added: equal to a plain block whose bn2 affine is scaled by 0.25.
    torch.manual_seed(0)
    a = BasicBlock(8, 8, cbam=True).eval()
    for p in a.cbam.parameters():
        nn.init.zeros_(p)
    b = BasicBlock(8, 8).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("cbam.")})
    with torch.no_grad():
        b.bn2.weight.mul_(0.25)
        b.bn2.bias.mul_(0.25)
        x = torch.randn(2, 8, 6, 6)
        assert torch.allclose(a(x), b(x), atol=1e-6)
        assert not torch.allclose(a(x), BasicBlock(8, 8).eval()(x))


def test_optional_libraries_glue(monkeypatch):
    import types

    def fake_timm_create(arch, num_classes, in_chans, pretrained):
        assert arch == "tiny" and pretrained is False
        m = nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, num_classes))
        m.feature_info = [{"module": "0", "num_chs": 4}]
        m.num_features, m.pretrained_cfg = 4, {"classifier": "3"}
        return m

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=fake_timm_create))
    m = create_model("timm:tiny", num_classes=3, in_channels=1)
    assert (m.stage_names, m.feature_dim, m.classifier_name) == (("0",), 4, "3")

    def fake_get_model(arch, num_classes, weights):
        assert weights is None
        return create_model(arch, num_classes=num_classes, width=0.25)

    fake_tv = types.SimpleNamespace(models=types.SimpleNamespace(get_model=fake_get_model))
    monkeypatch.setitem(sys.modules, "torchvision", fake_tv)
    m = create_model("torchvision:resnet18", num_classes=4)
    assert m.stage_names == ("layer1", "layer2", "layer3", "layer4")
    assert (m.classifier_name, m.feature_dim) == ("fc", 128)
    with pytest.raises(ValueError, match="3 input channels"):
        create_model("torchvision:resnet18", in_channels=1)
