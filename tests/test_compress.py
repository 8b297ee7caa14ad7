"""Tests of kdlab.compress: quantization arithmetic, pruning, ONNX export, the CLI.

Expected values are worked out by hand in the comments; models are tiny (cnn_tiny on 8x8).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdlab.compress import input_shape_of, load_compressed, save_compressed
from kdlab.compress import prune as P
from kdlab.compress import quantize as Q
from kdlab.evaluate.efficiency import count_flops, count_params


# ------------------------------------------------------------------ helpers
def _tiny(in_channels=1, name="cnn_tiny", seed=0):
    from kdlab.models import create_model

    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=in_channels).eval()


def _loader(n=64, c=1, hw=8, batch=16, seed=0):
    from kdlab.data import BatchLoader, TensorSet

    g = torch.Generator().manual_seed(seed)
    ts = TensorSet(torch.rand(n, c, hw, hw, generator=g), torch.randint(0, 10, (n,), generator=g))
    return BatchLoader(ts, batch, shuffle=True, seed=seed, augment=None, mean=(0.5,) * c,
                       std=(0.25,) * c)


def _ckpt(model, name="cnn_tiny", in_channels=1, **extra):
    return {"model_name": name, "model_kwargs": {}, "num_classes": 10,
            "in_channels": in_channels, "dataset": "digits", **extra}


# ------------------------------------------------------------------ affine quantization
def test_symmetric_4bit_worked_example_with_clip():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    s, z = Q.compute_qparams(x, 4, symmetric=True)
    assert float(s) == pytest.approx(1 / 8)          # max|x| / 2^(b-1) = 1/8
    assert float(z) == 0.0
    q = Q.quantize(x, s, z, 4)
    # x/s = [-8, -4, 0, 4, 8]; 8 is clipped to 2^(4-1)-1 = 7
    assert q.tolist() == [-8, -4, 0, 4, 7]
    assert Q.dequantize(q, s, z).tolist() == [-1.0, -0.5, 0.0, 0.5, 0.875]


def test_symmetric_8bit_clip_and_range():
    assert Q.qrange(8) == (-128, 127) and Q.qrange(4) == (-8, 7)
    x = torch.tensor([-1.0, 1.0])
    s, z = Q.compute_qparams(x, 8)
    assert Q.quantize(x, s, z, 8).tolist() == [-128, 127]      # 1/(1/128) = 128 -> 127
    with pytest.raises(ValueError):
        Q.qrange(1)


def test_asymmetric_worked_example():
    # range [0, 1.5], 4 bits: s = 1.5 / 15 = 0.1; z = round(0 / 0.1) + 8 = 8
    x = torch.tensor([0.0, 0.3, 0.7, 1.5])
    s, z = Q.compute_qparams(x, 4, symmetric=False)
    assert float(s) == pytest.approx(0.1)
    assert float(z) == 8.0
    q = Q.quantize(x, s, z, 4)
    assert q.tolist() == [-8, -5, -1, 7]            # x/s - z = [-8, -5, -1, 7]
    assert Q.dequantize(q, s, z) == pytest.approx(x, abs=1e-6)


def test_asymmetric_negative_range_represents_zero_exactly():
    # [-1, 2] over 8 bits: s = 3/255; z = round(-1 / s) + 128 = round(-85) + 128 = 43
    x = torch.tensor([-1.0, 0.0, 2.0])
    s, z = Q.compute_qparams(x, 8, symmetric=False)
    assert float(s) == pytest.approx(3 / 255)
    assert float(z) == 43.0
    q = Q.quantize(x, s, z, 8)
    assert q.tolist() == [-128, -43, 127]
    assert float(Q.dequantize(q, s, z)[1]) == 0.0


def test_per_channel_scales():
    w = torch.tensor([[-1.0, 0.5], [2.0, -4.0]])
    s, z = Q.compute_qparams(w, 8, symmetric=True, axis=0)
    assert s.flatten().tolist() == pytest.approx([1 / 128, 4 / 128])
    # row 0: [-1, .5] * 128 = [-128, 64]; row 1: [2, -4] * 32 = [64, -128]
    assert Q.quantize(w, s, z, 8).tolist() == [[-128, 64], [64, -128]]


def test_fake_quantize_values_and_straight_through_gradient():
    x = torch.tensor([-1.0, -0.5, 0.1, 0.5, 1.0], requires_grad=True)
    y = Q.fake_quantize(x, 4)                         # s = 1/8
    assert y.tolist() == pytest.approx([-1.0, -0.5, 0.125, 0.5, 0.875])  # 0.1*8 = 0.8 -> 1
    y.sum().backward()
    # STE: gradient 1 through round, 0 where clipped (only x = 1 -> 8 > 7)
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_straight_through_gradient_at_the_clip_boundaries():
    # 4 bits, s = 1/8, z = 0: q = clip(round(8x), -8, 7). Worked by hand:
    #   x       8x     round  clipped?  x_hat    STE gradient
    #  -1.125   -9     -9     yes       -1.0     0
    #  -1.0625  -8.5   -8     no        -1.0     1   (half to even)
    #  -1.0     -8     -8     no        -1.0     1   lower boundary: inside the closed range
    #   0.875    7      7     no         0.875   1   upper boundary: inside the closed range
    #   0.9375   7.5    8     yes        0.875   0   (half to even rounds up to 8)
    #   1.0      8      8     yes        0.875   0
    x = torch.tensor([-1.125, -1.0625, -1.0, 0.875, 0.9375, 1.0], requires_grad=True)
    y = Q.fake_quantize(x, 4, scale=0.125, zero_point=0.0)
    assert y.tolist() == [-1.0, -1.0, -1.0, 0.875, 0.875, 0.875]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # the same mask as torch's fused fake-quantization kernel (zero point sign: x/s + zp there)
    x2 = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x2, 0.125, 0, -8, 7).sum().backward()
    assert x2.grad.tolist() == x.grad.tolist()


def test_straight_through_gradient_asymmetric_boundaries():
    # 4 bits, s = 0.5, z = -3: q = clip(round(2x + 3), -8, 7); boundaries at x = -5.5 and 2.0
    x = torch.tensor([-6.0, -5.5, 0.0, 2.0, 2.5], requires_grad=True)
    y = Q.fake_quantize(x, 4, scale=0.5, zero_point=-3.0)
    # x_hat = 0.5 * (q - 3): q = [-8 (clipped from -9), -8, 3, 7, 7 (clipped from 8)]
    assert y.tolist() == [-5.5, -5.5, 0.0, 2.0, 2.0]
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]


def test_fake_quant_model_calibrate_and_roundtrip(tmp_path):
    m = _tiny()
    fq = Q.prepare_fake_quant(m, 8, 8)
    assert sum(isinstance(x, Q.QuantWrapper) for x in fq.modules()) == 4  # 3 convs + fc
    loader = _loader()
    Q.calibrate(fq, ((x, y) for x, y, _ in loader.epoch(0)))
    x = next(loader.epoch(0))[0]
    with torch.no_grad():
        ref, got = m(x), fq(x)
    assert (ref - got).abs().max() < 0.1 * ref.abs().max()   # 8 bits: small error
    w = fq.stage1[0].conv._qweight()
    s = fq.stage1[0].conv.inner.weight.abs().amax(dim=(1, 2, 3)) / 128   # per-channel grid
    # every fake-quantized weight lies on its channel's grid k*s (up to float rounding)
    k = w / s.view(-1, 1, 1, 1)
    assert (k - k.round()).abs().max() < 1e-3
    path = save_compressed(fq, tmp_path / "fq.pt", _ckpt(m), quantized=Q.fake_quant_config(fq))
    back, ck = load_compressed(path)
    with torch.no_grad():
        assert torch.allclose(back(x), got, atol=1e-6)
    assert ck["quantized"]["weight_bits"] == 8


# ------------------------------------------------------------------ unstructured pruning
def _two_linear():
    m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        m[1].weight.copy_(torch.tensor([[0.5, -5.0]]))
    return m


def test_global_and_local_masks_by_hand():
    m = _two_linear()
    scores = P.magnitude_scores(m)
    # global 50% of 6 weights = 3 smallest |w|: 0.5, 1, 2
    g = P.compute_masks(scores, 0.5, "global")
    assert g["0"].tolist() == [[False, False], [True, True]]
    assert g["1"].tolist() == [[False, True]]
    # local 50%: layer 0 loses 2 (1, 2), layer 1 loses round(0.5*2) = 1 (0.5)
    loc = P.compute_masks(scores, 0.5, "local")
    assert loc["0"].tolist() == [[False, False], [True, True]]
    assert loc["1"].tolist() == [[False, True]]
    # global 1/3 of 6 = 2 smallest: 0.5 and 1 -> layer 0 keeps 3 of 4
    g3 = P.compute_masks(scores, 1 / 3, "global")
    assert g3["0"].tolist() == [[False, True], [True, True]] and g3["1"].tolist() == [[False, True]]


def test_gradient_importance_by_hand():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.zeros(2, dtype=torch.long)
    # loss = sum of outputs -> dL/dw = sum of inputs = [4, 6]; |w*g| = [2, 6]; two batches -> x2
    s = P.gradient_scores(nn.Sequential(lin), [(x, y), (x, y)], loss_fn=lambda out, _: out.sum())
    assert s["0"].tolist() == [[4.0, 12.0]]


def test_exact_sparsity_even_with_ties():
    m = nn.Sequential(nn.Linear(10, 10, bias=False))
    nn.init.constant_(m[0].weight, 1.0)                        # all scores tie
    pm, masks = P.prune_unstructured(m, 0.37, scope="global")
    assert int((pm[0].weight == 0).sum()) == 37                # round(0.37 * 100)
    assert int((m[0].weight == 0).sum()) == 0                  # input not modified


@pytest.mark.parametrize("scope", ["global", "local"])
def test_prune_cnn_reaches_requested_sparsity_exactly(scope):
    m = _tiny()
    pm, masks = P.prune_unstructured(m, 0.6, scope=scope)
    layers = P.prunable_layers(m)
    n = sum(l.weight.numel() for l in layers.values())          # 72+1152+4608+320 = 6152
    assert n == 1 * 8 * 9 + 8 * 16 * 9 + 16 * 32 * 9 + 32 * 10
    rep = P.sparsity_report(pm)
    if scope == "global":
        assert rep["zeros"] == round(0.6 * n)
    else:
        assert rep["zeros"] == sum(round(0.6 * l.weight.numel()) for l in layers.values())
        for name, l in layers.items():
            assert rep["per_layer"][name] == pytest.approx(round(0.6 * l.weight.numel()) / l.weight.numel())


def test_iterative_pruning_with_masked_finetune_keeps_exact_sparsity(tmp_path):
    from kdlab.compress.finetune import evaluate_accuracy, finetune

    m = _tiny()
    loader = _loader()
    assert P.sparsity_schedule(0.5, 2) == [0.25, 0.5]
    assert P.sparsity_schedule(0.8, 2, "cubic") == pytest.approx([0.8 * (1 - 0.125), 0.8])
    seen = []

    def ft(model, masks):
        finetune(model, loader, epochs=1, teacher=m, masks=masks, max_steps=2, progress=False)
        seen.append(P.sparsity_report(model)["zeros"])

    pm, masks, hist = P.prune_iterative(m, 0.5, steps=2, importance="gradient",
                                        batches_fn=lambda: ((x, y) for x, y, _ in loader.epoch(0)),
                                        finetune_fn=ft, progress=False)
    n = P.sparsity_report(m)["total"]
    assert seen == [round(0.25 * n), round(0.5 * n)]           # masks survive fine-tuning
    path = save_compressed(pm, tmp_path / "p.pt", _ckpt(m), pruned={"method": "unstructured"})
    back, _ = load_compressed(path)
    assert P.sparsity_report(back)["zeros"] == round(0.5 * n)
    assert 0.0 <= evaluate_accuracy(back, loader) <= 1.0


# ------------------------------------------------------------------ structured pruning
def test_structured_pruning_removes_channels_and_flops(tmp_path):
    from kdlab.compress.finetune import evaluate_accuracy, finetune

    m = _tiny()
    pm = P.prune_structured(m, 0.5, (1, 8, 8))
    convs = [pm.stage1[0].conv, pm.stage2[0].conv, pm.stage3[0].conv]
    assert [c.out_channels for c in convs] == [4, 8, 16]        # 8/16/32 halved
    assert pm.fc.out_features == 10 and pm.fc.in_features == 16 and pm.feature_dim == 16
    # MACs by hand at 8x8: 8x8*4*9*1 + 4x4*8*9*4 + 2x2*16*9*8 + 16*10
    assert count_flops(pm, (1, 1, 8, 8))["macs"] == 2304 + 4608 + 4608 + 160
    # params: convs 36+288+1152, BN 2*(4+8+16), fc 160+10
    assert count_params(pm)["total"] == 36 + 288 + 1152 + 56 + 170
    loader = _loader()
    finetune(pm, loader, epochs=1, teacher=m, max_steps=2, progress=False)
    path = save_compressed(pm, tmp_path / "s.pt", _ckpt(m),
                           pruned={"method": "structured", "ratio": 0.5, "arch": P.layer_specs(pm)})
    back, ck = load_compressed(path)
    x = next(loader.epoch(0))[0]
    with torch.no_grad():
        assert torch.allclose(back(x), pm.eval()(x), atol=1e-6)
    assert 0.0 <= evaluate_accuracy(back, loader) <= 1.0
    with pytest.raises(Exception):                               # plain loader cannot fit it
        from kdlab.models.adapters import load_model
        load_model(path)


def test_structured_iterative_gradient_importance():
    m = _tiny()
    loader = _loader()
    pm, masks, hist = P.prune_iterative(
        m, 0.5, steps=2, method="structured", scope="local", importance="gradient",
        input_shape=(1, 8, 8),
        batches_fn=lambda: ((x, y) for x, y, _ in loader.epoch(0)), progress=False)
    assert masks is None and len(hist) == 2
    assert [pm.stage1[0].conv.out_channels, pm.stage3[0].conv.out_channels] == [4, 16]


def test_input_shape_of():
    assert input_shape_of({"in_channels": 1, "dataset": "digits"}) == (1, 8, 8)
    assert input_shape_of({"in_channels": 3, "dataset": "cifar10"}) == (3, 32, 32)
    assert input_shape_of({"in_channels": 3, "input_shape": [3, 16, 16]}) == (3, 16, 16)


# ------------------------------------------------------------------ ONNX
def test_onnx_export_agrees_with_pytorch_and_int8_is_smaller(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kdlab.compress.export import OnnxModel, check_onnx, export_onnx

    m = _tiny(name="cnn_small")                                  # 24,058 params
    p = export_onnx(m, tmp_path / "m.onnx", (1, 8, 8))
    chk = check_onnx(m, p, (1, 8, 8), batch_size=5)              # batch 5 != export batch
    assert chk["ok"] and chk["max_abs_diff"] < 1e-4 and chk["argmax_agree"] == 1.0
    loader = _loader()
    q = Q.quantize_onnx_static(p, tmp_path / "m8.onnx", [x for x, _, _ in loader.epoch(0)])
    # weights are 96 KB in fp32 and 24 KB in int8; graph overhead keeps the ratio below 4
    assert q.stat().st_size < 0.5 * p.stat().st_size
    x = next(loader.epoch(0))[0]
    with torch.no_grad():
        ref = m(x)
    got = OnnxModel(q)(x)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from kdlab.core.checkpoint import atomic_save, model_checkpoint

    d = tmp_path_factory.mktemp("ck")
    for who, name in (("teacher", "cnn_small"), ("student", "cnn_tiny")):
        atomic_save(model_checkpoint(_tiny(name=name), model_name=name, model_kwargs={},
                                     num_classes=10, in_channels=1, dataset="digits"),
                    d / f"{who}.pt")
    return d


def test_cli_registered():
    from kdlab.cli.main import build_parser

    p = build_parser()
    for cmd in ("profile", "prune", "quantize", "export", "deploy"):
        args = p.parse_args([cmd, "x.pt", "--sparsity", "0.5"] if cmd == "prune" else
                            [cmd, "--student", "a", "--teacher", "b"] if cmd == "deploy" else
                            [cmd, "x.pt"])
        assert callable(args.func)


def test_cli_profile_model_name(tmp_path, capsys):
    from kdlab.cli.main import main

    rc = main(["profile", "cnn_tiny", "--in-channels", "1", "--input-size", "8", "--per-layer",
               "--warmup", "1", "--repeats", "2", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| params | 6,274 |" in out                            # documented cnn_tiny count
    row = json.loads((tmp_path / "profile.json").read_text())["rows"][0]
    assert row["mmacs"] * 1e6 == pytest.approx(8 * 8 * 8 * 9 + 4 * 4 * 16 * 9 * 8
                                               + 2 * 2 * 32 * 9 * 16 + 320)
    assert (tmp_path / "profile_layers.csv").exists()


def test_cli_errors_exit_2(tmp_path, capsys):
    from kdlab.cli.main import main

    assert main(["prune", str(tmp_path / "missing.pt"), "--sparsity", "0.5"]) == 2
    assert "kdlab: error:" in capsys.readouterr().err


def test_cli_deploy_end_to_end(ckpts, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from kdlab.cli.main import main

    out = tmp_path / "deploy"
    rc = main(["deploy", "--student", str(ckpts / "student.pt"), "--teacher",
               str(ckpts / "teacher.pt"), "--sparsities", "0.25", "0.5", "--finetune-epochs", "1",
               "--max-steps", "2", "--warmup", "1", "--repeats", "3", "--calib-batches", "2",
               "--quiet", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "deploy.json").read_text())["rows"]
    assert [r["model"].split(" (")[0] for r in rows] == [
        "teacher", "student", "student pruned 25%", "student pruned 50%", "student fp32",
        "student int8"]
    s, p25, p50 = rows[1], rows[2], rows[3]
    assert p50["flops"] < p25["flops"] < s["flops"]
    assert s["params"] == 6274
    for r in rows:
        assert 0 <= r["acc"] <= 100 and r["file_mb"] > 0 and r["latency_b1_ms"] > 0
    assert (out / "deploy.csv").exists() and (out / "deploy.md").exists()
    assert "| teacher (cnn_small)" in capsys.readouterr().out
    back, ck = load_compressed(out / "models" / "student_pruned50.pt")
    assert count_flops(back, (1, 1, 8, 8))["flops"] == p50["flops"]


def test_cli_prune_quantize_export(ckpts, tmp_path, capsys):
    from kdlab.cli.main import main

    out = tmp_path / "p"
    rc = main(["prune", str(ckpts / "student.pt"), "--sparsity", "0.5", "--warmup", "1",
               "--repeats", "2", "--quiet", "--device", "cpu", "--out", str(out),
               "--model-out", str(tmp_path / "pruned.pt")])
    assert rc == 0 and (out / "prune.json").exists()
    pruned, ck = load_compressed(tmp_path / "pruned.pt")
    assert ck["pruned"]["achieved"] == pytest.approx(0.5, abs=0.01)  # global unstructured: half the weights
    rows = json.loads((out / "prune.json").read_text())["rows"]
    assert rows[1]["weight_sparsity"] > 45 and rows[0]["params"] == rows[1]["params"] == 6274

    out = tmp_path / "q"
    assert main(["quantize", str(ckpts / "student.pt"), "--bits", "8", "4", "--calib-batches", "1",
                 "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "quantize.json").read_text())["rows"]
    assert [r["weight_bits"] for r in rows] == [32, 8, 4]

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "e"
    assert main(["export", str(ckpts / "student.pt"), "--out", str(out)]) == 0
    assert (out / "model.onnx").exists() and "| True |" in capsys.readouterr().out.replace("true", "True")
