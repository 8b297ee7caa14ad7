"""kdlab with the real timm and torchvision (the ``vision`` extra).

Skipped where the libraries are not installed (the local torch 2.13 CPU suite); `make test`
runs them in its second environment (torch 2.14.1 + torchvision 0.29.1 + timm), see Makefile.
"""

import pytest
import torch

from kdlab.models import create_model
from kdlab.models.taps import Taps


def _n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_torchvision_resnet18_stages_classifier_and_size():
    pytest.importorskip("torchvision")
    m = create_model("torchvision:resnet18", num_classes=10)
    assert m.stage_names == ("layer1", "layer2", "layer3", "layer4")
    assert (m.classifier_name, m.feature_dim) == ("fc", 512)
    # ResNet-18 has 11,689,512 parameters with its 1000-class head (He et al. 2016; the
    # torchvision model card); a 10-class head has 512*10 + 10 instead of 512*1000 + 1000.
    assert _n_params(m) == 11_689_512 - (512 * 1000 + 1000) + (512 * 10 + 10)
    x = torch.randn(2, 3, 32, 32)
    with Taps(m.eval(), m.stage_names) as taps:
        y = m(x)
    assert y.shape == (2, 10)
    # a 32x32 input: stride 4 after the stem, then /1, /2, /2, /2
    assert [tuple(taps[s].shape[1:]) for s in m.stage_names] == [
        (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]


def test_torchvision_mobilenet_features_and_gradcam():
    pytest.importorskip("torchvision")
    pytest.importorskip("captum")
    from kdlab.evaluate.explain import attribute

    m = create_model("torchvision:mobilenet_v3_small", num_classes=5)
    # torchvision's MobileNetV3-Small: 13 blocks in `features`, head Linear(576->1024->classes)
    assert m.stage_names == tuple(f"features.{i}" for i in range(13))
    assert (m.classifier_name, m.feature_dim) == ("classifier.3", 1024)
    x = torch.randn(2, 3, 32, 32)
    cam = attribute(m, x, torch.tensor([0, 4]), "gradcam")  # default layer: the last stage
    assert cam.shape == (2, 32, 32) and bool((cam >= 0).all())


def test_timm_resnet_with_one_channel_input():
    pytest.importorskip("timm")
    m = create_model("timm:resnet18", num_classes=10, in_channels=1)
    assert m.stage_names == ("act1", "layer1", "layer2", "layer3", "layer4")
    assert (m.classifier_name, m.feature_dim) == ("fc", 512)
    # timm's resnet18 is torchvision's ResNet-18; one input channel removes 2 x 64 x 7 x 7 stem
    # weights of the three-channel model
    assert _n_params(m) == 11_689_512 - (512 * 1000 + 1000) + (512 * 10 + 10) - 2 * 64 * 7 * 7
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_profile_command_on_a_timm_model(tmp_path, capsys):
    pytest.importorskip("timm")
    import json

    from kdlab.cli.main import main

    rc = main(["profile", "timm:resnet18", "--num-classes", "10", "--input-size", "32",
               "--no-latency", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    row = json.loads((tmp_path / "profile.json").read_text())["rows"][0]
    assert row["params"] == 11_689_512 - (512 * 1000 + 1000) + (512 * 10 + 10)
    # ResNet-18 is 1.82 GMACs at 224x224 (He et al. 2016, Table 1: 1.8 GFLOPs counted as
    # multiply-adds); conv MACs scale with the pixel count, so at 32x32 about 1.82e9 / 49
    assert row["mmacs"] == pytest.approx(1.82e3 / 49, rel=0.03)


@pytest.mark.parametrize("spec,layer", [("timm:resnet18", "layer2"), ("torchvision:resnet18", "layer2")])
def test_timm_and_torchvision_students_distil(tmp_path, spec, layer):
    # a timm / torchvision student distilled from a kdlab teacher, with a feature loss on a layer
    # named as in named_modules(), then its checkpoint rebuilt by spec
    pytest.importorskip(spec.split(":")[0])
    import kdlab
    from kdlab.models.adapters import load_model

    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 32, 32, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()
    teacher = create_model("resnet8", num_classes=2, in_channels=3)
    res = kdlab.fit(spec, teacher, train_data=(x, y), val_data=(x[:16], y[:16]), test_data=(x, y),
                    num_classes=2, run_dir=tmp_path / "run", progress=False,
                    loss=[{"term": "ce", "weight": 0.5}, {"term": "kd", "weight": 0.5},
                          {"term": "at", "weight": 1.0, "layers": [[layer, "layer2"]]}],
                    train={"epochs": 1, "batch_size": 16, "device": "cpu"})
    assert res["n_test"] == 48 and res["epochs_run"] == 1
    model, ck = load_model(tmp_path / "run" / "best.pt")
    assert ck["model_name"] == spec and model(x[:2]).shape == (2, 2)
