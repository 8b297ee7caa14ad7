"""What the LM study adds to the generic study of :mod:`kdlab.experiments.study` (which trains
every method and seed into ``OUT/<method>/seed<k>`` and writes the paired table, statistics and
figures of the ``lm`` task's metrics, :mod:`kdlab.tasks.lm`): the sentences under its table about
the sparse teacher cache (size, the teacher's mass outside its top k, KL(P‖top-k P̂)) and the
paired sparse-cache-vs-dense-teacher differences.

The runs themselves are :mod:`kdlab.lm.runs`; the arithmetic trace study is
:mod:`kdlab.lm.arithmetic_study`. Names that lived here are re-exported.
"""

from __future__ import annotations

import math
from typing import Optional

from kdlab.lm.arithmetic_study import arithmetic_sets, run_arithmetic  # noqa: F401  (re-exported)
from kdlab.lm.runs import (CorpusData, MixedLoader, distill_run, exposure_nll, finished_run,  # noqa: F401
                           fit, load_lm, lm_meta, on_policy_start_epoch, peak_memory_mb, seeded_model,
                           seqkd_pool, student_identity, train_cfg, train_teacher)


def sparse_vs_dense(rows: list[dict]) -> list[dict]:
    """For every method ``m`` run also as ``m_dense`` (live dense teacher): the paired difference
    (same seeds) of test bpb and KL, sparse cache minus dense teacher, with 95% half-widths."""
    from kdlab.report.statistics import paired_test

    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r
    out = []
    for m in by:
        if m + "_dense" not in by:
            continue
        d = {"method": m, "dense": m + "_dense"}
        for c in ("bpb", "kl", "agree"):
            a = {s: r[f"test_{c}"] for s, r in by[m].items() if f"test_{c}" in r}
            b = {s: r[f"test_{c}"] for s, r in by[m + "_dense"].items() if f"test_{c}" in r}
            p = paired_test(a, b)
            d[f"{c}_diff"], d[f"{c}_diff_ci95"], d["n_paired"] = p["mean"], p["ci"], p["n"]
        out.append(d)
    return out


def _f(v, fmt=".3f") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, fmt)


def cache_report(recipes: dict, data: CorpusData, teacher, out_dir, seed: int) -> Optional[dict]:
    """Size of the sparse teacher cache of the study's first sparse method (seed ``seed``'s
    loader) and the teacher's top-k error on the test split; None without a sparse method."""
    from kdlab.lm.cache import SparseTeacherCache, cache_error_report, state_fingerprint
    from kdlab.lm.objective import parse_terms

    sparse = [r for r in recipes.values() if r.distill.teacher_source == "sparse"
              and any(x.needs_teacher for x in parse_terms(r.distill.loss))]
    if not sparse:
        return None
    rm = sparse[0]
    rep = SparseTeacherCache(out_dir / "cache", state_fingerprint(teacher),
                             data.train_loader(rm.train, seed).fingerprint(),
                             rm.distill.top_k, data.tokenizer.vocab_size).size_report()
    rep.update(cache_error_report(teacher, data.eval_loader("test", rm.train), rm.distill.top_k))
    return rep


def study_notes(rows: list[dict], cache: Optional[dict], teacher: Optional[dict],
                teacher_params: Optional[int]) -> list[str]:
    """The LM table's sentences: the teacher, the sparse cache and sparse-vs-dense."""
    notes = []
    if teacher:
        notes.append(f"Teacher ({teacher_params:,} params): test bpb {_f(teacher.get('test_bpb'))}.")
    notes.append("exposure NLL: teacher NLL (nats/token) of the student's own samples; KL: "
                 "KL(teacher‖student) nats/token; agreement: top-1 next-token agreement with the teacher.")
    if cache:
        notes.append(f"Sparse teacher cache: top-{cache['k']} of {cache['vocab_size']} ids, "
                     f"{cache['bytes_per_token_sparse']:.1f} B/token vs {cache['bytes_per_token_dense']} "
                     f"B/token dense fp16 ({100 * cache['ratio']:.2f}% of dense); on the test split the "
                     f"teacher's mass outside its top {cache['k']} is {cache.get('mean_tail_mass', float('nan')):.4f} "
                     f"and KL(P‖top-k P̂) = {cache.get('kl_teacher_to_topk_nats', float('nan')):.4f} nats/token.")
    for d in sparse_vs_dense(rows):
        notes.append(f"Sparse cache vs dense teacher ({d['method']} − {d['dense']}, paired over {d['n_paired']} "
                     f"seeds): Δ bpb {_f(d['bpb_diff'], '+.3f')} ± {_f(d['bpb_diff_ci95'])}, "
                     f"Δ KL {_f(d['kl_diff'], '+.3f')} ± {_f(d['kl_diff_ci95'])}.")
    return notes
