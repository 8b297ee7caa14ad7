"""Arithmetic reasoning traces: formats by hand, disjoint problem sets, masks, rejection sampling."""

import pytest
import torch

from kdlab.lm.arithmetic import (ProblemLoader, collate, encode_examples, exact_match, make_problems,
                                 parse_answer, render, teacher_traces, trace)
from kdlab.lm.tokenizers import ByteTokenizer


def test_traces_by_hand():
    assert trace(123, "+", 45) == "[3+5+0=8,2+4+0=6,1+0+0=1]"
    assert render(99, "+", 1, True) == ("99+1=", "[9+1+0=10,9+0+1=10]100")
    assert render(123, "*", 4, True) == ("123*4=", "[3*4+0=12,2*4+1=9,1*4+0=4]492")
    assert render(7, "*", 0, False) == ("7*0=", "0")
    # zero-padded operands: one step per padded digit, plain answer
    assert render(7, "+", 45, True, width=3) == ("007+045=", "[7+5+0=12,0+4+1=5,0+0+0=0]52")
    assert render(12, "*", 9, False, width=3) == ("012*9=", "108")
    with pytest.raises(ValueError, match="one-digit"):
        trace(12, "*", 34)


def test_parse_answer():
    assert parse_answer("[3+5+0=8]168") == 168
    assert parse_answer("42") == 42
    assert parse_answer("[3+5") is None and parse_answer("") is None


def test_problem_sets_disjoint_and_seeded():
    tr = make_problems(300, [1, 2, 3], ["+", "*"], seed="train")
    te = make_problems(100, [1, 2, 3], ["+", "*"], seed="test", exclude=set(tr))
    assert len(set(tr)) == 300 and not set(tr) & set(te)
    assert tr == make_problems(300, [1, 2, 3], ["+", "*"], seed="train")
    assert all(b <= 9 for a, op, b in tr if op == "*")
    lg = make_problems(50, [4], ["+"], seed="long")
    assert all(1000 <= a <= 9999 and 1000 <= b <= 9999 for a, _, b in lg)


def test_collate_masks_only_the_completion():
    tok = ByteTokenizer()
    (p, c), = encode_examples([("1+2=", "3")], tok)
    b = collate([(p, c), ([5], [6, 7])], pad_id=tok.pad_id)
    # row 0: ids "1+2=3<eos>", targets at positions 3 ('3') and 4 (eos)
    assert b["ids"][0].tolist() == [ord("1"), ord("+"), ord("2"), ord("="), ord("3"), tok.eos_id]
    assert b["mask"][0].tolist() == [False, False, False, True, True]
    assert b["mask"][1].tolist() == [True, True, False, False, False]
    assert b["ids"][1, 3:].tolist() == [tok.pad_id] * 3


class Oracle(torch.nn.Module):
    """Writes a fixed completion per prompt (a 'teacher' whose outputs we know)."""

    vocab_size = 258

    def __init__(self, answers: dict):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answers = answers

    def forward(self, ids, past=None):  # "past" is simply the ids seen so far
        full = ids if past is None else torch.cat([past, ids], 1)
        tok = ByteTokenizer()
        out = torch.full((*ids.shape, 258), -30.0)
        for i, row in enumerate(full.tolist()):
            text = tok.decode(row)
            prompt, done = text.split("=")[0] + "=", text.split("=", 1)[1]
            target = self.answers[prompt]
            nxt = tok.encode(target[len(done):])[:1] or [tok.eos_id]
            out[i, -1, nxt[0]] = 30.0
        return out, full


def test_exact_match_and_rejection_sampling():
    tok = ByteTokenizer()
    probs = [(12, "+", 5), (7, "*", 3)]
    good = {"12+5=": "[2+5+0=7,1+0+0=1]17", "7*3=": "[7*3+0=21]22"}  # the second answer is wrong
    model = Oracle(good)
    r = exact_match(model, probs, tok, with_trace=True)
    assert r["em"] == 0.5 and r["completions"] == [good["12+5="], good["7*3="]]
    kept, stats = teacher_traces(model, probs, tok, tries=1)
    assert kept == [("12+5=", good["12+5="])] and stats["kept"] == 1


def test_problem_loader_epochs_are_pure():
    tok = ByteTokenizer()
    pairs = encode_examples([render(a, op, b, True) for a, op, b in make_problems(20, [1, 2], ["+"], 0)], tok)
    ld = ProblemLoader(pairs, 8, tok.pad_id, seed=3, steps=4)
    a = [x["ids"] for x in ld.epoch(1)]
    assert len(a) == 4 and all(torch.equal(x, y["ids"]) for x, y in zip(a, ld.epoch(1)))
