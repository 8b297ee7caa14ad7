"""LMObjective: teacher isolation, on-policy sampling without gradient, accumulation normalisation."""

import pytest
import torch

from kdlab.core.seeding import derive_seed
from kdlab.lm.arithmetic import collate
from kdlab.lm.generate import generate
from kdlab.lm.losses import generalized_jsd, log_softmax_t, token_mean
from kdlab.lm.models import GPT
from kdlab.lm.objective import LMObjective, LMTerm, parse_terms
from kdlab.train.objective import Objective, StepContext


def _models(seed=0):
    torch.manual_seed(seed)
    return GPT(12, d_model=16, n_layer=1, n_head=2, max_len=40), GPT(12, d_model=8, n_layer=1, n_head=2, max_len=40)


def _batch(B=3, T=10):
    g = torch.Generator().manual_seed(1)
    return {"ids": torch.randint(0, 10, (B, T + 1), generator=g), "mask": torch.ones(B, T, dtype=torch.bool),
            "epoch": 0, "step": 0}


def test_protocol_and_no_gradient_reaches_teacher():
    teacher, student = _models()
    obj = LMObjective(student, terms=[{"term": "ce"}, {"term": "rkl", "weight": 0.5}], teacher=teacher)
    assert isinstance(obj, Objective) and obj.monitor == ("bpb", "min")
    assert set(obj.models()) == {"student"}
    ids = {id(p) for p in obj.parameters()}
    assert not ids & {id(p) for p in teacher.parameters()}
    loss, logs = obj.step(_batch(), StepContext(0, 0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert {"ce", "rkl", "loss", "n"} <= set(logs) and float(logs["n"]) == 30
    assert abs(float(logs["loss"]) - float(logs["ce"] + 0.5 * logs["rkl"])) < 1e-5


def test_on_policy_gradient_is_that_of_the_fixed_sample():
    teacher, student = _models()
    obj = LMObjective(student, terms=[{"term": "jsd", "beta": 0.5}], teacher=teacher, on_policy=1.0,
                      prompt_len=4, gen_len=6, seed=7)
    b = _batch()
    loss, _ = obj.step(b, StepContext(0, 0))
    loss.backward()
    assert obj.counts["on_policy"] == 1
    assert all(p.grad is None for p in teacher.parameters())
    g_obj = [p.grad.clone() for p in student.parameters()]
    # the same sample, drawn again with the same generator, then treated as fixed data
    student.zero_grad()
    gen = torch.Generator().manual_seed(derive_seed(7, "sample", 0, 0))
    seq, m = generate(student, b["ids"][:, :4], 6, greedy=False, generator=gen)
    assert not seq.requires_grad
    x = seq[:, :-1]
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, 3:] = m
    with torch.no_grad():
        tl = teacher(x)[0]
    ref = token_mean(generalized_jsd(log_softmax_t(student(x)[0]), log_softmax_t(tl), 0.5), mask)
    ref.backward()
    for a, p in zip(g_obj, student.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch():
    _, student = _models()
    pairs = [([1, 2], [3, 4, 5, 6, 7]), ([1], [2]), ([4, 5, 6], [7, 8]), ([2, 2], [3, 3, 3, 3, 3, 3])]
    full = collate(pairs, pad_id=11)
    micro = [collate(pairs[:1], 11), collate(pairs[1:], 11)]  # 5 tokens | 1 + 2 + 6 tokens
    n_total = int(full["mask"].sum())
    assert n_total == 14
    obj = LMObjective(student, terms=["ce"], pad_id=11)
    obj.step(full, StepContext(0, 0))[0].backward()
    g_full = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    for b in micro:  # a loop that divides by grad_accum = 2, given the window's token count
        loss, _ = obj.step(b, StepContext(0, 0, extra={"token_denominator": n_total, "grad_accum": 2}))
        (loss / 2).backward()
    for a, p in zip(g_full, student.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
    student.zero_grad()
    for b in micro:  # mean of per-micro-batch means: not the same
        (obj.step(b, StepContext(0, 0))[0] / 2).backward()
    assert not all(torch.allclose(a, p.grad, atol=1e-4) for a, p in zip(g_full, student.parameters()))


def test_term_validation_messages():
    with pytest.raises(ValueError, match="unknown LM loss term"):
        LMTerm("kl")
    with pytest.raises(ValueError, match="no parameter"):
        parse_terms([{"term": "fkl", "beta": 0.3}])
    with pytest.raises(ValueError, match="alpha must be in"):
        parse_terms([{"term": "skl", "alpha": 2}])
    _, student = _models()
    with pytest.raises(ValueError, match="need a teacher"):
        LMObjective(student, terms=["ce", "fkl"])


def test_on_policy_starts_at_the_given_epoch():
    """With on_policy = 1 and on_policy_start_epoch = 2, epochs 0 and 1 are supervised (CE on the
    data, no sampling) and epoch 2 samples; floor(0.5 * 10) = 5 is the first on-policy epoch."""
    from kdlab.lm.study import on_policy_start_epoch

    teacher, student = _models()
    obj = LMObjective(student, terms=[{"term": "ce"}, {"term": "fkl"}], teacher=teacher, on_policy=1.0,
                      on_policy_start_epoch=2, prompt_len=4, gen_len=6)
    for e in (0, 1):
        _, logs = obj.step(dict(_batch(), epoch=e), StepContext(e, 0))
        assert "ce" in logs
    assert obj.counts == {"on_policy": 0, "supervised": 2, "cache_hits": 0, "live_teacher": 2}
    _, logs = obj.step(dict(_batch(), epoch=2), StepContext(2, 0))
    assert "ce" not in logs and obj.counts["on_policy"] == 1
    assert on_policy_start_epoch(0.5, 10) == 5 and on_policy_start_epoch(0.0, 3) == 0
    assert on_policy_start_epoch(0.3, 10) == 3 and on_policy_start_epoch(0.99, 4) == 3
    with pytest.raises(ValueError, match="on_policy_start_epoch"):
        LMObjective(student, terms=["fkl"], teacher=teacher, on_policy=1.0, on_policy_start_epoch=-1)


def test_seqkd_batch_is_scored_by_the_live_teacher_on_generated_positions():
    """Sequence- plus word-level KD (Kim & Rush 2016): a batch of teacher generations
    (source "seqkd") is never looked up in the data cache; the fkl term is KL(P‖Q) of the dense
    teacher, averaged over the generated positions only."""
    from kdlab.lm.losses import forward_kl

    class NoCache:
        def get(self, *a):
            raise AssertionError("a seqkd batch must not read the data cache")

    teacher, student = _models()
    obj = LMObjective(student, terms=[{"term": "ce", "weight": 0.5}, {"term": "fkl", "weight": 0.5}],
                      teacher=teacher, cache=NoCache())
    b = _batch()
    b["mask"][:, :4] = False  # the prompt positions are not targets
    b["source"] = "seqkd"
    _, logs = obj.step(b, StepContext(0, 0))
    assert obj.counts["live_teacher"] == 1 and obj.counts["cache_hits"] == 0
    x = b["ids"][:, :-1]
    with torch.no_grad():
        ls, lt = log_softmax_t(student(x)[0]), log_softmax_t(teacher(x)[0])
        p = lt.exp()
        by_hand = (p * (lt - ls)).sum(-1)[:, 4:].mean()
    assert torch.allclose(logs["fkl"], by_hand, atol=1e-5)
    assert torch.allclose(forward_kl(ls, lt)[:, 4:].mean(), by_hand, atol=1e-6)
    assert float(logs["n"]) == 3 * 6
