"""The arithmetic reasoning-trace study (``kdlab lm ablate lm/arithmetic``): a teacher with
scratchpad traces; students on answers only, ground-truth traces, and teacher traces kept by
rejection sampling; exact match within and beyond the training digits."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

from kdlab.core.io import atomic_write_text, check_out_dir, write_csv, write_json
from kdlab.core.seeding import derive_seed
from kdlab.lm.corpora import token_bytes_tensor
from kdlab.lm.models import count_params
from kdlab.lm.objective import LMObjective
from kdlab.lm.recipe import LMRecipe, LMTrainCfg
from kdlab.lm.runs import fit, lm_meta, load_lm, seeded_model
from kdlab.core.device import resolve_device


def _f(v, fmt=".3f", sd=None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    s = format(v, fmt)
    if sd is not None and math.isfinite(sd):
        s += " ± " + format(sd, fmt)
    return s


def arithmetic_sets(recipe: LMRecipe) -> dict:
    """Fixed, disjoint problem sets: train / val / test (training digit range) and long."""
    from kdlab.lm.arithmetic import make_problems

    a = recipe.arithmetic
    lo, hi = a.train_digits
    if lo < 1 or hi < lo:
        raise ValueError(f"arithmetic.train_digits must be [lo, hi] with 1 <= lo <= hi (got {a.train_digits})")
    digits = list(range(lo, hi + 1))
    train = make_problems(a.n_train, digits, a.ops, seed="train")
    val = make_problems(a.n_val, digits, a.ops, seed="val", exclude=set(train))
    test = make_problems(a.n_test, digits, a.ops, seed="test", exclude=set(train) | set(val))
    long = make_problems(a.n_test, [a.long_digits], a.ops, seed="long")
    return {"train": train, "val": val, "test": test, "long": long}


def _arith_pairs(problems, tokenizer, with_trace: bool, width: int = 0):
    from kdlab.lm.arithmetic import encode_examples, render

    return encode_examples([render(a, op, b, with_trace, width) for a, op, b in problems], tokenizer)


def arith_run(model_cfg, pairs, val_pairs, test_pairs, t: LMTrainCfg, run_dir, seed: int, method: str, tokenizer,
              progress: bool = False, name: str = "student"):
    """Train one model with CE on ``pairs``; best epoch by ``val_pairs``' bpb, and ``test_bpb`` (etc.)
    of the best model on ``test_pairs`` (the held-out test problems, never the validation ones)."""
    from kdlab.lm.arithmetic import ProblemLoader

    dev = resolve_device(t.device)
    model = seeded_model(model_cfg, tokenizer.vocab_size, seed, dev)
    obj = LMObjective(model, terms=["ce"], token_bytes=token_bytes_tensor(tokenizer), pad_id=tokenizer.pad_id,
                      eos_id=tokenizer.eos_id, seed=seed, name=name,
                      meta=lm_meta(model_cfg.model, model_cfg.kwargs, tokenizer.vocab_size, tokenizer, "arithmetic"))
    train = ProblemLoader(pairs, t.batch_size, tokenizer.pad_id, derive_seed(seed, "lm-data"), steps=t.steps_per_epoch)
    val = ProblemLoader(val_pairs, t.eval_batch_size, tokenizer.pad_id, shuffle=False)
    test = ProblemLoader(test_pairs, t.eval_batch_size, tokenizer.pad_id, shuffle=False)
    res = fit(obj, train, val, test, t, run_dir, seed=seed, method=method, progress=progress,
              identity={"kind": "lm-arithmetic", "method": method, "model": model_cfg.model_dump(mode="json"),
                        "train": t.model_dump(mode="json"), "n_examples": len(pairs)})
    best, _, _ = load_lm(Path(run_dir) / "best.pt", dev)
    return best, res


def run_arithmetic(recipe: LMRecipe, out_dir, *, seeds: Optional[list[int]] = None, progress: bool = False,
                   log=print) -> dict:
    """Teacher with scratchpad traces; students on answers only, ground-truth traces, and
    teacher traces kept by rejection sampling; exact match in and beyond the training digits."""
    from kdlab.lm.arithmetic import exact_match, teacher_traces
    from kdlab.lm.tokenizers import ByteTokenizer
    from kdlab.report.tables import markdown_table, mean_sd_ci

    if recipe.teacher is None:
        raise ValueError(f"recipe {recipe.name} needs a teacher section for the arithmetic study")
    out_dir = check_out_dir(out_dir, "LM study folder")
    seeds = list(seeds if seeds is not None else recipe.study.seeds)
    tok = ByteTokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(out_dir / "tokenizer.json")
    sets = arithmetic_sets(recipe)
    t0 = time.time()
    tt = recipe.teacher.train
    w = recipe.arithmetic.pad_to
    teacher, tres = arith_run(recipe.teacher, _arith_pairs(sets["train"], tok, True, w),
                              _arith_pairs(sets["val"], tok, True, w), _arith_pairs(sets["test"], tok, True, w),
                              tt, out_dir / "teacher", tt.seed, "teacher", tok, progress, name="teacher")
    rows = [{"method": "teacher (traces)", "seed": tt.seed, "params": count_params(teacher),
             "em_test": exact_match(teacher, sets["test"], tok, True, width=w)["em"],
             "em_long": exact_match(teacher, sets["long"], tok, True, width=w)["em"]}]
    log(f"arithmetic teacher: EM {rows[0]['em_test']:.3f} (train digits), {rows[0]['em_long']:.3f} (long)")
    kept, rs = teacher_traces(teacher, sets["train"], tok, recipe.arithmetic.teacher_samples, seed=tt.seed, width=w)
    log(f"rejection sampling: kept {rs['kept']}/{rs['problems']} teacher traces")
    write_json(out_dir / "rejection_sampling.json", rs)
    from kdlab.lm.arithmetic import encode_examples

    def split(name, tr):
        return _arith_pairs(sets[name], tok, tr, w)

    student_data = {
        "answers": (split("train", False), split("val", False), split("test", False), False),
        "traces": (split("train", True), split("val", True), split("test", True), True),
        "teacher_traces": (encode_examples(kept, tok) if kept else [], split("val", True), split("test", True), True),
    }
    for seed in seeds:
        for m in recipe.arithmetic.students:
            pairs, vpairs, tpairs, tr = student_data[m]
            if not pairs:
                log(f"{m}: no training examples (rejection sampling kept no teacher trace); skipped")
                continue
            model, res = arith_run(recipe.student, pairs, vpairs, tpairs, recipe.train,
                                   out_dir / "runs" / m / f"seed{seed}", seed, m, tok, progress)
            r = {"method": m, "seed": seed, "params": count_params(model), "n_train_examples": len(pairs),
                 "em_test": exact_match(model, sets["test"], tok, tr, width=w)["em"],
                 "em_long": exact_match(model, sets["long"], tok, tr, width=w)["em"],
                 "train_time_s": res.get("train_time_s")}
            log(f"{m:<15} seed {seed}: EM {r['em_test']:.3f} / long {r['em_long']:.3f}")
            rows.append(r)
    write_csv(out_dir / "results.csv", rows)
    a = recipe.arithmetic
    headers = ["student trained on", "seeds", "params", "train examples",
               f"EM % ({a.train_digits[0]}–{a.train_digits[1]} digits, held out)", f"EM % ({a.long_digits} digits)"]
    body, stats = [], []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs_ = [r for r in rows if r["method"] == m]
        et, sdt, _ = mean_sd_ci([r["em_test"] for r in rs_])
        el, sdl, _ = mean_sd_ci([r["em_long"] for r in rs_])
        stats.append({"method": m, "n_seeds": len(rs_), "em_test_mean": et, "em_test_sd": sdt,
                      "em_long_mean": el, "em_long_sd": sdl})
        body.append([m, len(rs_), _f(rs_[0]["params"], ","), rs_[0].get("n_train_examples", len(sets["train"])),
                     _f(100 * et, ".1f", 100 * sdt if math.isfinite(sdt) else None),
                     _f(100 * el, ".1f", 100 * sdl if math.isfinite(sdl) else None)])
    md = markdown_table(headers, body)
    note = (f"Greedy exact match of the final answer on {a.n_test} held-out problems per column "
            f"(ops {', '.join(a.ops)}; '*' has a one-digit multiplier"
            f"{f'; operands zero-padded to {a.pad_to} digits' if a.pad_to else ''}); ± is the sd over seeds. "
            f"Teacher traces: rejection sampling kept {rs['kept']}/{rs['problems']} "
            f"({100 * rs['kept_fraction']:.1f}%). Wall time {time.time() - t0:.0f}s.")
    atomic_write_text(out_dir / "table.md", md + "\n\n" + note + "\n")
    write_json(out_dir / "table.json", {"methods": stats, "rejection_sampling": rs})
    log("")
    log(md)
    log(note)
    log(f"report: {out_dir}")
    return {"methods": stats, "table_md": md, "rows": rows, "rejection_sampling": rs, "out_dir": str(out_dir)}
