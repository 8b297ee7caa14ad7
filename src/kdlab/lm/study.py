"""LM runs and studies: train a teacher, distil students, the paired multi-seed ablation, and the
arithmetic reasoning-trace study. Every training run goes through the one loop,
:class:`kdlab.train.trainer.Trainer`, with an :class:`~kdlab.lm.objective.LMObjective`.

Layout of a study folder ``OUT``::

    OUT/tokenizer.json                 the tokenizer (BPE: trained on the train split once)
    OUT/teacher/                       the teacher run (best.pt, metrics.csv, result.json, ...)
    OUT/cache/topk<k>-<key>/e*.pt      sparse teacher cache per (teacher, seed's loader, k)
    OUT/cache/seqkd-<key>.pt           teacher generations for sequence-level KD
    OUT/runs/<method>/seed<k>/         one student run per method and seed
    OUT/results.csv, table.md/.csv/.json

Pairing: for seed k every method starts from the same student initialisation
(``derive_seed(k, "lm-init")``) and sees the same training windows (loader seed
``derive_seed(k, "lm-data")``), so differences between methods are paired by seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from kdlab.core.checkpoint import atomic_save, load_checkpoint
from kdlab.core.io import check_out_dir
from kdlab.core.io import atomic_write_text, write_csv, write_json
from kdlab.core.seeding import derive_seed
from kdlab.lm.cache import SparseTeacherCache, cache_error_report, state_fingerprint
from kdlab.lm.corpora import EvalLoader, WindowLoader, corpus_streams, stream_fingerprint, token_bytes_tensor
from kdlab.lm.generate import generate
from kdlab.lm.models import count_params, create_lm
from kdlab.lm.objective import LMObjective, parse_terms
from kdlab.lm.recipe import LMRecipe, LMTrainCfg
from kdlab.lm.tokenizers import load_tokenizer
from kdlab.train.runtime import resolve_device


# -- the loop ---------------------------------------------------------------------------------------
def train_cfg(t: LMTrainCfg, seed: Optional[int] = None):
    """The core :class:`~kdlab.core.config.TrainCfg` for an LM train section (keys it knows)."""
    from kdlab.core.config import TrainCfg

    d = t.model_dump()
    d["seed"] = t.seed if seed is None else seed
    d["eval_batch_size"] = t.eval_batch_size
    d.pop("steps_per_epoch", None)
    known = set(TrainCfg.model_fields)
    return TrainCfg(**{k: v for k, v in d.items() if k in known})


def fit(objective, train, val, test, t: LMTrainCfg, run_dir, *, seed: int, method: str,
        progress: bool = False, identity: Optional[dict] = None) -> dict:
    """One run of the core Trainer (resumes a finished or interrupted run in ``run_dir``)."""
    try:
        from kdlab.train.trainer import Trainer
    except ImportError:
        raise RuntimeError("kdlab lm needs the core Trainer (kdlab.train.trainer.Trainer); update kdlab") from None
    if t.grad_accum > 1 and getattr(objective, "on_policy", 0) > 0:
        raise ValueError("on-policy GKD samples its own tokens, so its windows cannot be normalised in "
                         "advance: use train.grad_accum: 1 with on_policy > 0")
    return Trainer(objective, train, val, test, train_cfg(t, seed), Path(run_dir), method=method,
                   progress=progress, identity=identity).fit(resume=True)


# -- models and checkpoints ------------------------------------------------------------------------
def lm_meta(model_name: str, kwargs: dict, vocab_size: int, tokenizer, corpus: str) -> dict:
    """What :class:`LMObjective.checkpoint_meta` gives the Trainer to rebuild a model."""
    return {"model_name": f"lm:{model_name}", "model_kwargs": dict(kwargs), "num_classes": int(vocab_size),
            "in_channels": 0, "dataset": f"lm:{corpus}", "tokenizer": tokenizer.to_dict()}


def load_lm(path, device="cpu"):
    """Rebuild an LM saved by a kdlab LM run; returns ``(model, tokenizer, checkpoint dict)``."""
    from kdlab.lm.tokenizers import tokenizer_from_dict

    ck = load_checkpoint(path)
    name = str(ck.get("model_name", ""))
    if not name.startswith("lm:"):
        raise ValueError(f"{path} is not a kdlab language model (model_name {name!r}); give an LM run's best.pt")
    model = create_lm(name[3:], ck["num_classes"], **ck.get("model_kwargs", {}))
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), tokenizer_from_dict(ck["tokenizer"]), ck


def seeded_model(cfg, vocab_size: int, seed: int, device):
    torch.manual_seed(derive_seed(seed, "lm-init"))
    return create_lm(cfg.model, vocab_size, **cfg.kwargs).to(device)


# -- data --------------------------------------------------------------------------------------------
class CorpusData:
    """Tokenizer, split streams and loaders of a corpus recipe (tokenizer saved in ``out_dir``)."""

    def __init__(self, recipe: LMRecipe, out_dir):
        c = recipe.corpus
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tok_path = out_dir / "tokenizer.json"
        tok = load_tokenizer(tok_path) if tok_path.is_file() else None
        self.tokenizer, self.streams, self.nbytes = corpus_streams(
            c.name, c.tokenizer, vocab_size=c.vocab_size, max_bytes=c.max_bytes, tokenizer=tok)
        if tok is None:
            self.tokenizer.save(tok_path)
        self.recipe = recipe
        self.token_bytes = token_bytes_tensor(self.tokenizer)

    def train_loader(self, t: LMTrainCfg, seed: int) -> WindowLoader:
        return WindowLoader(self.streams["train"], self.recipe.corpus.seq_len, t.batch_size,
                            t.steps_per_epoch, derive_seed(seed, "lm-data"))

    def eval_loader(self, split: str, t: LMTrainCfg) -> EvalLoader:
        c = self.recipe.corpus
        cap = c.val_tokens if split == "val" else c.test_tokens
        return EvalLoader(self.streams[split], c.seq_len, t.eval_batch_size, self.tokenizer.pad_id, cap)


class MixedLoader:
    """Training batches where a fraction of steps holds teacher generations (sequence-level KD):
    step (e, s) takes ``B`` rows of the pool when ``u(seed, e, s) < fraction``."""

    def __init__(self, data: WindowLoader, pool: dict, fraction: float, seed: int):
        self.data, self.pool, self.fraction, self.seed = data, pool, fraction, seed

    def __len__(self) -> int:
        return len(self.data)

    def epoch(self, e: int):
        n = self.pool["ids"].shape[0]
        for b in self.data.epoch(e):
            s = b["step"]
            g = torch.Generator().manual_seed(derive_seed(self.seed, "seqkd-mix", e, s))
            if torch.rand((), generator=g).item() < self.fraction:
                rows = torch.randint(0, n, (b["ids"].shape[0],), generator=g)
                yield {"ids": self.pool["ids"][rows], "mask": self.pool["mask"][rows], "epoch": e,
                       "step": s, "source": "seqkd"}
            else:
                yield b


def seqkd_pool(teacher, stream: torch.Tensor, d, tokenizer, root, device, log=print) -> dict:
    """Teacher continuations of corpus prompts (cached): ``ids [n, P+G]``, ``mask [n, P+G−1]``
    marking the generated targets."""
    meta = {"teacher": state_fingerprint(teacher), "stream": stream_fingerprint(stream), "n": d.seqkd_pool,
            "P": d.prompt_len, "G": d.gen_len, "greedy": d.seqkd_greedy, "T": d.gen_temperature}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(root) / f"seqkd-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # a damaged file: named, with the fix
            raise ValueError(f"sequence-KD pool {path} is damaged ({type(e).__name__}); delete it (it is "
                             f"regenerated from the teacher on the next run)") from None
    g = torch.Generator().manual_seed(derive_seed("seqkd-prompts", key))
    starts = torch.randint(0, stream.numel() - d.prompt_len, (d.seqkd_pool,), generator=g)
    prompts = stream[starts[:, None] + torch.arange(d.prompt_len)]
    ids_all, mask_all = [], []
    gg = torch.Generator(device=device).manual_seed(derive_seed("seqkd-sample", key))
    for a in range(0, d.seqkd_pool, 128):
        ids, m = generate(teacher, prompts[a:a + 128].to(device), d.gen_len, greedy=d.seqkd_greedy,
                          temperature=d.gen_temperature, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                          generator=gg)
        full = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
        full[:, d.prompt_len - 1:] = m.cpu()
        ids_all.append(ids.cpu())
        mask_all.append(full)
    pool = {"ids": torch.cat(ids_all), "mask": torch.cat(mask_all)}
    atomic_save(pool, path)
    log(f"seqkd: {d.seqkd_pool} teacher continuations -> {path}")
    return pool


# -- metrics -----------------------------------------------------------------------------------------
@torch.no_grad()
def exposure_nll(student, teacher, stream: torch.Tensor, n: int, prompt_len: int, gen_len: int,
                 seed: int, eos_id: int, pad_id: int) -> float:
    """Mean NLL (nats/token) under the teacher of the student's own sampled continuations of ``n``
    held-out prompts (temperature 1): how plausible the student's free-running text is to the
    teacher (lower is better; exposure bias shows up here, not in teacher-forced metrics)."""
    dev = next(student.parameters()).device
    g = torch.Generator().manual_seed(derive_seed(seed, "exposure-prompts"))
    starts = torch.randint(0, stream.numel() - prompt_len, (n,), generator=g)
    prompts = stream[starts[:, None] + torch.arange(prompt_len)].to(dev)
    gs = torch.Generator(device=dev).manual_seed(derive_seed(seed, "exposure-sample"))
    ids, m = generate(student, prompts, gen_len, greedy=False, eos_id=eos_id, pad_id=pad_id, generator=gs)
    teacher.eval()
    logits, _ = teacher(ids[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits[:, prompt_len - 1:].flatten(0, 1).float(),
                                            ids[:, prompt_len:].flatten(), reduction="none")
    mm = m.flatten().float()
    return float((nll * mm).sum() / mm.sum().clamp_min(1))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide (Linux KB)


# -- teacher -----------------------------------------------------------------------------------------
def train_teacher(recipe: LMRecipe, out_dir, *, progress: bool = False, log=print) -> Path:
    """Train (or resume / reuse) the recipe's teacher; returns the path of its ``best.pt``."""
    if recipe.teacher is None:
        raise ValueError(f"recipe {recipe.name} has no teacher section; add teacher: {{model: gpt, kwargs: ...}}")
    if recipe.teacher.checkpoint:
        p = Path(recipe.teacher.checkpoint)
        if not p.is_file():
            raise FileNotFoundError(f"teacher.checkpoint {p} not found; fix the path or remove it to train one")
        return p
    out_dir = check_out_dir(out_dir, "LM folder")
    data = CorpusData(recipe, out_dir)
    t = recipe.teacher.train
    dev = resolve_device(t.device)
    model = seeded_model(recipe.teacher, data.tokenizer.vocab_size, t.seed, dev)
    log(f"teacher: {recipe.teacher.model} {recipe.teacher.kwargs} ({count_params(model):,} params)")
    obj = LMObjective(model, terms=["ce"], token_bytes=data.token_bytes, pad_id=data.tokenizer.pad_id,
                      eos_id=data.tokenizer.eos_id, seed=t.seed, name="teacher",
                      meta=lm_meta(recipe.teacher.model, recipe.teacher.kwargs, data.tokenizer.vocab_size,
                                   data.tokenizer, recipe.corpus.name))
    run = out_dir / "teacher"
    try:
        res = fit(obj, data.train_loader(t, t.seed), data.eval_loader("val", t), data.eval_loader("test", t),
                  t, run, seed=t.seed, method="teacher", progress=progress,
                  identity={"kind": "lm-teacher", "corpus": recipe.corpus.model_dump(mode="json"),
                            "teacher": recipe.teacher.model_dump(mode="json")})
    except ValueError as e:
        if "of a different recipe" not in str(e):
            raise
        raise ValueError(f"{run} holds a teacher trained with other corpus or teacher.* settings; give the "
                         f"same --set teacher.*/corpus.* values as when it was trained, another --out, or "
                         f"delete {run}") from None
    log(f"teacher: test bpb {res.get('test_bpb', float('nan')):.3f} -> {run / 'best.pt'}")
    return run / "best.pt"


