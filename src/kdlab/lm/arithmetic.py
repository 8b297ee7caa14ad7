"""A generated multi-digit arithmetic task with step-by-step scratchpads (reasoning traces).

Problems are ``a+b`` (both operands of ``d`` digits, d in the training range) and ``a*b`` with a
one-digit multiplier ``b`` (a long multiplication of a multi-digit number by one digit). Problem
sets are seeded and disjoint: the held-out problems never appear in training.

Text formats (byte tokens, the answer ends with ``eos``):

* answers only: ``123+45=168``
* trace (scratchpad), one step per digit of ``a`` from the least significant, carrying ``c``:
  ``123+45=[3+5+0=8,2+4+0=6,1+0+0=1]168`` and ``123*4=[3*4+0=12,2*4+1=9,1*4+0=4]492``;
  each step is ``x∘y+c=s``, its digit is ``s mod 10`` and the next carry ``s div 10``; the final
  answer follows the closing bracket.

The prompt is ``a∘b=``; the model is trained on everything after it (the mask covers the
completion and ``eos``). Exact match compares the integer after the last ``]`` (or the whole
completion, answers-only) with the true result.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from kdlab.core.seeding import derive_seed


def operands(a: int, op: str, b: int, width: int = 0) -> tuple[str, str]:
    """The operands as written: zero-padded to ``width`` digits (the multiplier of ``*`` stays one
    digit); ``width=0`` writes them plainly."""
    return str(a).zfill(width), (str(b) if op == "*" else str(b).zfill(width))


def trace(a: int, op: str, b: int, width: int = 0) -> str:
    """The scratchpad of ``a op b`` (module doc), without the final answer; with ``width`` the
    operands are zero-padded, so every problem of that width has the same number of steps."""
    steps, c = [], 0
    sa, sb = operands(a, op, b, width)
    da = [int(ch) for ch in reversed(sa)]
    if op == "+":
        db = [int(ch) for ch in reversed(sb)]
        for i in range(max(len(da), len(db))):
            x = da[i] if i < len(da) else 0
            y = db[i] if i < len(db) else 0
            s = x + y + c
            steps.append(f"{x}+{y}+{c}={s}")
            c = s // 10
    elif op == "*":
        if not 0 <= b <= 9:
            raise ValueError(f"multiplication traces need a one-digit multiplier (got {b})")
        for x in da:
            s = x * b + c
            steps.append(f"{x}*{b}+{c}={s}")
            c = s // 10
    else:
        raise ValueError(f"op must be + or * (got {op!r})")
    return "[" + ",".join(steps) + "]"


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a * b


def render(a: int, op: str, b: int, with_trace: bool, width: int = 0) -> tuple[str, str]:
    """(prompt, completion) texts; the completion excludes ``eos``. ``width``: zero-pad operands
    (``007+045=``); the answer is written plainly."""
    sa, sb = operands(a, op, b, width)
    body = (trace(a, op, b, width) if with_trace else "") + str(answer(a, op, b))
    return f"{sa}{op}{sb}=", body


def parse_answer(completion: str) -> Optional[int]:
    """The integer after the last ``]`` (or the whole completion); None if it is not one."""
    tail = completion.rsplit("]", 1)[-1].strip()
    return int(tail) if tail.isdigit() else None


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def make_problems(n: int, digits: Sequence[int], ops: Sequence[str], seed: int,
                  exclude: Optional[set] = None) -> list[tuple[int, str, int]]:
    """``n`` distinct problems, operands with a digit count drawn from ``digits`` (a list), ops
    from ``ops``; ``*`` always has a one-digit multiplier. Problems in ``exclude`` are skipped."""
    rng = random.Random(derive_seed(seed, "arith", tuple(digits), tuple(ops)))
    out, seen = [], set(exclude or ())
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems with digits {list(digits)}; lower n")
        op = rng.choice(list(ops))
        a = _operand(rng, rng.choice(list(digits)))
        b = rng.randint(0, 9) if op == "*" else _operand(rng, rng.choice(list(digits)))
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        out.append((a, op, b))
    return out


def encode_examples(examples: Sequence[tuple[str, str]], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + eos) per (prompt, completion) text pair."""
    return [(tokenizer.encode(p), tokenizer.encode(c) + [tokenizer.eos_id]) for p, c in examples]


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded ``ids [B, L+1]`` and ``mask [B, L]`` marking completion targets."""
    L = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), L - 1, dtype=torch.bool)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(p) - 1: len(seq) - 1] = True
    return {"ids": ids, "mask": mask}


class ProblemLoader:
    """Batches of encoded (prompt, completion) pairs; training order reshuffled per epoch from
    ``derive_seed(seed, "arith-order", e)`` (``shuffle=False``: fixed order, for evaluation)."""

    def __init__(self, pairs, batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 steps: Optional[int] = None):
        if not pairs:
            raise ValueError("no arithmetic examples to load (did rejection sampling keep none?)")
        self.pairs, self.batch_size, self.pad_id, self.seed, self.shuffle = list(pairs), batch_size, pad_id, seed, shuffle
        self.steps = steps or -(-len(self.pairs) // batch_size)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, e: int):
        n = len(self.pairs)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "arith-order", e))
            reps = -(-self.steps * self.batch_size // n)
            order = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)]).tolist()
        else:
            order = list(range(n))
        for s in range(self.steps):
            chunk = order[s * self.batch_size:(s + 1) * self.batch_size]
            if not chunk:
                break
            b = collate([self.pairs[i] for i in chunk], self.pad_id)
            b.update(epoch=e, step=s)
            yield b


def exact_match(model, problems, tokenizer, with_trace: bool, max_new: Optional[int] = None,
                batch_size: int = 256, width: int = 0) -> dict:
    """Greedy exact-match accuracy on ``problems`` and the completions (for inspection)."""
    from kdlab.lm.generate import generate_ragged

    prompts = [tokenizer.encode(render(a, op, b, with_trace, width)[0]) for a, op, b in problems]
    if max_new is None:
        max_new = max(len(render(a, op, b, True, width)[1]) for a, op, b in problems) + 8
    outs = generate_ragged(model, prompts, max_new, greedy=True, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, batch_size=batch_size)
    texts = [tokenizer.decode(o) for o in outs]
    ok = [parse_answer(t) == answer(a, op, b) for t, (a, op, b) in zip(texts, problems)]
    return {"em": sum(ok) / max(len(ok), 1), "n": len(ok), "completions": texts}


def teacher_traces(teacher, problems, tokenizer, tries: int = 2, seed: int = 0,
                   max_new: Optional[int] = None, width: int = 0) -> tuple[list[tuple[str, str]], dict]:
    """Rejection sampling: the teacher writes a trace for each training problem (greedy first,
    then ``tries − 1`` samples at temperature 1); keep the first whose answer is correct.
    Returns the kept (prompt, completion) texts and counts."""
    from kdlab.lm.generate import generate_ragged

    kept: dict[int, tuple[str, str]] = {}
    prompts = [tokenizer.encode(render(a, op, b, True, width)[0]) for a, op, b in problems]
    if max_new is None:
        max_new = max(len(render(a, op, b, True, width)[1]) for a, op, b in problems) + 8
    dev = next(teacher.parameters()).device
    for t in range(tries):
        todo = [i for i in range(len(problems)) if i not in kept]
        if not todo:
            break
        kw = {"greedy": True} if t == 0 else {
            "greedy": False, "generator": torch.Generator(device=dev).manual_seed(derive_seed(seed, "rs", t))}
        outs = generate_ragged(teacher, [prompts[i] for i in todo], max_new, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, **kw)
        for i, o in zip(todo, outs):
            text = tokenizer.decode(o)
            a, op, b = problems[i]
            if o and o[-1] == tokenizer.eos_id and parse_answer(text) == answer(a, op, b) and text.startswith("["):
                kept[i] = (render(a, op, b, True, width)[0], text)
    return [kept[i] for i in sorted(kept)], {"problems": len(problems), "kept": len(kept),
                                              "kept_fraction": len(kept) / max(len(problems), 1)}
