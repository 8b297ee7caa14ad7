"""LM models, generation (KV cache), tokenizers and corpora."""

import math

import pytest
import torch

from kdlab.lm.corpora import EvalLoader, WindowLoader, split_documents, split_of, token_stream
from kdlab.lm.generate import generate
from kdlab.lm.models import GPT, create_lm
from kdlab.lm.tokenizers import ByteTokenizer


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_kv_cache_matches_full_forward_and_generation(pos):
    torch.manual_seed(0)
    m = GPT(30, d_model=16, n_layer=2, n_head=2, max_len=40, pos=pos).eval()
    x = torch.randint(0, 30, (3, 12))
    full, _ = m(x)
    a, past = m(x[:, :7])
    b, _ = m(x[:, 7:], past)  # several new tokens against a cache
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)
    p = x[:, :5]
    g1, m1 = generate(m, p, 10, use_cache=True)
    g2, m2 = generate(m, p, 10, use_cache=False)
    assert torch.equal(g1, g2) and torch.equal(m1, m2)
    s1, _ = generate(m, p, 10, greedy=False, top_k=5, generator=torch.Generator().manual_seed(3))
    s2, _ = generate(m, p, 10, greedy=False, top_k=5, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)


def test_causal_and_eos_stops():
    torch.manual_seed(0)
    m = GPT(10, d_model=16, n_layer=1, n_head=2, max_len=20).eval()
    x = torch.randint(0, 10, (1, 8))
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % 10
    assert torch.allclose(m(x)[0][:, :6], m(y)[0][:, :6], atol=1e-6)
    eos = int(m(x)[0][0, -1].argmax())  # the first greedy token is eos -> everything after is pad
    ids, mask = generate(m, x, 5, eos_id=eos, pad_id=9)
    assert mask[0].tolist() == [True, False, False, False, False]
    assert ids[0, 9:].tolist() == [9] * 4


def test_generation_has_no_gradient():
    m = GPT(10, d_model=8, n_layer=1, n_head=2, max_len=20)
    ids, _ = generate(m, torch.zeros(2, 3, dtype=torch.long), 4, greedy=False)
    assert not ids.requires_grad and m.training  # mode restored


def test_max_len_error():
    m = GPT(10, d_model=8, n_layer=1, n_head=2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(KeyError, match="unknown language model"):
        create_lm("rnn", 10)


def test_hf_adapter_generation_matches_without_cache():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = create_lm("hf", 30, arch="gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=32).eval()
    p = torch.randint(0, 30, (2, 4))
    g1, _ = generate(m, p, 6, use_cache=True)
    g2, _ = generate(m, p, 6, use_cache=False)
    assert torch.equal(g1, g2)


def test_byte_tokenizer_and_bpe():
    t = ByteTokenizer()
    s = "naïve — ok"
    assert t.decode(t.encode(s)) == s and len(t.encode(s)) == len(s.encode())
    pytest.importorskip("tokenizers")
    from kdlab.lm.tokenizers import BPETokenizer, tokenizer_from_dict

    texts = ["the cat sat on the mat. " * 20, "def f(x):\n    return x + 1\n" * 20, "naïve café " * 10]
    b = BPETokenizer.train(texts, vocab_size=320)
    ids = b.encode(texts[2])
    assert b.decode(ids) == texts[2] and len(ids) < len(texts[2].encode())
    tb = b.token_bytes()
    assert int(sum(tb[i] for i in ids)) == len(texts[2].encode("utf-8"))  # bytes per id add up
    again = tokenizer_from_dict(b.to_dict())
    assert again.encode(texts[0]) == b.encode(texts[0])


def test_splits_are_disjoint_and_stable():
    docs = {f"d{i}": f"text {i}" for i in range(200)}
    parts = split_documents(docs)
    names = [set(p) for p in parts.values()]
    assert sum(len(n) for n in names) == 200 and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert 120 < len(parts["train"]) < 190
    assert split_of("d7") == split_of("d7")
    with pytest.raises(ValueError, match="sum to 1"):
        split_of("x", (0.5, 0.2, 0.2))


def test_loaders_pure_and_eval_covers_every_token_once():
    stream = torch.arange(101) % 50
    tr = WindowLoader(stream, 8, 4, 3, seed=1)
    a, b = list(tr.epoch(2)), list(tr.epoch(2))
    assert all(torch.equal(x["ids"], y["ids"]) for x, y in zip(a, b))
    assert not torch.equal(list(tr.epoch(3))[0]["ids"], a[0]["ids"])
    ev = EvalLoader(stream, 8, 5, pad_id=99)
    n = sum(int(bb["mask"].sum()) for bb in ev.epoch(0))
    assert n == 100  # 101 ids -> 100 next-token targets, each once
    targets = torch.cat([bb["ids"][:, 1:][bb["mask"]] for bb in ev.epoch(0)])
    assert torch.equal(targets, stream[1:])


def test_uniform_model_has_log2_vocab_bits_per_byte():
    from kdlab.lm.objective import LMObjective

    class Uniform(torch.nn.Module):
        vocab_size = 258

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, past=None):
            return torch.zeros(*ids.shape, 258) + 0 * self.w, None

    tok = ByteTokenizer()
    stream = token_stream({"a": "hello world, " * 20}, tok)
    obj = LMObjective(Uniform(), token_bytes=torch.ones(258), pad_id=tok.pad_id)
    r = obj.evaluate("student", EvalLoader(stream, 16, 4, tok.pad_id))
    assert abs(r["bpb"] - math.log2(258)) < 1e-6 and abs(r["ppl"] - 258) < 1e-3
    assert r["n"] == stream.numel() - 1 == 20 * 13  # every next-token target once
