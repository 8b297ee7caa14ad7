"""Language-model distillation at the edges (issue 28, defects 1-6): exact sparse tail mass, the
temperature-factor convention, non-finite logits at padded positions, the arithmetic study's test
split, the throughput name and the cache's bytes per token."""

import json
import math

import pytest
import torch

from kdlab.lm.cache import SparseTeacherCache, state_fingerprint, topk_entry
from kdlab.lm.corpora import WindowLoader
from kdlab.lm.losses import LOG_FLOOR, bucket_logprobs, kd_loss, reverse_kl
from kdlab.lm.models import GPT
from kdlab.lm.objective import LMObjective, LMTerm
from kdlab.train.objective import StepContext


def _peaky(V=50, k=8, tail=1e-9, q_tail=0.3):
    """Teacher: k head ids hold 1 − tail, the other V − k share ``tail`` uniformly; student: another
    head, q_tail spread uniformly over the same tail ids (equal conditional tails, so the bucketed
    KLs equal the dense ones exactly, by the chain rule)."""
    g = torch.Generator().manual_seed(0)
    head_p = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    head_q = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    p = torch.full((V,), tail / (V - k), dtype=torch.float64)
    q = torch.full((V,), q_tail / (V - k), dtype=torch.float64)
    p[:k] = head_p / head_p.sum() * (1 - tail)
    q[:k] = head_q / head_q.sum() * (1 - q_tail)
    return p.log(), q.log()


def test_peaky_teacher_tail_is_exact_and_bucketed_rkl_equals_dense():
    logp64, logq64 = _peaky()
    dense = float((logq64.exp() * (logq64 - logp64)).sum())  # KL(Q‖P), float64, by hand
    # what the cache stores, from float32 logits (log-probabilities are logits up to a constant)
    idx, top, log_tail = topk_entry(logp64.float().unsqueeze(0), 8)
    assert float(log_tail) > LOG_FLOOR + 1  # not floored
    assert abs(float(log_tail) - math.log(1e-9)) < 1e-3  # log r exact, r = 1e-9
    ls, lt = bucket_logprobs(torch.log_softmax(logq64.float(), -1).unsqueeze(0), idx, top, log_tail)
    assert abs(float(reverse_kl(ls, lt)) - dense) < 1e-3


def test_cache_of_a_confident_teacher_has_no_floored_position(tmp_path):
    class Confident(torch.nn.Module):  # logits: id 0 at +40 over the rest -> tail mass ~ 1e-16
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            z = torch.zeros(*ids.shape, 20) + self.w
            z[..., :4] += torch.tensor([40.0, 38.0, 37.0, 36.0])
            return z, None

    t = Confident()
    loader = WindowLoader(torch.randint(0, 20, (300,)), seq_len=8, batch_size=2, steps=2, seed=0)
    cache = SparseTeacherCache(tmp_path, state_fingerprint(t), loader.fingerprint(), 4, 20).build(t, loader, 1)
    _, _, lt = cache.get(0, 0)
    # true tail: 16 ids at logit 0 against logsumexp(40, 38, 37, 36)
    want = math.log(16) - float(torch.logsumexp(torch.tensor([40.0, 38.0, 37.0, 36.0], dtype=torch.float64), 0))
    assert (lt.float() > LOG_FLOOR + 1).all()
    assert torch.allclose(lt.float(), torch.full_like(lt.float(), want), atol=0.05)  # fp16 storage


def _ref_gjsd(zs, zt, beta, tau):
    """TRL's generalized JSD (logits / τ, no τ² factor), float64, written out by hand."""
    p = torch.softmax(zt.double() / tau, -1)
    q = torch.softmax(zs.double() / tau, -1)
    m = beta * p + (1 - beta) * q
    return float((beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)).mean())


def test_temperature_scale_is_an_explicit_option():
    torch.manual_seed(0)
    zs, zt = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    ref = _ref_gjsd(zs, zt, 0.5, 2.0)
    none = kd_loss("jsd", zs, zt, mask, temperature=2.0, temperature_scale="none", beta=0.5)
    tau2 = kd_loss("jsd", zs, zt, mask, temperature=2.0, beta=0.5)
    assert abs(float(none) - ref) < 1e-5 and abs(float(tau2) - 4 * ref) < 4e-5
    # the LM objective reads the same option from a term
    assert LMTerm("jsd", 1.0, {"temperature": 2.0, "temperature_scale": "none"}).factor == 1.0
    assert LMTerm("rkl", 1.0, {"temperature": 2.0}).factor == 4.0
    with pytest.raises(ValueError, match="temperature_scale"):
        LMTerm("fkl", 1.0, {"temperature_scale": "tau"})


