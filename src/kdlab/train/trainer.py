"""The one training loop: every weight kdlab trains (teachers, students, peers, fine-tuned
pruned models, language models) goes through :class:`Trainer`.

``Trainer(objective, train_loader, val_loader, test_loader, cfg, run_dir).fit()`` runs epochs of
``objective.step`` with the optimiser and schedule of ``cfg`` (a :class:`kdlab.core.config.TrainCfg`),
selects the best epoch of every model on the validation split (``objective.monitor``), stops early
after ``cfg.patience`` epochs without improvement of the primary model, writes atomic checkpoints
every epoch, resumes an interrupted run where it stopped, reports the test split once at the end,
and calls its callbacks. It parses no recipe and knows nothing of teachers: that is
:mod:`kdlab.train.build`'s job.

A run is a pure function of (objective, data, seed): every epoch starts from
``torch.manual_seed(derive_seed(seed, "epoch", e))`` and the loaders are pure functions of
(seed, epoch), so a resumed run finishes with exactly the weights of an uninterrupted one.

The run folder's files and their checks (identity, finished runs, thread counts) are
:mod:`kdlab.train.run_folder`'s. Reliability rules (issue 11):

* one process per run folder: :meth:`Trainer.fit` holds the folder's :class:`RunLock`, and a second
  process is refused at once;
* a killed writer's temporary files (``*.pt.<random>.tmp``) are removed when the next run starts;
* a finished run is verified file by file before it is reused (:class:`RunFolder`);
* a non-finite training or validation loss stops the run (the last good epoch is kept);
* ``train.deterministic: true`` fixes the thread count (``train.threads``, default 1) and turns on
  ``torch.use_deterministic_algorithms``.

Throughput is counted in the objective's ``sample_unit``: the epoch rows and ``result.json`` name
it ``<sample_unit>_per_s`` (``images_per_s`` for image models, ``tokens_per_s`` for language
models), and ``result.json`` records ``sample_unit``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from kdlab.core.checkpoint import atomic_save, load_checkpoint, model_checkpoint
from kdlab.core.io import RunFileError, check_out_dir, clean_tmp, write_csv, write_json
from kdlab.core.lock import RunLock
from kdlab.core.seeding import derive_seed
from kdlab.train.callbacks import Callback, ConsoleLines, LogFile, MLflow, StopTraining, TensorBoard
from kdlab.train.objective import Objective, StepContext
from kdlab.train.run_folder import RunFolder, git_commit, mixed_threads, note, run_record, thread_warning  # noqa: F401
from kdlab.train.runtime import Runtime


class TrainingError(RuntimeError):
    pass


def ema_update(ema: dict, state: dict, decay: float) -> None:
    """One EMA step, in place: ``ema[k] ← decay·ema[k] + (1−decay)·state[k]`` for floating
    entries; other entries (e.g. BatchNorm's ``num_batches_tracked``) are copied."""
    with torch.no_grad():
        for k, v in state.items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v.detach().to(ema[k].dtype), alpha=1.0 - decay)
            else:
                ema[k].copy_(v)


class EMAWeights:
    """``with EMAWeights(model, ema):`` the model holds the EMA weights ``ema`` (a state dict) inside
    the block and its own trained weights again after it (``ema=None``: nothing changes)."""

    def __init__(self, model, ema: Optional[dict]):
        self.model, self.ema, self.live = model, ema, None

    def __enter__(self):
        if self.ema is not None:
            self.live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.ema)
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.model.load_state_dict(self.live)
            self.live = None


