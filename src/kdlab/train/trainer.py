"""The one training loop, for teachers and students alike.

``train(recipe, run_dir)`` trains the recipe's ``student`` model with the recipe's weighted loss
terms (a teacher is a recipe whose loss is plain ``ce``). It selects the best epoch on the
validation split (early stopping with ``patience``), reports the test split once at the end,
writes atomic checkpoints every epoch and resumes an interrupted run where it stopped.

A run is a pure function of (recipe, seed): the data order and augmentation draws come from the
loader's seed, and every epoch starts from ``torch.manual_seed(derive_seed(seed, "epoch", e))``,
so a resumed run finishes with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.core.checkpoint import atomic_save, load_checkpoint, load_model, model_checkpoint
from kdlab.core.config import Recipe
from kdlab.data import BatchLoader, load_dataset
from kdlab.data.augment import AugmentSpec
from kdlab.distill.losses import BatchRecord, build_terms
from kdlab.distill.masks import causal_masks
from kdlab.models import create_model
from kdlab.core.seeding import derive_seed, seed_everything
from kdlab.models.taps import Taps


class TrainingError(RuntimeError):
    pass


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is '{spec}' but no CUDA device is visible; use device: cpu or auto")
    return torch.device(spec)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model: nn.Module, loader: BatchLoader, device=None, amp: str = "none"):
    """Logits and labels of a whole split, in loader order."""
    was = model.training
    model.eval()
    outs, ys = [], []
    dev = device or next(model.parameters()).device
    for x, y, _ in loader.epoch(0):
        with autocast(torch.device(dev), amp):
            outs.append(model(x.to(dev)).float())
        ys.append(y.to(dev))
    model.train(was)
    return torch.cat(outs), torch.cat(ys)


def evaluate(model: nn.Module, loader: BatchLoader, device=None, amp: str = "none") -> dict:
    logits, y = predict(model, loader, device, amp)
    return {
        "acc": (logits.argmax(1) == y).float().mean().item(),
        "loss": F.cross_entropy(logits, y).item(),
        "n": int(y.numel()),
    }


# --------------------------------------------------------------------------------------------
# teacher outputs


class LiveTeacher:
    """Runs the teacher on every batch: logits and tapped features without gradients, and the
    causal masks (which need gradients w.r.t. the teacher's activations only)."""

    def __init__(self, teacher: nn.Module, layers: list[str], mask_layers: list[str], mask_cfg,
                 round_to: Optional[torch.dtype] = None):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.layers = layers
        self.mask_layers = mask_layers
        self.mask_cfg = mask_cfg
        self.round_to = round_to  # outputs rounded through this dtype (as a teacher cache stores them)

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        # outside inference mode: a normal fp32 tensor that autograd may save
        return t.to(self.round_to).float() if self.round_to is not None else t.float().clone()

    def forward(self, x, layers) -> tuple[torch.Tensor, dict]:
        with torch.inference_mode(), Taps(self.teacher, layers, detach=True) as taps:
            logits = self.teacher(x)
            feats = {n: taps[n] for n in layers}
        return self._out(logits), {n: self._out(f) for n, f in feats.items()}

    def masks(self, x, y, layers) -> dict:
        if not layers:
            return {}
        return {n: self._out(m) for n, m in causal_masks(self.teacher, x, y, layers, self.mask_cfg).items()}

    def __call__(self, x, y, idx=None, epoch=0, step=0):
        logits, feats = self.forward(x, self.layers)
        return logits, feats, self.masks(x, y, self.mask_layers)


def load_teacher(recipe: Recipe, info, device) -> nn.Module:
    """The recipe's teacher, loaded from its checkpoint and checked against the data set."""
    tc = recipe.teacher
    if tc is None or not tc.checkpoint:
        raise ValueError("this recipe needs a teacher: set teacher.checkpoint (train one with `kdlab train-teacher`)")
    if not Path(tc.checkpoint).is_file():
        hint = f"`kdlab train-teacher {tc.recipe}`" if tc.recipe else "`kdlab train-teacher <teacher recipe>`"
        raise FileNotFoundError(f"teacher checkpoint {tc.checkpoint} not found; train it first with {hint}")
    teacher, ck = load_model(tc.checkpoint, device)
    check_pair(ck["num_classes"], ck["in_channels"], info, f"teacher {tc.checkpoint}")
    return teacher


def check_pair(num_classes: int, in_channels: int, info, who: str) -> None:
    if num_classes != info.num_classes:
        raise ValueError(f"{who} predicts {num_classes} classes but data set '{info.name}' has "
                         f"{info.num_classes}; use a teacher trained on the same data set")
    if in_channels != info.in_channels:
        raise ValueError(f"{who} takes {in_channels} input channels but '{info.name}' has "
                         f"{info.in_channels}; use a teacher trained on the same data set")


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    best_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list = None
    train_time_s: float = 0.0
    images: int = 0


def _scheduler(opt, cfg):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _write_metrics(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


class Trainer:
    """Holds everything one run needs; ``fit()`` runs it. Use :func:`train` for the common case."""

    def __init__(self, recipe: Recipe, run_dir, *, teacher: Optional[nn.Module] = None,
                 splits=None, progress: bool = True, method: str = "", teacher_source=None,
                 dist=None, teacher_cache=None):
        self.recipe = recipe
        self.cfg = recipe.train
        self.seed = recipe.train.seed
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.method = method or recipe.name
        self.device = resolve_device(self.cfg.device)
        if dist is None:  # launched by torchrun: join the process group (kdlab.train.runtime)
            from kdlab.train.runtime import from_env
            dist = from_env()
        self.dist = dist  # (rank, world_size) when distributed, set up by kdlab.train.runtime
        d = recipe.data
        self.splits = splits or load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction,
                                             label_fraction=d.label_fraction, seed=self.seed)
        info = self.info = self.splits.info
        sc = recipe.student
        seed_everything(derive_seed(self.seed, "init"))  # the same seed gives the same weights
        self.model = create_model(sc.model, num_classes=info.num_classes,
                                  in_channels=info.in_channels, **sc.kwargs).to(self.device)
        if self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.terms = build_terms(recipe.loss)
        self.term_modules = nn.ModuleList([t for _, _, t in self.terms]).to(self.device)
        self.s_layers = list(dict.fromkeys(l for _, _, t in self.terms for l in t.student_layers()))
        t_layers = list(dict.fromkeys(l for _, _, t in self.terms for l in t.teacher_layers()))
        m_layers = list(dict.fromkeys(l for _, _, t in self.terms for l in t.mask_layers()))
        self.needs_teacher = any(t.needs_teacher for _, _, t in self.terms)
        self.teacher = None
        self.teacher_source = teacher_source
        if self.needs_teacher and teacher_source is None:
            if teacher is None:
                teacher = load_teacher(recipe, info, self.device)
            else:
                check_pair(_out_features(teacher, info, self.device), info.in_channels, info, "teacher")
                teacher = teacher.to(self.device)
            self.teacher = teacher
            round_to = {"cache-fp16": torch.float16, "cache-fp32": torch.float32}.get(self.cfg.teacher_mode)
            self.teacher_source = LiveTeacher(teacher, t_layers, m_layers, recipe.mask, round_to=round_to)
        aug = AugmentSpec(crop_pad=d.augment.crop_pad, flip=d.augment.flip)
        data_seed = derive_seed(self.seed, "data")
        if self.cfg.teacher_mode == "consistent":  # fresh augmentation per method (docs/speed.md)
            data_seed = derive_seed(self.seed, "data", json.dumps([t.model_dump() for t in recipe.loss]))
        bs = self.cfg.batch_size
        if dist is not None:  # the same total batch, split over the ranks
            if bs % dist[1]:
                raise ValueError(f"train.batch_size {bs} must be divisible by the {dist[1]} processes")
            bs //= dist[1]
        self.train_loader = BatchLoader(self.splits.train, bs, shuffle=True,
                                        seed=data_seed, augment=aug,
                                        mean=info.mean, std=info.std, device=self.device)
        if dist is not None:
            self.train_loader = self.train_loader.shard(*dist)
        if teacher_cache is not None:
            from kdlab.distill.teachers import attach_cache
            attach_cache(self, teacher_cache)
        eval_kw = dict(shuffle=False, mean=info.mean, std=info.std, device=self.device)
        self.val_loader = BatchLoader(self.splits.val, self.cfg.eval_batch_size, **eval_kw)
        self.test_loader = BatchLoader(self.splits.test, self.cfg.eval_batch_size, **eval_kw)
        self.forward_model = torch.compile(self.model) if self.cfg.compile else self.model
        self._setup_terms()
        if dist is not None:
            from kdlab.train.runtime import broadcast_modules
            broadcast_modules(self.model, self.term_modules)
        params = list(self.model.parameters()) + list(self.term_modules.parameters())
        self.opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay, nesterov=self.cfg.nesterov)
        self.sched = _scheduler(self.opt, self.cfg)
        self.scaler = torch.amp.GradScaler(enabled=self.cfg.amp == "fp16" and self.device.type == "cuda")
        self.state = RunState(history=[])

    # -- one batch -------------------------------------------------------------------------
    def record(self, x, y, idx, epoch: int, step: int) -> BatchRecord:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t_logits, t_feats, masks = (None, {}, {})
        if self.teacher_source is not None:
            t_logits, t_feats, masks = self.teacher_source(x, y, idx, epoch, step)
        with autocast(self.device, self.cfg.amp), Taps(self.model, self.s_layers) as taps:
            s_logits = self.forward_model(x)
            s_feats = {n: taps[n] for n in self.s_layers}
        return BatchRecord(x=x, y=y, s_logits=s_logits.float(), t_logits=t_logits,
                           s_feats=s_feats, t_feats=t_feats, masks=masks, index=idx,
                           epoch=epoch, step=step, extra={"n_data": len(self.splits.train.y)})

    def losses(self, rec: BatchRecord) -> tuple[torch.Tensor, dict]:
        parts = {}
        total = 0.0
        with autocast(self.device, self.cfg.amp):
            for name, w, term in self.terms:
                if w == 0:
                    continue
                v = term(rec).float()
                parts[name] = v
                total = total + w * v
        return total, parts

    def _setup_terms(self):
        x, y, idx = next(iter(self.train_loader.epoch(0)))
        self.model.eval()
        with torch.no_grad():
            rec = self.record(x, y, idx, 0, 0)
        self.model.train()
        for _, _, term in self.terms:
            term.setup(rec)
        self.term_modules.to(self.device)

    # -- checkpoints -------------------------------------------------------------------------
    def _ckpt_extra(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "seed": self.seed, "method": self.method}

    def save_best(self, epoch: int, val: dict) -> None:
        ck = model_checkpoint(self.model, model_name=self.recipe.student.model,
                              model_kwargs=self.recipe.student.kwargs,
                              num_classes=self.info.num_classes, in_channels=self.info.in_channels,
                              dataset=self.info.name, epoch=epoch, val=val, **self._ckpt_extra())
        atomic_save(ck, self.run_dir / "best.pt")

    def save_last(self) -> None:
        st = self.state
        atomic_save({
            "model": self.model.state_dict(), "terms": self.term_modules.state_dict(),
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "state": vars(st).copy(), **self._ckpt_extra(),
        }, self.run_dir / "last.pt")

    def try_resume(self) -> bool:
        path = self.run_dir / "last.pt"
        if not path.exists():
            return False
        ck = load_checkpoint(path)
        if ck.get("recipe") != self.recipe.to_dict():
            raise ValueError(f"{self.run_dir} holds a run of a different recipe; "
                             f"use another output folder or delete it to start over")
        self.model.load_state_dict(ck["model"])
        self.term_modules.load_state_dict(ck["terms"])
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        self.scaler.load_state_dict(ck["scaler"])
        self.state = RunState(**ck["state"])
        return True

    # -- the loop ------------------------------------------------------------------------------
    def is_main(self) -> bool:
        return self.dist is None or self.dist[0] == 0

    def train_epoch(self, epoch: int) -> dict:
        torch.manual_seed(derive_seed(self.seed, "epoch", epoch))
        self.model.train()
        sums = {}
        n_seen, correct = 0, torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        for step, (x, y, idx) in enumerate(self.train_loader.epoch(epoch)):
            rec = self.record(x, y, idx, epoch, step)
            total, parts = self.losses(rec)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if self.cfg.grad_clip:
                self.scaler.unscale_(self.opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            if self.dist is not None:
                from kdlab.train.runtime import all_reduce_grads
                all_reduce_grads(self.model, self.term_modules, weight=y.shape[0])
            self.scaler.step(self.opt)
            self.scaler.update()
            b = y.shape[0]
            n_seen += b
            correct += (rec.s_logits.detach().argmax(1) == y).sum()
            for k, v in (("loss", total), *parts.items()):
                sums[k] = sums.get(k, 0.0) + v.detach() * b
        if self.dist is not None:  # metrics over all ranks; BN statistics averaged
            from kdlab.train.runtime import sync_epoch
            n_seen, correct, sums = sync_epoch(self.model, n_seen, correct, sums)
        dt = time.perf_counter() - t0
        row = {k: (v / max(n_seen, 1)).item() for k, v in sums.items()}
        if not all(math.isfinite(v) for v in row.values()):
            bad = [k for k, v in row.items() if not math.isfinite(v)]
            raise TrainingError(
                f"loss became non-finite ({', '.join(bad)}) in epoch {epoch + 1}; lower train.lr or "
                f"the term weights and re-run (the last good epoch's checkpoint is kept)")
        row["train_acc"] = (correct / max(n_seen, 1)).item()
        row["train_time_s"] = dt
        row["images_per_s"] = n_seen / dt if dt > 0 else float("nan")
        self.state.images += n_seen
        return row

    def fit(self, *, resume: bool = True, stop_after: Optional[int] = None,
            on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        done = self.run_dir / "result.json"
        if resume and done.exists():
            ran = self.run_dir / "run.json"
            if ran.exists() and json.loads(ran.read_text()).get("recipe") != self.recipe.to_dict():
                raise ValueError(f"{self.run_dir} holds a finished run of a different recipe; "
                                 f"use another output folder or delete it to re-run")
            return json.loads(done.read_text())
        if resume:
            self.try_resume()
        elif (self.run_dir / "last.pt").exists():
            (self.run_dir / "last.pt").unlink()
        if self.is_main():
            _write_json(self.run_dir / "run.json", {
                "recipe": self.recipe.to_dict(), "seed": self.seed, "method": self.method,
                "command": " ".join(sys.argv), "torch": torch.__version__,
                "device": str(self.device), "threads": torch.get_num_threads()})
        st, cfg = self.state, self.cfg
        bar = None
        if self.progress and self.is_main():
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.epochs, initial=st.epoch, desc=f"{self.method} s{self.seed}",
                       leave=False, dynamic_ncols=True)
        stopped_early = False
        try:
            while st.epoch < cfg.epochs:
                if cfg.patience is not None and st.bad_epochs >= cfg.patience:
                    stopped_early = True
                    break
                epoch = st.epoch
                row = self.train_epoch(epoch)
                val = evaluate(self.model, self.val_loader, amp=cfg.amp)
                row = {"epoch": epoch + 1, "lr": self.opt.param_groups[0]["lr"], **row,
                       "val_acc": val["acc"], "val_loss": val["loss"]}
                self.sched.step()
                st.train_time_s += row["train_time_s"]
                st.history.append(row)
                st.epoch = epoch + 1
                if val["acc"] > st.best_acc:
                    st.best_acc, st.best_epoch, st.bad_epochs = val["acc"], epoch + 1, 0
                    if self.is_main():
                        self.save_best(epoch + 1, val)
                else:
                    st.bad_epochs += 1
                if self.is_main():
                    self.save_last()
                    _write_metrics(self.run_dir / "metrics.csv", st.history)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{val['acc']:.3f}",
                                    best=f"{st.best_acc:.3f}")
                if on_epoch:
                    on_epoch(row)
                if stop_after is not None and st.epoch >= stop_after and st.epoch < cfg.epochs:
                    return {"interrupted": True, "epoch": st.epoch}
        finally:
            if bar is not None:
                bar.close()
        return self.finish(stopped_early)

    def finish(self, stopped_early: bool) -> dict:
        st = self.state
        if self.dist is not None:  # rank 0 writes best.pt
            from kdlab.train.runtime import barrier
            barrier()
        best = load_checkpoint(self.run_dir / "best.pt")
        self.model.load_state_dict(best["model"])
        test = evaluate(self.model, self.test_loader, amp=self.cfg.amp)
        val = evaluate(self.model, self.val_loader, amp=self.cfg.amp)
        result = {
            "method": self.method, "seed": self.seed, "recipe": self.recipe.name,
            "val_acc": val["acc"], "test_acc": test["acc"], "test_loss": test["loss"],
            "n_test": test["n"], "best_epoch": st.best_epoch, "epochs_run": st.epoch,
            "stopped_early": stopped_early, "train_time_s": st.train_time_s,
            "images_per_s": st.images / st.train_time_s if st.train_time_s else float("nan"),
            "model": self.recipe.student.model, "dataset": self.info.name,
        }
        if self.is_main():
            _write_json(self.run_dir / "result.json", result)
        return result


def _out_features(model: nn.Module, info, device) -> int:
    x = torch.zeros(1, info.in_channels, info.image_size, info.image_size, device=device)
    was = model.training
    model.eval()
    with torch.no_grad():
        n = model.to(device)(x).shape[1]
    model.train(was)
    return n


def train(recipe: Recipe, run_dir, *, teacher=None, splits=None, progress: bool = True,
          resume: bool = True, stop_after: Optional[int] = None, method: str = "",
          teacher_cache=None) -> dict:
    """Train ``recipe`` into ``run_dir`` and return its result dict (see docs/DESIGN.md).
    ``teacher_cache``: a `kdlab.distill.teachers.TeacherStore` shared by the runs of a study."""
    trainer = Trainer(recipe, run_dir, teacher=teacher, splits=splits, progress=progress, method=method,
                      teacher_cache=teacher_cache)
    return trainer.fit(resume=resume, stop_after=stop_after)
