"""Tests of kdlab.evaluate.efficiency against hand arithmetic and published totals.

FLOP convention under test: torch.utils.flop_counter.FlopCounterMode counts 2 FLOPs per
multiply-add of the convolution / matrix product and does NOT count the bias additions. The
textbook formulas with bias are conv ``2*h*w*d_out*(k*k*d_in + 1)`` FLOPs and linear
``I*O + O`` MACs; each test writes the textbook number by hand and subtracts the bias term
explicitly, so the convention is visible.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from kdlab.evaluate import efficiency as eff


# ------------------------------------------------------------------ hand counts
def test_conv_flops_match_hand_formula():
    # conv 3x3, d_in=3 -> d_out=8, 'same' padding on a 6x5 input -> 6x5 output
    h, w, k, d_in, d_out = 6, 5, 3, 3, 8
    conv = nn.Conv2d(d_in, d_out, k, padding=1, bias=True)
    textbook_with_bias = 2 * h * w * d_out * (k * k * d_in + 1)   # = 2*30*8*28 = 13440
    assert textbook_with_bias == 13440
    bias_flops = 2 * h * w * d_out                                # = 480, not counted
    got = eff.count_flops(conv, (1, d_in, h, w))
    assert got["flops"] == textbook_with_bias - bias_flops == 12960
    assert got["macs"] == h * w * d_out * k * k * d_in == 6480
    assert got["flops"] == 2 * got["macs"]


def test_conv_flops_strided_and_per_sample():
    # stride 2, no padding: 9x9 input, k=3 -> 4x4 output; batch of 4 is divided out
    conv = nn.Conv2d(2, 5, 3, stride=2, bias=False)
    got = eff.count_flops(conv, (4, 2, 9, 9))
    assert got["macs"] == 4 * 4 * 5 * 3 * 3 * 2 == 1440


def test_linear_flops_match_hand_formula():
    i, o = 7, 3
    lin = nn.Linear(i, o)
    textbook_macs_with_bias = i * o + o          # 24
    got = eff.count_flops(lin, (1, i))
    assert got["macs"] == textbook_macs_with_bias - o == 21
    assert got["flops"] == 42


def test_per_layer_breakdown_names_and_sums():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 4 * 4, 10))
    got = eff.count_flops(m, (1, 1, 4, 4), per_layer=True)
    rows = {r["name"]: r for r in got["per_layer"]}
    assert set(rows) == {"0", "3"}                       # ReLU/Flatten do no counted arithmetic
    assert rows["0"]["macs"] == 4 * 4 * 4 * 9 * 1 == 576
    assert rows["3"]["macs"] == 64 * 10 == 640
    assert rows["0"]["type"] == "Conv2d"
    assert got["macs"] == 576 + 640


def test_count_params_total_and_trainable():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))    # 4*3+3 = 15, 3*2+2 = 8
    m[0].weight.requires_grad_(False)                      # 12 frozen
    assert eff.count_params(m) == {"total": 23, "trainable": 11}


def test_memory_per_dtype_is_params_times_bytes():
    m = nn.Linear(10, 10)                                  # 110 params
    assert eff.memory_footprint(m) == {"fp32": 440, "fp16": 220, "bf16": 220, "int8": 110}
    bn = nn.BatchNorm1d(5)                                 # 10 params; buffers 5+5 fp32 + 1 int64
    assert eff.model_size_bytes(bn) == 10 * 4 + 10 * 4 + 8


def test_file_size(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"a" * 2_500_000)
    assert eff.file_size_mb(p) == pytest.approx(2.5)
    with pytest.raises(FileNotFoundError):
        eff.file_size_mb(tmp_path / "missing")


# ------------------------------------------------------------------ latency
def test_percentiles_hand_values():
    times = [float(v) for v in range(1, 11)]              # 1..10 ms
    s = eff.latency_stats(times, batch_size=4)
    assert s["median_ms"] == pytest.approx(5.5)
    assert s["p90_ms"] == pytest.approx(9.1)               # 1 + 0.9 * 9 = 9.1 (linear)
    assert s["images_per_s"] == pytest.approx(4 / 0.0055)


def test_measure_latency_fields():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    r = eff.measure_latency(m, (1, 3, 8, 8), batch_size=3, warmup=1, repeats=5)
    assert set(r) == {"median_ms", "p90_ms", "images_per_s", "threads", "batch_size", "device"}
    assert r["batch_size"] == 3 and r["threads"] == torch.get_num_threads()
    assert r["device"] == "cpu"
    assert 0 < r["median_ms"] <= r["p90_ms"]
    assert r["images_per_s"] == pytest.approx(3 / (r["median_ms"] / 1e3))


def test_time_callable_counts_calls_and_syncs():
    calls, syncs = [], []
    t = eff.time_callable(lambda: calls.append(1), warmup=2, repeats=3,
                          sync=lambda: syncs.append(1))
    assert len(t) == 3 and len(calls) == 5 and len(syncs) == 6


def test_profile_model_keys():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(32, 3))
    p = eff.profile_model(m, (1, 4, 4), batch_sizes=(1, 2), warmup=0, repeats=2, per_layer=True)
    assert p["params_total"] == 18 + 32 * 3 + 3
    assert p["macs"] == 16 * 2 * 9 + 96
    assert p["memory_mb"]["int8"] == pytest.approx(p["params_total"] / 1e6)
    assert [r["batch_size"] for r in p["latency"]] == [1, 2]
    row = eff.profile_row(p)
    assert {"latency_b1_ms", "latency_b2_ms", "images_per_s_b2", "threads"} <= set(row)
    # one row builder, one set of names: params 117, MACs 384 (= 0.000384 M), FLOPs twice that
    assert row["params"] == 18 + 32 * 3 + 3 and row["mmacs"] == pytest.approx(384 / 1e6)
    assert row["mflops"] == pytest.approx(2 * 384 / 1e6)


# ------------------------------------------------------------------ known totals
def _create_model(name):
    models = pytest.importorskip("kdlab.models")
    if not hasattr(models, "create_model"):
        pytest.skip("kdlab.models.create_model not available yet")
    try:
        return models.create_model(name, num_classes=10, in_channels=3)
    except KeyError:
        pytest.skip(f"model {name} not registered")


def test_cifar_resnet18_known_totals():
    # CIFAR-style ResNet-18 (3x3 stem, no max-pool; kuangliu/pytorch-cifar): 11,173,962 params,
    # about 0.556 G MACs at 32x32 (convs + fc; bias/BN not counted).
    m = _create_model("resnet18")
    assert eff.count_params(m)["total"] == 11_173_962
    f = eff.count_flops(m, (1, 3, 32, 32))
    assert f["macs"] / 1e9 == pytest.approx(0.556, abs=0.002)
    assert f["flops"] == 2 * f["macs"]


def test_cifar_resnet50_known_totals():
    # CIFAR-style ResNet-50: 23,520,842 params, about 1.30 G MACs at 32x32.
    m = _create_model("resnet50")
    assert eff.count_params(m)["total"] == 23_520_842
    f = eff.count_flops(m, (1, 3, 32, 32))
    assert f["macs"] / 1e9 == pytest.approx(1.30, abs=0.01)
