"""The language-model :class:`~kdlab.train.objective.Objective`: CE, token-level KD, sequence-level
KD and on-policy distillation (GKD) as one objective for the one training loop.

A training batch is a dict from :mod:`kdlab.lm.corpora` (``ids [B, T+1]``, ``mask [B, T]``,
``epoch``, ``step``; a sequence-level-KD batch also has ``source: "seqkd"``). One step:

1. **On-policy** with probability λ (``on_policy``; the draw is a pure function of
   (seed, epoch, step)), from epoch ``on_policy_start_epoch`` on (0-based; earlier epochs are
   all supervised, so the student samples only once it has learnt something, as GKD starts from
   a supervised fine-tuned student): the first ``prompt_len`` tokens of the batch are the prompts, the student
   *samples* ``gen_len`` tokens (no gradient: :func:`kdlab.lm.generate.generate` runs under
   ``no_grad``), the teacher scores the sampled sequence, and the loss is the weighted divergence
   terms on the sampled positions (GKD, Agarwal et al. 2024). There is no CE term: the samples
   have no ground truth.
2. Otherwise **supervised**: the student's next-token logits on the batch, loss
   ``Σ_terms w · term`` with ``ce`` the masked token NLL and each registered divergence (``fkl``, ``rkl``,
   ``skl``, ``srkl``, ``jsd``, ``tvd``, or any added with :func:`kdlab.lm.losses.register_divergence`) against the teacher's distribution: read from
   the sparse top-k cache for data batches when one is attached (both sides collapsed onto k+1
   buckets), else the live teacher (dense, with the term's temperature).
   A ``seqkd`` batch holds teacher-generated continuations (Kim & Rush 2016); its mask covers the
   generated tokens, so ``ce`` trains the student on the teacher's outputs.

The teacher never receives gradients: it is frozen (``requires_grad_(False)``), run in eval mode
under ``no_grad``, and is not among :meth:`models`/:meth:`parameters`.

Normalisation: each term is a per-token mean over the non-padding targets (:func:`~kdlab.lm.losses.
token_mean`). Under gradient accumulation, a loop that accumulates g micro-batches and divides each
micro-batch loss by g can put ``token_denominator`` (real target tokens in the whole accumulation
window) and ``grad_accum`` (g) into ``ctx.extra``: the step then returns ``g · Σ ℓ / N_window`` so
that the accumulated gradient is exactly that of one batch holding all the window's tokens.

Metrics (:meth:`evaluate`): ``bpb`` (bits per UTF-8 byte of the targets: Σ NLL / ln 2 / Σ bytes),
``nll`` (nats/token), ``ppl`` (exp nll, per token — meaningful for BPE), and with a teacher:
``kl`` (KL(P_teacher‖Q_student), nats/token) and ``agree`` (top-1 agreement with the teacher);
``n`` is the number of target tokens evaluated.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from kdlab.core.seeding import derive_seed
from kdlab.lm.generate import generate
from kdlab.lm.losses import (TEMPERATURE_SCALES, bucket_logprobs, divergence, divergence_names, divergence_params,
                             log_softmax_t, real_positions, temperature_factor, token_mean, token_nll)
from kdlab.lm.minillm import MiniLLMConfig, minillm_loss, mixed_sample
from kdlab.train.objective import Objective



def lm_terms() -> tuple[str, ...]:
    """``ce`` and every registered divergence (:func:`kdlab.lm.losses.register_divergence`)."""
    return ("ce",) + divergence_names()


@dataclass
class LMTerm:
    """One weighted loss term: ``ce`` or a divergence with its parameters (alpha, beta, temperature)."""

    term: str
    weight: float = 1.0
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.term not in lm_terms():
            raise ValueError(f"unknown LM loss term '{self.term}'; choose one of {', '.join(lm_terms())}")
        ranges = {} if self.term == "ce" else divergence_params(self.term)
        allowed = set() if self.term == "ce" else set(ranges) | {"temperature", "temperature_scale"}
        bad = set(self.params) - allowed
        if bad:
            raise ValueError(f"LM term '{self.term}' has no parameter(s) {sorted(bad)} "
                             f"(parameters: {sorted(allowed) or 'none'})")
        t = self.params.get("temperature", 1.0)
        if t <= 0:
            raise ValueError(f"term '{self.term}': temperature must be > 0 (got {t})")
        if self.params.get("temperature_scale", "tau2") not in TEMPERATURE_SCALES:
            raise ValueError(f"term '{self.term}': temperature_scale must be one of {', '.join(TEMPERATURE_SCALES)} "
                             f"(got {self.params['temperature_scale']!r})")
        for k, (_, lo, hi) in ranges.items():
            if k in self.params and not lo <= self.params[k] <= hi:
                raise ValueError(f"term '{self.term}': {k} must be in [{lo}, {hi}] (got {self.params[k]})")

    @property
    def needs_teacher(self) -> bool:
        return self.term != "ce"

    @property
    def temperature(self) -> float:
        return float(self.params.get("temperature", 1.0))

    @property
    def factor(self) -> float:
        """τ² (``temperature_scale: tau2``, the default) or 1 (``none``, TRL's convention)."""
        return temperature_factor(self.temperature, self.params.get("temperature_scale", "tau2"))

    @property
    def div_params(self) -> dict:
        return {k: v for k, v in self.params.items() if k not in ("temperature", "temperature_scale")}


def parse_terms(spec) -> list[LMTerm]:
    """``[{"term": "ce"}, {"term": "fkl", "weight": 1, "temperature": 2}]`` -> [LMTerm]."""
    out = []
    for i, t in enumerate(spec):
        if isinstance(t, LMTerm):
            out.append(t)
            continue
        d = dict(t)
        if "term" not in d:
            raise ValueError(f"loss[{i}] needs a 'term' key (e.g. term: fkl)")
        w = float(d.pop("weight", 1.0))
        if not (w >= 0.0 and w != float("inf")):  # NaN fails both
            raise ValueError(f"loss[{i}].weight is {w}; give a finite weight >= 0 (a negative weight "
                             f"would maximise the term)")
        out.append(LMTerm(d.pop("term"), w, d))
    if not out:
        raise ValueError("loss needs at least one term (e.g. - term: ce)")
    return out


def _loader_key(loader) -> str:
    fp = getattr(loader, "_kdlab_fp", None)
    if fp is None:
        h = hashlib.sha256()
        for b in loader.epoch(0):
            h.update(b["ids"].numpy().tobytes())
        fp = h.hexdigest()[:16]
        try:
            loader._kdlab_fp = fp
        except AttributeError:
            pass
    return fp


class LMObjective(Objective):
    """Objective for a causal LM student, optionally distilled from a frozen teacher (module doc)."""

    monitor = ("bpb", "min")
    sample_unit = "tokens"  # the loop's throughput counts target tokens (logs["n"], batch_weight)
    window_normalised = True  # per-token losses over the whole accumulation window

    def __init__(self, student: nn.Module, *, terms=("ce",), teacher: Optional[nn.Module] = None,
                 token_bytes: Optional[torch.Tensor] = None, pad_id: int = 0, eos_id: Optional[int] = None,
                 cache=None, on_policy: float = 0.0, on_policy_start_epoch: int = 0,
                 prompt_len: int = 16, gen_len: int = 32,
                 gen_temperature: float = 1.0, gen_top_k: Optional[int] = None, seed: int = 0,
                 meta: Optional[dict] = None, teacher_eval_store: Optional[dict] = None,
                 name: str = "student", hidden: Optional[nn.Module] = None, hidden_weight: float = 1.0,
                 minillm=None):
        self.terms = parse_terms([{"term": t} if isinstance(t, str) else t for t in terms])
        self.student, self.teacher, self.name = student, teacher, name
        if isinstance(minillm, dict):
            minillm = MiniLLMConfig(**minillm)
        self.minillm: Optional[MiniLLMConfig] = minillm
        if teacher is None and (any(t.needs_teacher for t in self.terms) or on_policy > 0 or minillm is not None):
            raise ValueError("divergence terms, on_policy and minillm need a teacher (set teacher: ...)")
        if minillm is not None and on_policy <= 0:
            raise ValueError("minillm replaces the on-policy steps: set on_policy > 0 (e.g. on_policy: 1)")
        if minillm is not None and gen_temperature != 1.0:
            raise ValueError(f"minillm's estimator needs samples from the student itself (temperature 1); "
                             f"set gen_temperature: 1 (got {gen_temperature})")
        if on_policy > 0 and minillm is None and not any(t.needs_teacher for t in self.terms):
            raise ValueError("on_policy > 0 needs a divergence term (e.g. - term: jsd) to score samples")
        if not 0.0 <= on_policy <= 1.0:
            raise ValueError(f"on_policy must be in [0, 1] (got {on_policy})")
        if cache is not None and any(t.temperature != 1.0 for t in self.terms if t.needs_teacher):
            raise ValueError("the sparse teacher cache stores temperature-1 probabilities; set "
                             "temperature: 1 on the divergence terms or teacher_source: live")
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.token_bytes = token_bytes
        self.pad_id, self.eos_id = pad_id, eos_id
        self.cache, self.on_policy = cache, float(on_policy)
        if on_policy_start_epoch < 0:
            raise ValueError(f"on_policy_start_epoch must be >= 0 (got {on_policy_start_epoch})")
        self.on_policy_start_epoch = int(on_policy_start_epoch)
        self.prompt_len, self.gen_len = prompt_len, gen_len
        self.gen_temperature, self.gen_top_k = gen_temperature, gen_top_k
        self.seed = seed
        self.meta = dict(meta or {})
        self.teacher_eval_store = {} if teacher_eval_store is None else teacher_eval_store
        self.counts = {"on_policy": 0, "supervised": 0, "cache_hits": 0, "live_teacher": 0}
        self.teacher_time_s = 0.0  # seconds in teacher forward passes while training (the loop reads it)
        # hidden-state distillation (kdlab.lm.hidden.HiddenDistill): needs a live teacher and models
        # with forward_hidden; its projections train with the student
        self.hidden, self.hidden_weight = hidden, float(hidden_weight)
        if hidden is not None:
            if teacher is None:
                raise ValueError("hidden-state distillation needs a teacher")
            for who, m in (("student", student), ("teacher", teacher)):
                if not hasattr(m, "forward_hidden"):
                    raise ValueError(f"hidden-state distillation needs hidden states from the {who}; use an "
                                     f"hf:<folder> model")

    # -- protocol --------------------------------------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        return {self.name: self.student}

    def parameters(self) -> list[nn.Parameter]:
        extra = list(self.hidden.parameters()) if self.hidden is not None else []
        return [p for p in self.student.parameters() if p.requires_grad] + extra

    def checkpoint_meta(self, name: str) -> dict:
        m = dict(self.meta)
        m.setdefault("model_name", "lm:gpt")
        m.setdefault("model_kwargs", {})
        m.setdefault("num_classes", int(getattr(self.student, "vocab_size", 0)))
        m.setdefault("in_channels", 0)
        m.setdefault("dataset", "lm")
        return m

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    # -- training ----------------------------------------------------------------------------------
    def batch_weight(self, batch: dict) -> float:
        """The real target tokens of a data batch (the trainer sums them over an accumulation window)."""
        return float(batch["mask"].sum())

    def _denom(self, ctx) -> tuple[Optional[float], float]:
        extra = getattr(ctx, "extra", None) or {}
        if "token_denominator" in extra:
            return float(extra["token_denominator"]), float(extra.get("grad_accum", 1))
        return None, 1.0

    @torch.no_grad()
    def _teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.teacher.eval()
        out = self.teacher(ids)[0].float()
        self.teacher_time_s += time.perf_counter() - t0
        return out

    def step(self, batch: dict, ctx: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dev = self.device
        ids = batch["ids"].to(dev)
        mask = batch["mask"].to(dev)
        epoch, stepno = int(batch.get("epoch", getattr(ctx, "epoch", 0))), int(batch.get("step", getattr(ctx, "step", 0)))
        denom, g = self._denom(ctx)
        if self.on_policy > 0 and epoch >= self.on_policy_start_epoch:
            u = torch.rand((), generator=torch.Generator().manual_seed(
                derive_seed(self.seed, "on-policy", epoch, stepno))).item()
            if u < self.on_policy:
                if self.minillm is not None:
                    return self._minillm_step(ids, mask, epoch, stepno, g)
                return self._on_policy_step(ids, epoch, stepno, denom, g)
        self.counts["supervised"] += 1
        x, y = ids[:, :-1], ids[:, 1:]
        hs = ht = None
        t_logits = None
        if self.hidden is not None:
            logits, hs = self.student.forward_hidden(x)
            t0 = time.perf_counter()
            with torch.no_grad():
                self.teacher.eval()
                t_logits, ht = self.teacher.forward_hidden(x)
                t_logits = t_logits.float()
            self.teacher_time_s += time.perf_counter() - t0
        else:
            logits, _ = self.student(x)
        sparse = None
        if t_logits is None and any(t.needs_teacher for t in self.terms):
            if self.cache is not None and batch.get("source", "data") == "data":
                i, lp, lt = self.cache.get(epoch, stepno)
                sparse = (i.to(dev), lp.to(dev), lt.to(dev))
                self.counts["cache_hits"] += 1
            else:
                t_logits = self._teacher_logits(x)
                self.counts["live_teacher"] += 1
        # every term is computed on the real (non-padding) positions only: a non-finite logit at a
        # padded position then reaches neither the loss nor the gradient
        s_sel, y_sel = real_positions(mask, logits, y)
        t_sel = real_positions(mask, t_logits)[0] if t_logits is not None else None
        sp_sel = real_positions(mask, *sparse) if sparse is not None else None
        parts = []
        for t in self.terms:
            if t.term == "ce":
                val = token_mean(token_nll(s_sel, y_sel), None, denom)
            elif sp_sel is not None:
                ls, lt_ = bucket_logprobs(torch.log_softmax(s_sel.float(), -1), *sp_sel)
                val = token_mean(divergence(t.term, ls, lt_, **t.div_params), None, denom)
            else:
                val = self._dense_term(t, s_sel, t_sel, denom)
            parts.append((t, val))
        if self.hidden is not None:
            parts.append((SimpleNamespace(term="hidden", weight=self.hidden_weight), self.hidden(hs, ht, mask, denom)))
        return self._weighted(parts, logits, mask, g)

    @staticmethod
    def _weighted(parts, logits, mask, g):
        """``(g · Σ w·value, logs)`` for ``[(term, value)]``: each term's value, the loss and the
        number of target tokens ``n`` in the logs."""
        logs: dict[str, torch.Tensor] = {}
        total = logits.new_zeros(())
        for t, val in parts:
            key, k = t.term, 2
            while key in logs:  # a term listed twice keeps its own column: fkl, fkl#2
                key, k = f"{t.term}#{k}", k + 1
            logs[key] = val.detach()
            total = total + t.weight * val
        logs["loss"] = total.detach()
        logs["n"] = mask.sum().detach().float()
        return total * g, logs

    @staticmethod
    def _dense_term(t, logits, t_logits, denom):
        """A divergence term against the dense teacher at the term's temperature τ, times the term's
        factor (τ² by default, 1 with ``temperature_scale: none``), per token; ``logits`` and
        ``t_logits`` hold the real positions only (``[N, V]``)."""
        tau = t.temperature
        per = divergence(t.term, log_softmax_t(logits, tau), log_softmax_t(t_logits, tau), **t.div_params)
        return token_mean(per * t.factor, None, denom)

    def _on_policy_step(self, ids, epoch, stepno, denom, g):
        self.counts["on_policy"] += 1
        prompts = ids[:, : self.prompt_len]
        gen = torch.Generator(device=ids.device).manual_seed(derive_seed(self.seed, "sample", epoch, stepno))
        seq, gmask = generate(self.student, prompts, self.gen_len, greedy=False,
                              temperature=self.gen_temperature, top_k=self.gen_top_k, eos_id=self.eos_id,
                              pad_id=self.pad_id, generator=gen)
        seq = seq.detach()
        x = seq[:, :-1]
        mask = torch.zeros(x.shape, dtype=torch.bool, device=ids.device)
        mask[:, self.prompt_len - 1:] = gmask  # position t predicts token t+1
        logits, _ = self.student(x)
        t_logits = self._teacher_logits(x)
        s_sel, t_sel = real_positions(mask, logits, t_logits)
        parts = [(t, self._dense_term(t, s_sel, t_sel, denom)) for t in self.terms if t.term != "ce"]
        return self._weighted(parts, logits, mask, g)

    def _minillm_step(self, ids, data_mask, epoch, stepno, g):
        """MiniLLM (module doc of :mod:`kdlab.lm.minillm`): sample from α·p + (1−α)·q (or the student
        alone at α = 0), score with the live teacher, single-step + long-term loss on the sampled
        positions, plus ``pt_weight`` × CE on the data batch."""
        cfg = self.minillm
        self.counts["on_policy"] += 1
        P = self.prompt_len
        prompts = ids[:, :P]
        gen = torch.Generator(device=ids.device).manual_seed(derive_seed(self.seed, "sample", epoch, stepno))
        if cfg.alpha > 0:
            t0 = time.perf_counter()
            seq, gmask = mixed_sample(self.student, self.teacher, prompts, self.gen_len, cfg.alpha,
                                      eos_id=self.eos_id, pad_id=self.pad_id, generator=gen)
            self.teacher_time_s += time.perf_counter() - t0
        else:
            seq, gmask = generate(self.student, prompts, self.gen_len, greedy=False, temperature=1.0,
                                  eos_id=self.eos_id, pad_id=self.pad_id, generator=gen)
        seq = seq.detach()
        x = seq[:, :-1]
        logits, _ = self.student(x)
        t_logits = self._teacher_logits(x)
        loss, st = minillm_loss(logits[:, P - 1:], t_logits[:, P - 1:], seq[:, P:], gmask, cfg)
        parts = [(SimpleNamespace(term="minillm", weight=1.0), loss)]
        if cfg.pt_weight > 0:
            d_logits, _ = self.student(ids[:, :-1])
            s_sel, y_sel = real_positions(data_mask, d_logits, ids[:, 1:])
            parts.append((SimpleNamespace(term="pt", weight=cfg.pt_weight), token_mean(token_nll(s_sel, y_sel))))
        total, logs = self._weighted(parts, logits, gmask, g)
        logs.update({"minillm_reward": st["reward"], "minillm_w": st["w"]})
        return total, logs

    # -- evaluation --------------------------------------------------------------------------------
    def _teacher_eval(self, loader, step, x):
        key = (_loader_key(loader), step)
        hit = self.teacher_eval_store.get(key)
        if hit is None:
            hit = torch.log_softmax(self._teacher_logits(x), -1).to("cpu", torch.float16)
            self.teacher_eval_store[key] = hit
        return hit.to(x.device).float()

    @torch.no_grad()
    def evaluate(self, name: str, loader) -> dict[str, float]:
        model = self.student
        was = model.training
        model.eval()
        dev = self.device
        nll = nbytes = ntok = kl = agree = 0.0
        tb = self.token_bytes.to(dev) if self.token_bytes is not None else None
        try:
            for b in loader.epoch(0):
                ids, mask = b["ids"].to(dev), b["mask"].to(dev)
                x, y = ids[:, :-1], ids[:, 1:]
                logits, _ = model(x)
                s_sel, y_sel = real_positions(mask, logits, y)
                nll += float(token_nll(s_sel, y_sel).sum())
                ntok += float(y_sel.numel())
                nbytes += float(tb[y_sel].float().sum()) if tb is not None else float(y_sel.numel())
                if self.teacher is not None:
                    lt = real_positions(mask, self._teacher_eval(loader, b["step"], x))[0]
                    ls = torch.log_softmax(s_sel.float(), -1)
                    kl += float(divergence("fkl", ls, lt).sum())
                    agree += float((ls.argmax(-1) == lt.argmax(-1)).float().sum())
        finally:
            model.train(was)
        out = {"bpb": nll / math.log(2) / max(nbytes, 1.0), "nll": nll / max(ntok, 1.0),
               "ppl": math.exp(min(nll / max(ntok, 1.0), 50.0)), "n": int(ntok)}
        if self.teacher is not None:
            out["kl"] = kl / max(ntok, 1.0)
            out["agree"] = agree / max(ntok, 1.0)
        return out