class _NaNAt(torch.nn.Module):
    """A model whose logits are NaN at one (padded) position."""

    def __init__(self, inner, pos):
        super().__init__()
        self.inner, self.pos = inner, pos

    def forward(self, x, past=None):
        z, p = self.inner(x, past)
        z = z.clone()
        z[self.pos] = float("nan")
        return z, p


def test_nan_logits_at_a_padded_position_leave_the_loss_finite_and_unchanged():
    torch.manual_seed(0)
    teacher, student = GPT(12, d_model=16, n_layer=1, n_head=2, max_len=40), GPT(12, d_model=8, n_layer=1, n_head=2, max_len=40)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 10, (3, 9), generator=g)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 6:] = False  # padding at the end of row 1
    terms = [{"term": "ce"}, {"term": "fkl", "weight": 0.5}, {"term": "jsd", "weight": 0.5}]
    clean = LMObjective(student, terms=terms, teacher=teacher)
    l0, logs0 = clean.step({"ids": ids, "mask": mask, "epoch": 0, "step": 0}, StepContext(0, 0))
    bad = LMObjective(_NaNAt(student, (1, 7)), terms=terms, teacher=teacher)
    l1, logs1 = bad.step({"ids": ids, "mask": mask, "epoch": 0, "step": 0}, StepContext(0, 0))
    assert torch.isfinite(l1) and abs(float(l1.detach()) - float(l0.detach())) < 1e-6
    student.zero_grad()
    l1.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    # and kd_loss alone
    zs, zt = torch.randn(3, 8, 12), torch.randn(3, 8, 12)
    ref = kd_loss("rkl", zs, zt, mask)
    zs[1, 7] = float("nan")
    assert abs(float(kd_loss("rkl", zs, zt, mask)) - float(ref)) < 1e-6


def test_arithmetic_runs_report_test_split_and_tokens_per_s(tmp_path):
    from kdlab.lm.arithmetic import ProblemLoader, encode_examples, make_problems, render
    from kdlab.lm.arithmetic_study import arith_run
    from kdlab.lm.recipe import LMModelCfg, LMTrainCfg
    from kdlab.lm.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    enc = lambda ps: encode_examples([render(a, op, b, False, 0) for a, op, b in ps], tok)  # noqa: E731
    train = make_problems(40, [1], ["+"], seed="train")
    val = make_problems(8, [1], ["+"], seed="val", exclude=set(train))
    test = make_problems(8, [2], ["+"], seed="test")  # another digit count: its bpb differs from val's
    cfg = LMModelCfg(model="gpt", kwargs={"d_model": 16, "n_layer": 1, "n_head": 2, "max_len": 32})
    t = LMTrainCfg(epochs=1, steps_per_epoch=2, batch_size=4, eval_batch_size=8, device="cpu")
    model, res = arith_run(cfg, enc(train), enc(val), enc(test), t, tmp_path / "run", 0, "answers", tok)
    obj = LMObjective(model, pad_id=tok.pad_id)
    want = obj.evaluate("student", ProblemLoader(enc(test), 8, tok.pad_id, shuffle=False))["nll"]
    assert abs(res["test_nll"] - want) < 1e-6 and abs(res["test_nll"] - res["val_nll"]) > 1e-4
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["sample_unit"] == "tokens" and saved["tokens_per_s"] > 0 and "images_per_s" not in saved


def test_cache_bytes_per_token_counts_int32_ids(tmp_path):
    from kdlab.lm.cache import payload_bytes_per_token

    # by hand: k ids (2 bytes as int16 up to 32,767 ids, 4 as int32 above) + k fp16 + one fp16
    assert payload_bytes_per_token(8, 258) == 8 * 4 + 2 == 34
    assert payload_bytes_per_token(8, 40_000) == 8 * 6 + 2 == 50

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 40_000)

        def forward(self, ids):
            return self.emb(ids), None

    torch.manual_seed(0)
    t = Big()
    loader = WindowLoader(torch.randint(0, 30, (200,)), seq_len=4, batch_size=2, steps=1, seed=0)
    cache = SparseTeacherCache(tmp_path, state_fingerprint(t), loader.fingerprint(), 8, 40_000).build(t, loader, 1)
    rep = cache.size_report()
    assert rep["payload_bytes_per_token"] == 50 == rep["formula_bytes_per_token"]
    assert cache.get(0, 0)[0].dtype == torch.int32
