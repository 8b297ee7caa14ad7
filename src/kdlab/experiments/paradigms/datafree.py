"""The shared loop of the generator-based data-free paradigms (``dafl``, ``zskt``) and of their
control, KD on Gaussian noise (``noise``): no real training image is ever read.

Every run is one :class:`kdlab.train.trainer.Trainer` run (checkpoints, resume, metrics, best
epoch on the *real* validation split, the real test split once at the end, like ``deepinv``):
an epoch is ``iters`` student steps (``train.epochs`` epochs in all, so the cost is bounded by the
recipe), each on a batch of ``batch_size`` synthetic inputs in the normalised input space. The
Trainer's optimiser (the recipe's ``train`` section: the shipped recipes use Adam, lr 2e-3, as both
papers) trains the student; :class:`GeneratorKDObjective` updates the generator itself with its own
Adam (``lr_g``, cosine-annealed over the epochs) inside ``step`` and clears the student's
gradients that the generator's backward left. The generator and its optimiser are saved with the
run (``last.pt``), so runs resume.

After training, :func:`sample_grid` writes ``samples.png``: 64 generator outputs (de-normalised to
[0, 1]) titled with the teacher's class and confidence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from pydantic import Field
from torch import nn

from kdlab.core.io import save_and_close, write_json
from kdlab.distill.generators import (dafl_generator, dafl_generator_losses, kl_batchmean, zskt_generator,
                                      zskt_generator_loss, zskt_student_loss)
from kdlab.distill.losses.response import kd_loss
from kdlab.experiments.paradigms.base import ParadigmParams
from kdlab.models.taps import Taps
from kdlab.train.objective import Objective
from kdlab.train.recipe import Recipe


class DataFreeParams(ParadigmParams):
    iters: int = Field(50, ge=1)         # student steps per epoch (train.epochs epochs)
    batch_size: int = Field(64, ge=2)
    latent_dim: int = Field(100, ge=1)


class SyntheticSteps:
    """A "loader" of ``n`` steps per epoch with no data: the objective makes its own inputs."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def epoch(self, e: int):
        for k in range(self.n):
            yield torch.tensor([k])


class ClassifierInput:
    """Records the input of a model's classifier (``model.classifier_name``): DAFL's features."""

    def __init__(self, model: nn.Module):
        name = getattr(model, "classifier_name", None)
        if not name:
            raise ValueError("dafl needs a teacher that names its classifier (classifier_name); "
                             "use a registered kdlab model as the teacher")
        self.value = None
        self.handle = model.get_submodule(name).register_forward_pre_hook(self._hook)

    def _hook(self, _module, inputs):
        self.value = inputs[0]