def check_same_tokenizer(teacher_tok, student_tok, path) -> None:
    """A teacher whose tokenizer differs from the student's corpus tokenizer (bytes vs BPE, another
    vocabulary) cannot be distilled token by token: one line naming the checkpoint and the fix."""
    a, b = teacher_tok.to_dict(), student_tok.to_dict()
    if a != b:
        desc = lambda d, t: f"{d.get('kind', d.get('type', type(t).__name__))}, {t.vocab_size} tokens"  # noqa: E731
        raise ValueError(f"teacher {path} was trained with another tokenizer ({desc(a, teacher_tok)}) than this "
                         f"recipe's corpus ({desc(b, student_tok)}); set corpus.tokenizer/corpus.vocab_size as "
                         f"when the teacher was trained, or train a teacher for this corpus (drop teacher.checkpoint)")


def on_policy_start_epoch(fraction: float, epochs: int) -> int:
    """The first on-policy epoch (0-based) for ``distill.on_policy_start`` = ``fraction`` of
    ``epochs``: ``floor(fraction · epochs)``; 0.5 of 10 epochs -> epochs 5..9 may sample."""
    return int(math.floor(fraction * epochs + 1e-9))


def student_identity(recipe: LMRecipe) -> dict:
    """What makes two student runs the same: the recipe's corpus, models, train and (method-applied)
    distill sections; not its name, description or study list, so adding a method to a study
    reuses the finished runs of the others."""
    return {"kind": "lm-student", **{k: v for k, v in recipe.to_dict().items()
                                     if k not in ("name", "description", "study")}}


