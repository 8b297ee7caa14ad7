"""One LM run: the teacher, one distilled student, and what they need (corpus data and loaders,
sequence-level KD's teacher generations, exposure NLL). Every training run goes through the one
loop, :class:`kdlab.train.trainer.Trainer`, with an :class:`~kdlab.lm.objective.LMObjective`.

Layout of a study folder ``OUT``::

    OUT/tokenizer.json                 the tokenizer (BPE: trained on the train split once)
    OUT/teacher/                       the teacher run (best.pt, metrics.csv, result.json, ...)
    OUT/cache/topk<k>-<key>/e*.pt      sparse teacher cache per (teacher, seed's loader, k)
    OUT/cache/seqkd-<key>.pt           teacher generations for sequence-level KD
    OUT/<method>/seed<k>/              one student run per method and seed (the study layout of
                                       every task; ``kdlab.experiments.study``)
    OUT/report/                        the study's table, statistics and figures

Pairing: for seed k every method starts from the same student initialisation
(``derive_seed(k, "lm-init")``) and sees the same training windows (loader seed
``derive_seed(k, "lm-data")``), so differences between methods are paired by seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
from pathlib import Path
from typing import Optional

import torch

from kdlab.core.checkpoint import atomic_save, load_checkpoint
from kdlab.core.io import check_out_dir
from kdlab.core.seeding import derive_seed
from kdlab.lm.cache import SparseTeacherCache, state_fingerprint
from kdlab.lm.corpora import EvalLoader, WindowLoader, corpus_streams, stream_fingerprint, token_bytes_tensor
from kdlab.lm.generate import generate
from kdlab.lm.models import count_params, create_lm
from kdlab.lm.objective import LMObjective, parse_terms
from kdlab.lm.recipe import LMRecipe, LMTrainCfg
from kdlab.lm.tokenizers import load_tokenizer
from kdlab.core.device import resolve_device


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
        progress: bool = False, identity: Optional[dict] = None, callbacks=()) -> dict:
    """One run of the core Trainer (resumes a finished or interrupted run in ``run_dir``)."""
    from kdlab.train.trainer import Trainer

    if t.grad_accum > 1 and getattr(objective, "on_policy", 0) > 0:
        raise ValueError("on-policy GKD samples its own tokens, so its windows cannot be normalised in "
                         "advance: use train.grad_accum: 1 with on_policy > 0")
    return Trainer(objective, train, val, test, train_cfg(t, seed), Path(run_dir), method=method,
                   progress=progress, identity=identity, callbacks=callbacks).fit(resume=True)


# -- models and checkpoints ------------------------------------------------------------------------
def lm_meta(model_name: str, kwargs: dict, vocab_size: int, tokenizer, corpus: str) -> dict:
    """What :class:`LMObjective.checkpoint_meta` gives the Trainer to rebuild a model."""
    return {"model_name": f"lm:{model_name}", "model_kwargs": dict(kwargs), "num_classes": int(vocab_size),
            "in_channels": 0, "dataset": f"lm:{corpus}", "tokenizer": tokenizer.to_dict()}


def read_lm_checkpoint(path) -> dict:
    """The checkpoint dict of an LM saved by a kdlab LM run (safely loaded); one line naming the
    file when it is corrupt, not a checkpoint or not a language model's."""
    ck = load_checkpoint(path)
    name = str(ck.get("model_name", ""))
    if not name.startswith("lm:"):
        raise ValueError(f"{path} is not a kdlab language model (model_name {name!r}); give an LM run's best.pt")
    return ck


def load_lm(path, device="cpu"):
    """Rebuild an LM saved by a kdlab LM run; returns ``(model, tokenizer, checkpoint dict)``."""
    from kdlab.lm.tokenizers import tokenizer_from_dict

    ck = read_lm_checkpoint(path)
    name = str(ck.get("model_name", ""))
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


def on_policy_start_epoch(fraction: float, epochs: int) -> int:
    """The first on-policy epoch (0-based) for ``distill.on_policy_start`` = ``fraction`` of
    ``epochs``: ``floor(fraction · epochs)``; 0.5 of 10 epochs -> epochs 5..9 may sample."""
    return int(math.floor(fraction * epochs + 1e-9))


def student_identity(recipe: LMRecipe) -> dict:
    """What makes two student runs the same: the recipe's corpus, models, train and (method-applied)
    distill sections; not its name, description or study list, so adding a method to a study
    reuses the finished runs of the others."""
    d = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "description", "study")}
    d["task"] = d.pop("kind")  # as recipes wrote it before tasks were plug-ins (same identity)
    if d.get("distill", {}).get("minillm", 0) is None:  # added later: runs without it keep their identity
        d["distill"] = {k: v for k, v in d["distill"].items() if k != "minillm"}
    return {"kind": "lm-student", **d}


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
def check_same_tokenizer(teacher_tok, student_tok, path) -> None:
    """A teacher whose tokenizer differs from the student's corpus tokenizer (bytes vs BPE, another
    vocabulary) cannot be distilled token by token: one line naming the checkpoint and the fix."""
    a, b = teacher_tok.to_dict(), student_tok.to_dict()
    if a != b:
        desc = lambda d, t: f"{d.get('kind', d.get('type', type(t).__name__))}, {t.vocab_size} tokens"  # noqa: E731
        raise ValueError(f"teacher {path} was trained with another tokenizer ({desc(a, teacher_tok)}) than this "
                         f"recipe's corpus ({desc(b, student_tok)}); set corpus.tokenizer/corpus.vocab_size as "
                         f"when the teacher was trained, or train a teacher for this corpus (drop teacher.checkpoint)")


def distill_run(recipe: LMRecipe, out_dir, *, seed: int, method: str = "distill", data: Optional[CorpusData] = None,
                teacher=None, teacher_eval_store: Optional[dict] = None, progress: bool = False,
                log=print, run_dir=None, callbacks=(), with_test: bool = True) -> dict:
    """Train one student of ``recipe`` (its ``distill`` section) for ``seed`` into ``run_dir``
    (default ``out_dir/<method>/seed<seed>``; the teacher, tokenizer and caches live in
    ``out_dir``); returns the result row. ``callbacks``: Trainer callbacks (the tuner's pruning);
    ``with_test=False``: the test split is not evaluated (a tuning trial)."""
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
                      teacher_eval_store=teacher_eval_store,
                      minillm=d.minillm.model_dump() if d.minillm is not None else None)
    run = Path(run_dir) if run_dir is not None else out_dir / method / f"seed{seed}"
    res = fit(obj, loader, data.eval_loader("val", t), data.eval_loader("test", t) if with_test else None, t, run,
              seed=seed, method=method, progress=progress, identity=student_identity(recipe), callbacks=callbacks)
    row = {"method": method, "seed": seed, "params": count_params(student), **res}
    if teacher is not None and with_test:
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
