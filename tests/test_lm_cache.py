"""Sparse top-k teacher cache: reconstruction error by hand, storage, keying, and use in training."""

import math

import torch

from kdlab.lm.cache import SparseTeacherCache, reconstruct, sparse_kl_error, state_fingerprint, topk_entry
from kdlab.lm.corpora import WindowLoader
from kdlab.lm.models import GPT
from kdlab.lm.objective import LMObjective
from kdlab.train.objective import StepContext


def test_topk_reconstruction_and_error_bound_by_hand():
    p = torch.tensor([0.05, 0.5, 0.15, 0.3])
    idx, top, lt = topk_entry(p.log(), 2)  # log-probs are their own logits
    assert idx.tolist() == [1, 3]
    assert torch.allclose(top.exp(), torch.tensor([0.5, 0.3]))
    assert abs(float(lt.exp()) - 0.2) < 1e-6
    # P̂: kept ids exact, tail .2 spread over the 2 other ids -> [.1, .5, .1, .3]
    assert torch.allclose(reconstruct(idx, top, lt, 4).exp(), torch.tensor([0.1, 0.5, 0.1, 0.3]), atol=1e-6)
    # KL(P‖P̂) = .05 ln(.05/.1) + .15 ln(.15/.1); bound r·ln(V−k) = .2 ln 2
    err = float(sparse_kl_error(p.log(), 2))
    assert abs(err - (0.05 * math.log(0.5) + 0.15 * math.log(1.5))) < 1e-6
    assert 0 <= err <= 0.2 * math.log(2)
    assert abs(float(sparse_kl_error(p.log(), 3))) < 1e-6  # one id left: the tail is exact


def _setup(tmp_path, k=4):
    torch.manual_seed(0)
    teacher = GPT(20, d_model=16, n_layer=1, n_head=2, max_len=32)
    stream = torch.randint(0, 18, (500,))
    loader = WindowLoader(stream, seq_len=8, batch_size=3, steps=2, seed=0)
    cache = SparseTeacherCache(tmp_path, state_fingerprint(teacher), loader.fingerprint(), k, 20)
    return teacher, loader, cache


def test_cache_roundtrip_size_and_key(tmp_path):
    teacher, loader, cache = _setup(tmp_path)
    cache.build(teacher, loader, epochs=2)
    b = list(loader.epoch(1))[1]
    with torch.no_grad():
        idx, top, lt = topk_entry(teacher(b["ids"][:, :-1])[0], 4)
    ci, cl, ct = cache.get(1, 1)
    assert torch.equal(ci.long(), idx)
    assert torch.allclose(cl.float(), top, atol=2e-3) and torch.allclose(ct.float(), lt, atol=2e-2)
    rep = cache.size_report()
    assert rep["tokens"] == 2 * 2 * 3 * 8
    assert rep["dense_fp16_bytes"] == rep["tokens"] * 20 * 2
    # payload per token: k int16 ids + k fp16 log-probs + one fp16 tail = 4·2 + 4·2 + 2 = 18 bytes
    assert rep["payload_bytes_per_token"] == 18 and rep["bytes_per_token_dense"] == 40
    assert rep["sparse_bytes"] >= rep["payload_bytes"]  # on disk: payload + file headers
    # other teacher weights -> another folder (a stale cache is never read)
    with torch.no_grad():
        teacher.tok.weight.add_(1.0)
    other = SparseTeacherCache(tmp_path, state_fingerprint(teacher), loader.fingerprint(), 4, 20)
    assert other.dir != cache.dir and not other.has(0)


def test_cached_training_step_runs_no_teacher(tmp_path):
    teacher, loader, cache = _setup(tmp_path)
    cache.build(teacher, loader, epochs=1)
    student = GPT(20, d_model=8, n_layer=1, n_head=2, max_len=32)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    obj = LMObjective(student, terms=["ce", "fkl"], teacher=teacher, cache=cache)
    for s, b in enumerate(loader.epoch(0)):
        loss, logs = obj.step(b, StepContext(0, s))
        loss.backward()
    assert calls == [] and obj.counts["cache_hits"] == 2
    assert all(p.grad is None for p in teacher.parameters())


def test_sparse_vs_dense_paired_difference_by_hand():
    from kdlab.lm.study import sparse_vs_dense

    rows = [{"method": "fkl", "seed": 0, "test_bpb": 3.0, "test_kl": 1.0, "test_agree": 0.5},
            {"method": "fkl", "seed": 1, "test_bpb": 3.2, "test_kl": 1.0, "test_agree": 0.5},
            {"method": "fkl_dense", "seed": 0, "test_bpb": 2.9, "test_kl": 1.0, "test_agree": 0.5},
            {"method": "fkl_dense", "seed": 1, "test_bpb": 3.0, "test_kl": 1.0, "test_agree": 0.5},
            {"method": "ce", "seed": 0, "test_bpb": 4.0}]
    (d,) = sparse_vs_dense(rows)
    # differences .1 and .2: mean .15, sd .0707, half-width t(.975, 1)·sd/√2 = 12.706·.05
    assert d["dense"] == "fkl_dense" and d["n_paired"] == 2
    assert abs(d["bpb_diff"] - 0.15) < 1e-9 and abs(d["bpb_diff_ci95"] - 12.7062 * 0.05) < 1e-3