def finished_run(run_dir, identity: dict) -> bool:
    """Whether ``run_dir`` holds a finished run (``result.json``) of exactly ``identity``."""
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").is_file() or not (run_dir / "run.json").is_file():
        return False
    try:
        return json.loads((run_dir / "run.json").read_text()).get("recipe") == identity
    except (OSError, ValueError):
        return False


# -- one student --------------------------------------------------------------------------------------
def distill_run(recipe: LMRecipe, out_dir, *, seed: int, method: str = "distill", data: Optional[CorpusData] = None,
                teacher=None, teacher_eval_store: Optional[dict] = None, progress: bool = False,
                log=print) -> dict:
    """Train one student of ``recipe`` (its ``distill`` section) for ``seed``; returns the result row."""
    out_dir = check_out_dir(out_dir, "LM folder")
    data = data or CorpusData(recipe, out_dir)
    d, t = recipe.distill, recipe.train
    dev = resolve_device(t.device)
    terms = parse_terms(d.loss)
    needs_teacher = any(x.needs_teacher for x in terms) or d.seqkd > 0 or d.on_policy > 0
    tok = data.tokenizer
    if teacher is None and (needs_teacher or recipe.teacher is not None):
        if recipe.teacher is not None:
            t_path = train_teacher(recipe, out_dir, log=log)
            teacher, t_tok, _ = load_lm(t_path, dev)
            check_same_tokenizer(t_tok, tok, t_path)
        elif needs_teacher:
            raise ValueError(f"method {method} needs a teacher; add a teacher section to {recipe.name}")
    train = data.train_loader(t, seed)
    cache = None
    if teacher is not None and d.teacher_source == "sparse" and any(x.needs_teacher for x in terms):
        cache = SparseTeacherCache(out_dir / "cache", state_fingerprint(teacher), train.fingerprint(),
                                   d.top_k, tok.vocab_size).build(teacher, train, t.epochs, dev, log=log)
    loader = train
    if d.seqkd > 0:
        loader = MixedLoader(train, seqkd_pool(teacher, data.streams["train"], d, tok, out_dir / "cache", dev, log),
                             d.seqkd, derive_seed(seed, "lm-seqkd"))
    student = seeded_model(recipe.student, tok.vocab_size, seed, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    obj = LMObjective(student, terms=terms, teacher=teacher, token_bytes=data.token_bytes, pad_id=tok.pad_id,
                      eos_id=tok.eos_id, cache=cache, on_policy=d.on_policy,
                      on_policy_start_epoch=on_policy_start_epoch(d.on_policy_start, t.epochs),
                      prompt_len=d.prompt_len,
                      gen_len=d.gen_len, gen_temperature=d.gen_temperature, seed=seed,
                      meta=lm_meta(recipe.student.model, recipe.student.kwargs, tok.vocab_size, tok, recipe.corpus.name),
                      teacher_eval_store=teacher_eval_store)
    run = out_dir / "runs" / method / f"seed{seed}"
    res = fit(obj, loader, data.eval_loader("val", t), data.eval_loader("test", t), t, run,
              seed=seed, method=method, progress=progress, identity=student_identity(recipe))
    row = {"method": method, "seed": seed, "params": count_params(student), **res}
    if teacher is not None:
        best, _, _ = load_lm(run / "best.pt", dev)
        row["test_exposure_nll"] = exposure_nll(best, teacher, data.streams["test"], recipe.study.exposure_prompts,
                                                d.prompt_len, d.gen_len, seed, tok.eos_id, tok.pad_id)
    tokens = res.get("epochs_run", t.epochs) * t.steps_per_epoch * t.batch_size * recipe.corpus.seq_len
    row["train_tokens_per_s"] = tokens / max(res.get("train_time_s", float("nan")), 1e-9)
    row["peak_mem_mb"] = peak_memory_mb(dev)
    row["teacher_source"] = d.teacher_source if cache is not None else ("live" if needs_teacher else "none")
    row["cache_build_s"] = cache.build_time_s if cache is not None else 0.0  # this call only (0: reused)
    row["counts"] = dict(obj.counts)
    return row


# -- the ablation ----------------------------------------------------------------------------------
ABLATION_COLUMNS = ("bpb", "kl", "agree", "exposure_nll")


def run_ablation(recipe: LMRecipe, out_dir, *, seeds: Optional[list[int]] = None,
                 methods: Optional[list[str]] = None, progress: bool = False, log=print) -> dict:
    """Every study method x seed (paired), then the table (``table.md``) and the cache report."""
    if not recipe.study.methods:
        raise ValueError(f"recipe {recipe.name} has no study.methods; add e.g. ce: {{loss: [{{term: ce}}]}}")
    out_dir = check_out_dir(out_dir, "LM study folder")
    seeds = list(seeds if seeds is not None else recipe.study.seeds)
    names = list(methods or recipe.study.methods)
    for m in names:
        recipe.method(m)  # validate early
    t0 = time.time()
    data = CorpusData(recipe, out_dir)
    dev = resolve_device(recipe.train.device)
    t_path = train_teacher(recipe, out_dir, log=log)
    teacher, t_tok, _ = load_lm(t_path, dev)
    check_same_tokenizer(t_tok, data.tokenizer, t_path)
    store: dict = {}
    tobj = LMObjective(teacher, terms=["ce"], token_bytes=data.token_bytes, pad_id=data.tokenizer.pad_id)
    teacher_test = tobj.evaluate("teacher", data.eval_loader("test", recipe.train))
    rows = []
    for seed in seeds:
        for m in names:
            r = distill_run(recipe.method(m), out_dir, seed=seed, method=m, data=data, teacher=teacher,
                            teacher_eval_store=store, progress=progress, log=log)
            log(f"{m:<12} seed {seed}: test bpb {r['test_bpb']:.4f}  kl {r.get('test_kl', float('nan')):.4f}  "
                f"agree {r.get('test_agree', float('nan')):.4f}  ({r['train_time_s']:.1f}s)")
            rows.append(r)
    others = [m for m in recipe.study.methods if m not in names
              and all(finished_run(out_dir / "runs" / m / f"seed{s}", student_identity(recipe.method(m)))
                      for s in seeds)]
    if others:  # a --methods subset: the table still covers the study's other finished methods
        log(f"also in the table (finished earlier): {', '.join(others)}")
        for seed in seeds:
            for m in others:
                rows.append(distill_run(recipe.method(m), out_dir, seed=seed, method=m, data=data, teacher=teacher,
                                        teacher_eval_store=store, progress=False, log=log))
        names = names + others
    wall = time.time() - t0
    write_csv(out_dir / "results.csv", [{k: v for k, v in r.items() if k != "counts"} for r in rows])
    cache_report = None
    sparse_methods = [m for m in names if recipe.method(m).distill.teacher_source == "sparse"
                      and any(x.needs_teacher for x in parse_terms(recipe.method(m).distill.loss))]
    if sparse_methods:
        rm = recipe.method(sparse_methods[0])
        cache_report = SparseTeacherCache(out_dir / "cache", state_fingerprint(teacher),
                                          data.train_loader(recipe.train, seeds[0]).fingerprint(),
                                          rm.distill.top_k, data.tokenizer.vocab_size).size_report()
        cache_report.update(cache_error_report(teacher, data.eval_loader("test", recipe.train), rm.distill.top_k))
    return ablation_table(rows, out_dir, baseline=recipe.study.baseline, teacher=teacher_test,
                          teacher_params=count_params(teacher), wall_time_s=wall, cache_report=cache_report,
                          log=log)


def method_rows(rows: list[dict], baseline: str) -> list[dict]:
    """Per method: mean ± sd over seeds of each metric, and the paired difference to ``baseline``."""
    from kdlab.report.tables import mean_sd_ci, paired_diff

    by: dict[str, dict[int, dict]] = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r
    out = []
    for m, seeds in by.items():
        st = {"method": m, "n_seeds": len(seeds), "seeds": sorted(seeds),
              "params": next(iter(seeds.values())).get("params")}
        for c in ABLATION_COLUMNS:
            vals = {s: r[f"test_{c}"] for s, r in seeds.items() if f"test_{c}" in r}
            if not vals:
                continue
            mean, sd, ci = mean_sd_ci(vals.values())
            st.update({f"{c}_mean": mean, f"{c}_sd": sd, f"{c}_ci95": ci})
            base = {s: r[f"test_{c}"] for s, r in by.get(baseline, {}).items() if f"test_{c}" in r}
            if m != baseline and base:
                dm, dci, dn = paired_diff(vals, base)
                st.update({f"{c}_diff": dm, f"{c}_diff_ci95": dci})
        for c in ("train_tokens_per_s", "train_time_s", "peak_mem_mb", "best_epoch"):
            vals = [r[c] for r in seeds.values() if c in r]
            st[c] = sum(vals) / len(vals) if vals else float("nan")
        out.append(st)
    return out


def sparse_vs_dense(rows: list[dict]) -> list[dict]:
    """For every method ``m`` run also as ``m_dense`` (live dense teacher): the paired difference
    (same seeds) of test bpb and KL, sparse cache minus dense teacher, with 95% half-widths."""
    from kdlab.report.tables import paired_diff

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
            d[f"{c}_diff"], d[f"{c}_diff_ci95"], d["n_paired"] = paired_diff(a, b)
        out.append(d)
    return out


def _f(v, fmt=".3f", sd=None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    s = format(v, fmt)
    if sd is not None and math.isfinite(sd):
        s += " ± " + format(sd, fmt)
    return s


def ablation_table(rows: list[dict], out_dir, *, baseline: str = "ce", teacher: Optional[dict] = None,
                   teacher_params: Optional[int] = None, wall_time_s: Optional[float] = None,
                   cache_report: Optional[dict] = None, log=print) -> dict:
    """Write table.md / table.csv / table.json for ablation ``rows`` and print the table."""
    from kdlab.report.tables import markdown_table

    out_dir = Path(out_dir)
    stats = method_rows(rows, baseline)
    headers = ["method", "seeds", "params", "test bpb", f"Δ bpb vs {baseline} (95% CI)", "KL to teacher",
               f"Δ KL vs {baseline} (95% CI)", "top-1 agree %", "exposure NLL", "train tok/s", "s/run"]
    body = []
    if teacher:
        body.append(["teacher", 1, _f(teacher_params, ","), _f(teacher["bpb"]), "—", "0", "—", "100", "—", "—", "—"])
    for s in stats:
        dif = lambda c, fmt=".3f": "—" if s["method"] == baseline else _f(s.get(f"{c}_diff"), fmt, s.get(f"{c}_diff_ci95"))
        body.append([
            s["method"], s["n_seeds"], _f(s.get("params"), ","), _f(s.get("bpb_mean"), ".3f", s.get("bpb_sd")),
            dif("bpb"), _f(s.get("kl_mean"), ".3f", s.get("kl_sd")), dif("kl"),
            _f(100 * s["agree_mean"] if "agree_mean" in s else None, ".1f",
               100 * s["agree_sd"] if "agree_sd" in s else None),
            _f(s.get("exposure_nll_mean"), ".3f"), _f(s.get("train_tokens_per_s"), ".0f"), _f(s.get("train_time_s"), ".1f"),
        ])
    md = markdown_table(headers, body)
    note = (f"Held-out test split (documents never seen in training). bpb: bits per UTF-8 byte; KL: "
            f"KL(teacher‖student) nats/token; agree: top-1 next-token agreement with the teacher; "
            f"exposure NLL: teacher NLL (nats/token) of the student's own samples. ± is the sample sd "
            f"over seeds; Δ is the paired difference to '{baseline}' (same seed: same init and data), "
            f"with the 95% t half-width.")
    if cache_report:
        note += (f" Sparse teacher cache: top-{cache_report['k']} of {cache_report['vocab_size']} ids, "
                 f"{cache_report['bytes_per_token_sparse']:.1f} B/token vs {cache_report['bytes_per_token_dense']} "
                 f"B/token dense fp16 ({100 * cache_report['ratio']:.2f}% of dense); on the test split the "
                 f"teacher's mass outside its top {cache_report['k']} is {cache_report.get('mean_tail_mass', float('nan')):.4f} "
                 f"and KL(P‖top-k P̂) = {cache_report.get('kl_teacher_to_topk_nats', float('nan')):.4f} nats/token.")
    svd = sparse_vs_dense(rows)
    for d in svd:
        note += (f" Sparse cache vs dense teacher ({d['method']} − {d['dense']}, paired over {d['n_paired']} "
                 f"seeds): Δ bpb {_f(d['bpb_diff'], '+.3f', None)} ± {_f(d['bpb_diff_ci95'])}, "
                 f"Δ KL {_f(d['kl_diff'], '+.3f', None)} ± {_f(d['kl_diff_ci95'])}.")
    if wall_time_s is not None:
        note += f" Study wall time {wall_time_s:.0f}s."
    atomic_write_text(out_dir / "table.md", md + "\n\n" + note + "\n")
    write_csv(out_dir / "table.csv", [{k: v for k, v in s.items() if k != "seeds"} for s in stats])
    write_json(out_dir / "table.json", {"methods": stats, "baseline": baseline, "teacher": teacher,
                                        "cache": cache_report, "sparse_vs_dense": svd, "wall_time_s": wall_time_s})
    log("")
    log(md)
    log(note)
    log(f"report: {out_dir}")
    return {"methods": stats, "table_md": md, "teacher": teacher, "cache": cache_report, "out_dir": str(out_dir)}


# -- arithmetic reasoning traces ----------------------------------------------------------------
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


def _arith_run(model_cfg, pairs, val_pairs, t: LMTrainCfg, run_dir, seed: int, method: str, tokenizer,
               progress: bool, name: str = "student"):
    from kdlab.lm.arithmetic import ProblemLoader

    dev = resolve_device(t.device)
    model = seeded_model(model_cfg, tokenizer.vocab_size, seed, dev)
    obj = LMObjective(model, terms=["ce"], token_bytes=token_bytes_tensor(tokenizer), pad_id=tokenizer.pad_id,
                      eos_id=tokenizer.eos_id, seed=seed, name=name,
                      meta=lm_meta(model_cfg.model, model_cfg.kwargs, tokenizer.vocab_size, tokenizer, "arithmetic"))
    train = ProblemLoader(pairs, t.batch_size, tokenizer.pad_id, derive_seed(seed, "lm-data"), steps=t.steps_per_epoch)
    val = ProblemLoader(val_pairs, t.eval_batch_size, tokenizer.pad_id, shuffle=False)
    res = fit(obj, train, val, val, t, run_dir, seed=seed, method=method, progress=progress,
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
    teacher, tres = _arith_run(recipe.teacher, _arith_pairs(sets["train"], tok, True, w),
                               _arith_pairs(sets["val"], tok, True, w), tt, out_dir / "teacher", tt.seed,
                               "teacher", tok, progress, name="teacher")
    rows = [{"method": "teacher (traces)", "seed": tt.seed, "params": count_params(teacher),
             "em_test": exact_match(teacher, sets["test"], tok, True, width=w)["em"],
             "em_long": exact_match(teacher, sets["long"], tok, True, width=w)["em"]}]
    log(f"arithmetic teacher: EM {rows[0]['em_test']:.3f} (train digits), {rows[0]['em_long']:.3f} (long)")
    kept, rs = teacher_traces(teacher, sets["train"], tok, recipe.arithmetic.teacher_samples, seed=tt.seed, width=w)
    log(f"rejection sampling: kept {rs['kept']}/{rs['problems']} teacher traces")
    write_json(out_dir / "rejection_sampling.json", rs)
    from kdlab.lm.arithmetic import encode_examples

    student_data = {
        "answers": (_arith_pairs(sets["train"], tok, False, w), _arith_pairs(sets["val"], tok, False, w), False),
        "traces": (_arith_pairs(sets["train"], tok, True, w), _arith_pairs(sets["val"], tok, True, w), True),
        "teacher_traces": (encode_examples(kept, tok) if kept else [], _arith_pairs(sets["val"], tok, True, w), True),
    }
    for seed in seeds:
        for m in recipe.arithmetic.students:
            pairs, vpairs, tr = student_data[m]
            if not pairs:
                log(f"{m}: no training examples (rejection sampling kept no teacher trace); skipped")
                continue
            model, res = _arith_run(recipe.student, pairs, vpairs, recipe.train, out_dir / "runs" / m / f"seed{seed}",
                                    seed, m, tok, progress)
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