class GeneratorKDObjective(Objective):
    """The student, a frozen teacher and (``dafl``/``zskt``) a generator trained alongside.

    ``mode``: ``noise`` (Gaussian inputs, KD at ``T``), ``dafl`` or ``zskt`` (see
    :mod:`kdlab.distill.generators` for the losses)."""

    monitor = ("acc", "max")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, mode: str, runtime, meta: dict, shape: tuple,
                 params, epochs: int, at_pairs: Optional[list] = None):
        self.student, self.teacher, self.mode, self.runtime = student, teacher.eval(), mode, runtime
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.meta, self.shape, self.p, self.epochs = dict(meta), tuple(shape), params, int(epochs)
        self.at_pairs = list(at_pairs or [])
        dev = runtime.device
        self.generator = None
        if mode == "dafl":
            self.generator = dafl_generator(params.latent_dim, shape[-1], shape[0]).to(dev)
            self.features = ClassifierInput(self.teacher)
        elif mode == "zskt":
            self.generator = zskt_generator(params.latent_dim, shape[-1], shape[0]).to(dev)
        elif mode != "noise":
            raise ValueError(f"unknown data-free mode {mode!r}")
        self.g_opt = (torch.optim.Adam(self.generator.parameters(), lr=params.lr_g)
                      if self.generator is not None else None)
        self.count = 0       # student steps so far (ZSKT's cycles run across epochs)
        self.z_cycle = None  # ZSKT: the latent batch of the current cycle
        self.cycle = None    # ZSKT: (x, teacher logits, teacher features) of the current cycle

    # -- protocol ---------------------------------------------------------------------------------
    def models(self) -> dict:
        return {"student": self.student}

    def parameters(self) -> list:
        return list(self.student.parameters())

    def checkpoint_meta(self, name: str) -> dict:
        return dict(self.meta)

    def evaluate(self, name: str, loader) -> dict:
        from kdlab.train.objective import split_metrics

        return split_metrics(self.student, loader, self.runtime)

    def state_dict(self) -> dict:
        out = {"count": self.count, "z_cycle": self.z_cycle}
        if self.generator is not None:
            out.update(generator=self.generator.state_dict(), g_opt=self.g_opt.state_dict())
        return out

    def load_state_dict(self, state: dict) -> None:
        self.count, self.z_cycle = int(state["count"]), state.get("z_cycle")
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
            self.g_opt.load_state_dict(state["g_opt"])

    # -- one step ---------------------------------------------------------------------------------
    def _g_lr(self, epoch: int) -> None:
        lr = self.p.lr_g * 0.5 * (1 + math.cos(math.pi * epoch / max(1, self.epochs)))
        for grp in self.g_opt.param_groups:
            grp["lr"] = lr

    def _z(self) -> torch.Tensor:
        return torch.randn(self.p.batch_size, self.p.latent_dim, device=self.runtime.device)

    def _clear_student_grads(self) -> None:
        for q in self.student.parameters():
            q.grad = None

    def step(self, batch, ctx):
        dev = self.runtime.device
        logs = {}
        if self.mode == "noise":
            x = torch.randn(self.p.batch_size, *self.shape, device=dev)
            with torch.no_grad():
                t = self.teacher(x)
            loss = kd_loss(self.student(x), t, self.p.T)
        elif self.mode == "dafl":
            self._g_lr(ctx.epoch)
            self.generator.train()
            x = self.generator(self._z())
            t = self.teacher(x)
            parts = dafl_generator_losses(t, self.features.value)
            g_loss = self.p.oh * parts["oh"] + self.p.ie * parts["ie"] + self.p.a * parts["a"]
            self.g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            self.g_opt.step()
            self._clear_student_grads()
            loss = kl_batchmean(self.student(x.detach()), t.detach())
            logs = {"g_loss": g_loss.detach(), "oh": parts["oh"].detach(), "ie": parts["ie"].detach(),
                    "a": parts["a"].detach()}
        else:  # zskt
            t_layers = [t for _, t in self.at_pairs]
            s_layers = [s for s, _ in self.at_pairs]
            if self.count % self.p.n_student == 0:  # a new cycle: one generator step on fresh z
                self._g_lr(ctx.epoch)
                self.generator.train()
                self.z_cycle = self._z()
                x = self.generator(self.z_cycle)
                g_loss = zskt_generator_loss(self.student(x), self.teacher(x))
                self.g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                nn.utils.clip_grad_norm_(self.generator.parameters(), self.p.clip_g)
                self.g_opt.step()
                self._clear_student_grads()
                logs["g_loss"] = g_loss.detach()
            if self.cycle is None or self.count % self.p.n_student == 0:
                # the cycle's batch and the teacher's outputs on it, once (both fixed in a cycle)
                with torch.no_grad():
                    xc = self.generator(self.z_cycle)
                    with Taps(self.teacher, t_layers, detach=True) as tt:
                        tc = self.teacher(xc)
                        self.cycle = (xc, tc, [tt[n] for n in t_layers])
            x, t, t_feats = self.cycle
            with Taps(self.student, s_layers) as st:
                s = self.student(x)
                s_feats = [st[n] for n in s_layers]
            loss = zskt_student_loss(s, t, s_feats, t_feats, self.p.beta)
        self.count += 1
        logs.update(loss=loss.detach(), n=self.p.batch_size)
        return loss, logs

    @torch.no_grad()
    def samples(self, n: int = 64) -> torch.Tensor:
        """``n`` inputs as the objective makes them (normalised space)."""
        if self.generator is None:
            return torch.randn(n, *self.shape, device=self.runtime.device)
        self.generator.train()  # its BatchNorm normalises over the batch, as in training
        return self.generator(torch.randn(n, self.p.latent_dim, device=self.runtime.device))