class Determinism:
    """``train.deterministic`` / ``train.threads`` for the duration of a run: fixes the intra-op
    thread count (``threads``, default 1 when deterministic) and turns on
    ``torch.use_deterministic_algorithms`` (and deterministic cuDNN); the previous settings are
    restored on exit."""

    def __init__(self, cfg, n_params: Optional[int] = None, recorded: Optional[int] = None):
        """With neither ``train.threads`` nor ``OMP_NUM_THREADS`` set (and not deterministic), the
        count is chosen from the model's size ``n_params`` and the machine's load
        (:func:`kdlab.core.threads.choose_threads`), or is ``recorded`` (a resumed run's count)."""
        from kdlab.core.threads import choose_threads, explicit_threads

        self.on = bool(getattr(cfg, "deterministic", False))
        threads = getattr(cfg, "threads", None)
        self.threads = threads if threads is not None else (1 if self.on else None)
        if self.threads is None and not explicit_threads() and n_params is not None:
            self.threads = int(recorded) if recorded else choose_threads(int(n_params))

    def __enter__(self):
        self.prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        if self.on:
            import os

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        return self

    def __exit__(self, *exc):
        threads, algos, cudnn_det, bench = self.prev
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algos)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, bench


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    best_score: float = -math.inf  # of the primary model, in "higher is better" form
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    train_time_s: float = 0.0
    samples: float = 0.0  # training samples seen, in the objective's sample unit
    best: dict = field(default_factory=dict)  # model name -> [score, epoch]
    step: int = 0  # optimiser steps taken
    teacher_time_s: float = 0.0  # of train_time_s: computing teacher outputs and masks
    mask_time_s: float = 0.0  # of teacher_time_s: computing the causal masks
    data_wait_s: float = 0.0  # of train_time_s: waiting for the next training batch
    eval_time_s: float = 0.0  # outside train_time_s: validation each epoch and the final evaluation
    checkpoint_time_s: float = 0.0  # outside train_time_s: best.pt / last.pt / metrics.csv / run.json, best.pt read back


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """``train.optimizer``: SGD (momentum, optional Nesterov) or AdamW, with weight decay."""
    params = list(params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def lr_factor(cfg, epoch: int) -> float:
    """The learning-rate multiplier of ``epoch`` (0-based): a linear warm-up over
    ``warmup_epochs`` (epoch e gets (e+1)/warmup), then ``constant``, ``step`` (×gamma every
    ``step_size`` epochs) or ``cosine`` (½(1+cos(π·e/epochs)), as CosineAnnealingLR to 0)."""
    w = cfg.warmup_epochs
    if w and epoch < w:
        return (epoch + 1) / w
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.gamma ** (epoch // cfg.step_size)
    return 1.0


def build_scheduler(opt, cfg):
    """A per-epoch ``LambdaLR`` of :func:`lr_factor`."""
    if cfg.schedule == "cosine" and not cfg.warmup_epochs:  # the exact schedule of earlier runs
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step" and not cfg.warmup_epochs:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg, e))


def accumulation_windows(batches, accum: int, objective):
    """``(step, batch, denominator)``: with gradient accumulation over ``accum`` batches and an
    objective whose losses are ``window_normalised`` (per target token), the denominator is the
    total :meth:`~kdlab.train.objective.Objective.batch_weight` of the batch's accumulation window,
    so per-token losses are normalised over the whole window (exactly one big batch); else None."""
    weigh = objective.batch_weight if accum > 1 and objective.window_normalised else None
    if weigh is None:
        for step, batch in enumerate(batches):
            yield step, batch, None
        return
    step, window = 0, []
    for batch in batches:
        window.append(batch)
        if len(window) == accum:
            total = float(sum(weigh(b) for b in window))
            for b in window:
                yield step, b, total
                step += 1
            window = []
    if window:
        total = float(sum(weigh(b) for b in window))
        for b in window:
            yield step, b, total
            step += 1


def _score(metrics: dict, monitor: tuple[str, str]) -> float:
    key, mode = monitor
    v = float(metrics[key])
    return v if mode == "max" else -v


def nonfinite_inputs(batches) -> str:
    """Where the first floating-point input tensor holding NaN or inf is, among ``batches``
    (``(x, y, idx)`` or any tuple/dict whose first floating tensor is the input): ``'batch 3,
    sample indices [12, 40]'``; '' when every input is finite. Run only after a loss went
    non-finite, to tell bad data from a too-large learning rate."""
    for b, batch in enumerate(batches):
        items = list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) \
            else [batch]
        x = next((t for t in items if torch.is_tensor(t) and t.is_floating_point()), None)
        if x is None or bool(torch.isfinite(x).all()):
            continue
        rows = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero().flatten()
        idx = items[2] if len(items) > 2 and torch.is_tensor(items[2]) else None
        which = (idx[rows] if idx is not None and idx.numel() == x.shape[0] else rows).tolist()[:5]
        return f"batch {b + 1}, sample {'indices' if idx is not None else 'positions'} {which}"
    return ""


class Trainer:
    """Train ``objective`` into ``run_dir`` (see the module doc).

    Args:
        objective: a :class:`kdlab.train.objective.Objective` (the Trainer uses what it declares).
        train_loader, val_loader, test_loader: objects with ``epoch(e)`` and ``len()``; val/test may
            be None (no selection: the last epoch is kept; no test metrics).
        cfg: the recipe's ``train`` section.
        run_dir: the run folder.
        runtime: device, AMP and process group (default: from ``cfg``).
        callbacks: :class:`kdlab.train.callbacks.Callback` objects.
        identity: what makes two runs the same (the recipe dict): a folder holding a run of another
            identity is refused rather than resumed.
        method: the name shown in logs and results.
        info: extra keys of ``result.json`` (model name, data set, ...).
    """

    def __init__(self, objective, train_loader, val_loader, test_loader, cfg, run_dir, *,
                 runtime: Optional[Runtime] = None, callbacks: Sequence[Callback] = (),
                 identity: Optional[dict] = None, method: str = "", progress: bool = True,
                 info: Optional[dict] = None):
        if not isinstance(objective, Objective):
            raise TypeError(f"the Trainer trains a kdlab.train.objective.Objective; make {type(objective).__name__} "
                            f"subclass it (it declares what the loop may use)")
        self.objective = objective
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.cfg = cfg
        self.seed = cfg.seed
        self.run_dir = Path(run_dir)
        self.runtime = runtime or Runtime.from_cfg(cfg)
        self.callbacks = [LogFile()] + list(callbacks)
        if "tensorboard" in getattr(cfg, "log_to", ()):
            self.callbacks.append(TensorBoard())
        if "mlflow" in getattr(cfg, "log_to", ()):
            self.callbacks.append(MLflow())
        self.tty = sys.stderr.isatty()
        if progress and not self.tty:  # piped: one plain line per epoch instead of a bar
            self.callbacks.append(ConsoleLines())
        self.identity = identity
        self.method = method
        self.progress = progress
        self.info = dict(info or {})
        self.names = list(objective.models())
        self.primary = self.names[0]
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.opt = build_optimizer(self.params, cfg)
        self.sched = build_scheduler(self.opt, cfg)
        self.state = RunState()
        self.first_steps_s: list[float] = []  # train.compile: the first two training steps' seconds
        self.ema_decay = getattr(cfg, "ema", None)
        self.ema: Optional[dict] = None  # the primary model's EMA state (train.ema)
        self.should_stop = False
        self.folder = RunFolder(self.run_dir, identity=identity, seed=self.seed, method=method,
                                primary=self.primary, runtime=self.runtime)
        self.unit = objective.sample_unit
        # model name -> (epoch, validation metrics) of its best epoch, validated in this process:
        # the final evaluation reuses them on the CPU instead of validating the same weights again
        self._val_of_best: dict = {}

    @property
    def best_ck(self) -> dict:
        """Model name -> its best checkpoint dict (also kept in last.pt)."""
        return self.folder.best_ck

    # -- checkpoints -------------------------------------------------------------------------------
    def best_path(self, name: str) -> Path:
        return self.folder.best_path(name)

    def _extra(self) -> dict:
        return {"recipe": self.identity, "seed": self.seed, "method": self.method}

    def save_best(self, name: str, epoch: int, val: dict) -> None:
        model = self.objective.models()[name]
        ck = model_checkpoint(model, **self.objective.checkpoint_meta(name), epoch=epoch, val=val,
                              **self._extra())
        if self.ema is not None and name == self.primary:  # train.ema: best.pt holds the EMA weights
            ck["model"] = {k: v.detach().cpu().clone() for k, v in self.ema.items()}
            ck["ema"] = float(self.ema_decay)
        self.folder.best_ck[name] = ck
        atomic_save(ck, self.best_path(name))

    def save_last(self) -> None:
        obj = self.objective
        atomic_save({
            "models": {n: m.state_dict() for n, m in obj.models().items()},
            "objective": obj.state_dict(),
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "scaler": self.runtime.scaler.state_dict(), "state": vars(self.state).copy(),
            "best": self.best_ck, "model": {}, "ema": self.ema, **self._extra(),
        }, self.run_dir / "last.pt")

    def try_resume(self) -> bool:
        path = self.run_dir / "last.pt"
        if not path.exists():
            return False
        ck = load_checkpoint(path, fix="delete it and re-run to train the run again from epoch 1")
        self.folder.check_identity(ck.get("recipe"), "a run")
        if "models" not in ck:
            raise ValueError(f"{path} was written by an older kdlab; delete it to start the run over")
        for n, m in self.objective.models().items():
            m.load_state_dict(ck["models"][n])
        self.objective.load_state_dict(ck["objective"])
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        self.runtime.scaler.load_state_dict(ck["scaler"])
        state = dict(ck["state"])
        if "images" in state:  # written before RunState counted samples in the objective's unit
            state["samples"] = state.pop("images")
        self.state = RunState(**state)
        self.folder.best_ck = dict(ck.get("best") or {})
        if self.ema_decay:
            if ck.get("ema") is None:
                raise ValueError(f"{path} holds no EMA weights but the recipe sets train.ema; delete it to "
                                 f"start the run over, or drop train.ema")
            live = self.objective.models()[self.primary].state_dict()
            self.ema = {k: v.to(live[k].device) for k, v in ck["ema"].items()}
        return True

    # -- one epoch ---------------------------------------------------------------------------------
    def _timed(self, batches):
        """``batches``, adding the seconds spent waiting for each to ``state.data_wait_s``."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                self.state.data_wait_s += time.perf_counter() - t0
                return
            self.state.data_wait_s += time.perf_counter() - t0
            yield b

    @property
    def compile_train_warmup_s(self) -> float:
        """``train.compile``: the first training step's seconds beyond the second's -- the
        recompilation for training (train mode, gradients, the backward graph), which the set-up's
        probe batch does not do; 0 without compile or before two steps ran in this process."""
        fs = self.first_steps_s
        return max(0.0, fs[0] - fs[1]) if len(fs) == 2 else 0.0

    def train_epoch(self, epoch: int) -> dict:
        torch.manual_seed(derive_seed(self.seed, "epoch", epoch))
        obj, rt, cfg = self.objective, self.runtime, self.cfg
        for m in obj.models().values():
            m.train()
        sums: dict = {}
        n_seen = 0.0
        accum = max(1, cfg.grad_accum)
        t0 = time.perf_counter()
        teacher0, mask0 = obj.teacher_time_s, obj.mask_time_s
        steps = len(self.train_loader)
        from kdlab.core.progress import progress_bar

        bar = progress_bar(steps, f"{self.method or 'train'} s{self.seed} epoch {epoch + 1}/{cfg.epochs}", "batch",
                           enabled=self.progress and rt.is_main and steps > 1, end_line=False)
        self.opt.zero_grad(set_to_none=True)
        for step, batch, denom in accumulation_windows(self._timed(self.train_loader.epoch(epoch)), accum, obj):
            t_step = time.perf_counter()
            ctx = StepContext(epoch=epoch, step=step, runtime=rt,
                              extra={} if denom is None else {"token_denominator": denom, "grad_accum": accum})
            loss, logs = obj.step(batch, ctx)
            n = logs.pop("n", None)  # the step's weight in sample units (default: the batch's)
            b = float(n) if n is not None else obj.batch_weight(batch)
            loss = rt.local_loss(loss, b, self.train_loader, step)
            rt.backward(loss / accum if accum > 1 else loss)
            if (step + 1) % accum == 0 or step + 1 == steps:
                rt.step(self.opt, self.params, grad_clip=cfg.grad_clip, weight=b)
                self.opt.zero_grad(set_to_none=True)
                self.state.step += 1
                if self.ema is not None:
                    ema_update(self.ema, obj.models()[self.primary].state_dict(), float(self.ema_decay))
            n_seen += b
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().float() * b
            self.step_loss = loss.detach()  # for per-step loggers (read on the callbacks' schedule)
            if cfg.compile and len(self.first_steps_s) < 2:  # the backward is compiled in the first step
                self.first_steps_s.append(time.perf_counter() - t_step)
            for cb in self.callbacks:
                cb.on_step_end(self, ctx)
            bar.update(1)
        bar.close()
        n_seen, sums = rt.sync_epoch(list(obj.models().values()), n_seen, sums)
        dt = time.perf_counter() - t0
        row = {k: (v / max(n_seen, 1)).item() for k, v in sums.items()}
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            where = nonfinite_inputs(self.train_loader.epoch(epoch))
            if where:
                raise TrainingError(
                    f"the training inputs hold NaN or infinite values ({where}), so the loss "
                    f"({', '.join(bad)}) became non-finite in epoch {epoch + 1}; fix the data set (the "
                    f"learning rate is not the cause)")
            cause = obj.nonfinite_cause()
            raise TrainingError(cause or (
                f"loss became non-finite ({', '.join(bad)}) in epoch {epoch + 1}; lower train.lr or "
                f"the term weights and re-run (the last good epoch's checkpoint is kept)"))
        row["train_time_s"] = dt
        row["teacher_time_s"] = obj.teacher_time_s - teacher0
        row[f"{self.unit}_per_s"] = n_seen / dt if dt > 0 else float("nan")
        self.state.samples += n_seen
        self.state.teacher_time_s += row["teacher_time_s"]
        self.state.mask_time_s += obj.mask_time_s - mask0  # result.json only
        return row

    def validate(self) -> dict[str, dict]:
        if self.val_loader is None:
            return {}
        with EMAWeights(self.objective.models()[self.primary], self.ema):  # train.ema: validate the EMA
            return {n: self.objective.evaluate(n, self.val_loader) for n in self.names}

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, *, resume: bool = True, stop_after: Optional[int] = None) -> dict:
        """Train to the end (or early stop) and return the result dict (also ``result.json``).
        A finished run is verified and returned as is (``resume=False``: trained again).
        ``stop_after``: stop after that many completed epochs, as if interrupted (tests)."""
        check_out_dir(self.run_dir, "run folder")
        lock = RunLock(self.run_dir) if self.runtime.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            n_params = sum(p.numel() for m in self.objective.models().values() for p in m.parameters())
            recorded = self.folder.recorded_threads() if resume and (self.run_dir / "last.pt").exists() else None
            with Determinism(self.cfg, n_params=n_params, recorded=recorded):
                if lock is not None:
                    clean_tmp(self.run_dir)
                return self._fit(resume, stop_after)
        finally:
            if lock is not None:
                lock.release()

    # -- a finished run ----------------------------------------------------------------------------
    def finished_result(self) -> dict:
        """The result of the finished run in ``run_dir``, verified file by file (:class:`RunFolder`)."""
        return self.folder.finished_result(self.names)

    def _fit(self, resume: bool, stop_after: Optional[int]) -> dict:
        rt, cfg, st = self.runtime, self.cfg, None
        done = self.run_dir / "result.json"
        if resume and done.exists():
            return self.finished_result()
        recorded = None
        if resume:
            if self.try_resume():
                recorded = self.folder.recorded_threads()
        elif rt.is_main:  # start over: the old result and resume state no longer apply
            for f in ("result.json", "last.pt"):
                (self.run_dir / f).unlink(missing_ok=True)
        self.folder.warn_threads(recorded)
        if rt.is_main:
            t_ck = time.perf_counter()
            self.folder.write_record()
            self.state.checkpoint_time_s += time.perf_counter() - t_ck
        if self.ema_decay and self.ema is None:  # a fresh run: the EMA starts at the initial weights
            self.ema = {k: v.detach().clone() for k, v in self.objective.models()[self.primary].state_dict().items()}
        for cb in self.callbacks:
            cb.on_fit_start(self)
        st = self.state
        bar = None
        if self.progress and rt.is_main and self.tty:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.epochs, initial=st.epoch, desc=f"{self.method} s{self.seed}",
                       leave=False, dynamic_ncols=True)
        stopped_early = False
        monitor = self.objective.monitor
        try:
            while st.epoch < cfg.epochs and not self.should_stop:
                if cfg.patience is not None and st.bad_epochs >= cfg.patience:
                    stopped_early = True
                    break
                if cfg.stop_after_epochs is not None and st.epoch >= cfg.stop_after_epochs:
                    stopped_early = True  # the recipe ends the schedule here (train.stop_after_epochs)
                    break
                epoch = st.epoch
                row = self.train_epoch(epoch)
                t_eval = time.perf_counter()
                vals = self.validate()
                st.eval_time_s += time.perf_counter() - t_eval
                lr = self.opt.param_groups[0]["lr"]
                row = {"epoch": epoch + 1, "lr": lr, **row}
                for n, val in vals.items():
                    bad = [k for k, v in val.items() if isinstance(v, float) and not math.isfinite(v)]
                    where = nonfinite_inputs(self.val_loader.epoch(0)) if bad else ""
                    if where:
                        raise TrainingError(
                            f"the validation inputs hold NaN or infinite values ({where}), so validation "
                            f"{', '.join(bad)} became non-finite in epoch {epoch + 1}; fix the data set (the "
                            f"learning rate is not the cause)")
                    if bad:
                        raise TrainingError(
                            f"validation {', '.join(bad)} became non-finite in epoch {epoch + 1}; lower "
                            f"train.lr or the term weights and re-run (the last good checkpoint is kept)")
                    pre = "val_" if n == self.primary else f"{n}_val_"
                    row.update({pre + k: v for k, v in val.items() if k != "n"})
                self.sched.step()
                st.train_time_s += row["train_time_s"]
                st.history.append(row)
                st.epoch = epoch + 1
                improved_primary = False
                for n in self.names:
                    score = _score(vals[n], monitor) if vals else float(st.epoch)
                    prev = st.best.get(n, [-math.inf, 0])[0]
                    if score > prev:
                        st.best[n] = [score, st.epoch]
                        self._val_of_best[n] = (st.epoch, vals.get(n))  # this process's own validation
                        if rt.is_main:
                            t_ck = time.perf_counter()
                            self.save_best(n, st.epoch, vals.get(n, {}))
                            st.checkpoint_time_s += time.perf_counter() - t_ck
                        improved_primary |= n == self.primary
                if improved_primary:
                    st.best_score, st.best_epoch, st.bad_epochs = st.best[self.primary][0], st.epoch, 0
                else:
                    st.bad_epochs += 1
                if rt.is_main:
                    t_ck = time.perf_counter()
                    self.save_last()
                    write_csv(self.run_dir / "metrics.csv", st.history)
                    st.checkpoint_time_s += time.perf_counter() - t_ck
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{row['loss']:.3f}"} if "loss" in row else {}
                    if vals:
                        post[monitor[0]] = f"{vals[self.primary][monitor[0]]:.3f}"
                    bar.set_postfix(**post)
                try:
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, row)
                except StopTraining:
                    self.should_stop = True
                if stop_after is not None and st.epoch >= stop_after and st.epoch < cfg.epochs:
                    return {"interrupted": True, "epoch": st.epoch}
        finally:
            if bar is not None:
                bar.close()
        result = self.finish(stopped_early)
        for cb in self.callbacks:
            cb.on_fit_end(self, result)
        return result

    def _best_validation(self, name: str) -> Optional[dict]:
        """The validation metrics of ``name``'s best epoch as this process computed them when it
        saved ``best.pt`` -- the same weights, loader and arithmetic, so the same numbers -- or None
        (a resumed run's best epoch from before the interruption; a non-CPU device, where kernels
        may be chosen anew: evaluated again there)."""
        got = self._val_of_best.get(name)
        st = self.state
        if (got is None or got[1] is None or self.val_loader is None or self.runtime.device.type != "cpu"
                or got[0] != st.best.get(name, [0, 0])[1]):
            return None
        return dict(got[1])

    def finish(self, stopped_early: bool) -> dict:
        st, rt, obj = self.state, self.runtime, self.objective
        rt.barrier()  # rank 0 wrote best.pt
        per_model = {}
        for n, model in obj.models().items():
            path = self.best_path(n)
            if not path.exists() and not self.folder.rebuild(n, "missing"):
                raise RunFileError(f"{path} is missing and last.pt holds no copy of it; delete the folder "
                                   f"{self.run_dir} and re-run to train it again")
            fix = ("delete it and re-run (it is rebuilt from last.pt)" if n in self.best_ck else
                   f"delete the folder {self.run_dir} and re-run to train it again")
            t_ck = time.perf_counter()
            best = load_checkpoint(path, fix=fix)
            model.load_state_dict(best["model"])
            st.checkpoint_time_s += time.perf_counter() - t_ck
            t_eval = time.perf_counter()
            test = obj.evaluate(n, self.test_loader) if self.test_loader is not None else {}
            val = self._best_validation(n)
            if val is None:
                val = obj.evaluate(n, self.val_loader) if self.val_loader is not None else {}
            st.eval_time_s += time.perf_counter() - t_eval
            per_model[n] = {**{f"val_{k}": v for k, v in val.items() if k != "n"},
                            **{f"test_{k}": v for k, v in test.items() if k != "n"},
                            "n_test": test.get("n"), "best_epoch": st.best.get(n, [0, 0])[1]}
        main = per_model[self.primary]
        result = {"method": self.method, "seed": self.seed, **main,
                  "epochs_run": st.epoch, "stopped_early": stopped_early,
                  "train_time_s": st.train_time_s, "sample_unit": self.unit,
                  f"{self.unit}_per_s": st.samples / st.train_time_s if st.train_time_s else float("nan"),
                  # the teacher's share (outputs and causal masks computed live or into a study's
                  # cache, whichever run fills it) and the student's own cost without it
                  "teacher_time_s": st.teacher_time_s,
                  "mask_time_s": st.mask_time_s,  # of teacher_time_s: the causal masks
                  "data_wait_s": st.data_wait_s,  # of train_time_s: waiting for training batches
                  # train.compile: each compiled model's first call (tracing, code generation), made by
                  # the set-up's probe batch, so in setup_time_s; the student's recompilation for
                  # training (train mode, gradients, backward) is in the first epoch's train_time_s,
                  # measured apart as compile_train_warmup_s
                  "compile_warmup_s": float(getattr(self.objective, "compile_warmup_s", 0.0)),
                  "compile_train_warmup_s": self.compile_train_warmup_s,
                  "eval_time_s": st.eval_time_s,  # not in train_time_s: validation and the final test
                  "checkpoint_time_s": st.checkpoint_time_s,  # not in train_time_s: run files written / read
                  "student_time_s": st.train_time_s - st.teacher_time_s,
                  f"student_{self.unit}_per_s": (st.samples / (st.train_time_s - st.teacher_time_s)
                                                 if st.train_time_s > st.teacher_time_s else float("nan")),
                  "threads": torch.get_num_threads(),
                  "deterministic": torch.are_deterministic_algorithms_enabled(), **self.info}
        if len(per_model) > 1:
            result["models"] = per_model
        if rt.is_main:
            write_json(self.run_dir / "result.json", result)
        return result