def sample_grid(x: torch.Tensor, teacher: nn.Module, mean, std, path, title: str) -> dict:
    """Save a grid of ``x`` (normalised space) de-normalised to [0, 1] and clipped, each titled
    with the teacher's class and confidence; returns the teacher's class histogram of ``x``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        p = torch.softmax(teacher(x), dim=1)
    conf, cls = p.max(dim=1)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    img = (x * s + m).clamp(0, 1).cpu()
    n = img.shape[0]
    cols = 8
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        im = img[k].permute(1, 2, 0).numpy()
        ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{int(cls[k])} ({conf[k]:.2f})", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_and_close(fig, path, dpi=110)
    hist = torch.bincount(cls.cpu(), minlength=p.shape[1]).tolist()
    return {"teacher_classes": hist, "teacher_confidence_mean": float(conf.mean())}


def run_generator_kd(recipe: Recipe, params, out_dir, *, mode: str, progress: bool = False, log=print) -> dict:
    """Train the recipe's student data-free (``mode``: noise | dafl | zskt) into ``out_dir``."""
    from kdlab.core.seeding import derive_seed, seed_everything
    from kdlab.models.adapters import build_model
    from kdlab.train.build import load_splits, load_teacher, make_loaders, student_meta
    from kdlab.train.runtime import Runtime
    from kdlab.train.trainer import Trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.teacher is None:
        raise ValueError(f"{mode} needs a recipe with a teacher section (teacher.checkpoint)")
    cfg = recipe.train
    runtime = Runtime.from_cfg(cfg)
    splits = load_splits(recipe)
    info = splits.info
    teacher = load_teacher(recipe, info, runtime.device)
    seed_everything(derive_seed(cfg.seed, "init"))
    sc = recipe.student
    student = build_model(sc.model, info.num_classes, info.in_channels, sc.kwargs, sc.weights).to(runtime.device)
    at_pairs = []
    if mode == "zskt":
        from kdlab.distill.losses.base import layer_pairs

        at_pairs = layer_pairs(params.at_layers, "zskt") if params.at_layers else []
    seed_everything(derive_seed(cfg.seed, mode, "generator"))
    obj = GeneratorKDObjective(student, teacher, mode=mode, runtime=runtime, meta=student_meta(recipe, info),
                               shape=(info.in_channels, info.image_size, info.image_size), params=params,
                               epochs=cfg.epochs, at_pairs=at_pairs)
    _, val_loader, test_loader = make_loaders(recipe, splits, runtime, derive_seed(cfg.seed, "data"))
    ident = {"recipe": recipe.to_dict(), "paradigm": {"name": mode, **params.model_dump()}}
    trainer = Trainer(obj, SyntheticSteps(params.iters), val_loader, test_loader, cfg, out_dir / "student",
                      runtime=runtime, identity=ident, method=mode, progress=progress,
                      info={"recipe": recipe.name, "model": sc.model, "dataset": info.name})
    res = trainer.fit()
    torch.manual_seed(derive_seed(cfg.seed, mode, "samples"))
    grid = sample_grid(obj.samples(64), teacher, info.mean, info.std, out_dir / "samples.png",
                       f"{mode}: {recipe.name}, seed {cfg.seed} (teacher class, confidence)")
    log(f"{mode}: student test {res['test_acc']:.4f}; teacher classes of 64 samples {grid['teacher_classes']}")
    summary = {"paradigm": mode, "student": res, "train_time_s": res["train_time_s"], "samples": grid,
               "extra": {"teacher_confidence_mean": grid["teacher_confidence_mean"]}}
    write_json(out_dir / f"{mode}.json", summary)
    return summary
