"""Diffusion runs: a teacher (DDPM training of a UNet-lite denoiser) or one round of progressive
distillation, each one :class:`kdlab.train.trainer.Trainer` run with :class:`DiffusionObjective`, scored
after training by sampling and :mod:`kdlab.evaluate.generative` (FD, class coverage, k-NN precision /
recall); the chain of rounds (:func:`run_chain`). Recipes: :mod:`kdlab.tasks.diffusion_recipe`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from kdlab.core.io import write_json
from kdlab.distill.diffusion import (Denoiser, LogSNRSchedule, check_steps, eps_from_x, per_sample, two_step_target,
                                     v_from_x_eps, weighted_mse)
from kdlab.tasks.diffusion_recipe import DiffusionRecipe, load_diffusion_recipe
from kdlab.train.objective import Objective


# --------------------------------------------------------------------------------------------- data
class RandomBatches:
    """``steps`` batches per epoch drawn from shuffled passes over ``x`` (a pure function of
    ``(seed, epoch)``): ``epoch(e)`` yields ``(x, y, idx)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int):
        self.x, self.y = x, y
        self.batch_size, self.steps, self.seed = int(batch_size), int(steps), int(seed)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, e: int):
        from kdlab.core.seeding import derive_seed

        g = torch.Generator().manual_seed(derive_seed(self.seed, "loader", e))
        n, need = self.x.shape[0], self.steps * self.batch_size
        idx = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need]
        for k in range(self.steps):
            b = idx[k * self.batch_size:(k + 1) * self.batch_size].to(self.x.device)
            yield self.x[b], self.y[b], b


class InOrder:
    """The whole split in order, in batches (validation and test)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, int(batch_size)

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)

    def epoch(self, e: int = 0):
        for k in range(len(self)):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            yield self.x[sl], self.y[sl], torch.arange(self.x.shape[0])[sl]


def load_data(recipe: DiffusionRecipe, seed: Optional[int] = None):
    """The recipe's splits (``x`` in [0, 1]); the validation split is seeded by ``train.seed``."""
    from kdlab.data import load_dataset

    d = recipe.data
    return load_dataset(d.name, d.data_dir, val_fraction=d.val_fraction, label_fraction=1.0,
                        seed=recipe.train.seed if seed is None else seed)


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2.0 - 1.0


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


# -------------------------------------------------------------------------------------- models
def net_kwargs(recipe: DiffusionRecipe, image_size: int) -> dict:
    """The denoiser's constructor arguments (also its checkpoint's ``model_kwargs``)."""
    m = recipe.model
    kw = {"channels": m.channels, "channel_mults": list(m.channel_mults), "blocks": m.blocks, "dropout": m.dropout}
    if m.backend == "diffusers":
        kw.update(sample_size=int(image_size), config=dict(m.diffusers))
    return kw


def make_net(backend: str, in_channels: int, kwargs: dict):
    kw = dict(kwargs)
    kw["channel_mults"] = tuple(kw.get("channel_mults", (1, 2)))
    if backend == "diffusers":
        from kdlab.models.diffusers_unet import DiffusersUNet

        return DiffusersUNet(in_channels=in_channels, **kw)
    from kdlab.models.unet_lite import build_unet_lite

    return build_unet_lite(in_channels, **kw)


def build_net(recipe: DiffusionRecipe, in_channels: int, image_size: int = 8):
    return make_net(recipe.model.backend, in_channels, net_kwargs(recipe, image_size))


def schedule_of(recipe: DiffusionRecipe):
    from kdlab.distill.diffusion import LogSNRSchedule

    return LogSNRSchedule(recipe.schedule.logsnr_min, recipe.schedule.logsnr_max)


def load_denoiser(path, device="cpu"):
    """``(Denoiser, checkpoint)`` of a diffusion model file written by :func:`train_run`."""
    from kdlab.core.checkpoint import load_checkpoint
    from kdlab.distill.diffusion import Denoiser, LogSNRSchedule

    ck = load_checkpoint(path, fix="delete it and re-run the diffusion run that wrote it")
    info = ck.get("diffusion")
    if ck.get("model_name") not in ("unet_lite", "diffusers") or not isinstance(info, dict):
        raise ValueError(f"{path} is not a diffusion model file (a kdlab diffusion run's best.pt)")
    net = make_net(ck["model_name"], ck["in_channels"], ck["model_kwargs"]).to(device)
    net.load_state_dict(ck["model"])
    net.eval()
    sch = LogSNRSchedule(info["logsnr_min"], info["logsnr_max"])
    return Denoiser(net, sch, info["prediction"]), ck


def _meta(recipe: DiffusionRecipe, info, steps: Optional[int]) -> dict:
    return {"model_name": recipe.model.backend, "model_kwargs": net_kwargs(recipe, info.hw[0]),
            "num_classes": 0,
            "in_channels": info.in_channels, "dataset": info.name,
            "diffusion": {"logsnr_min": recipe.schedule.logsnr_min, "logsnr_max": recipe.schedule.logsnr_max,
                          "prediction": recipe.prediction, "steps": steps}}


# ------------------------------------------------------------------------------------- scoring
def ensure_feature_net(recipe: DiffusionRecipe, info, *, progress: bool = False, log=print):
    """The scoring classifier of the recipe's data set, trained first (``eval.features.recipe``)
    when its checkpoint is missing."""
    from kdlab.evaluate.generative import FeatureNet

    fc = recipe.eval.features
    ck = Path(fc.checkpoint)
    unfinished = (ck.parent / "last.pt").is_file() and not (ck.parent / "result.json").is_file()
    if not ck.is_file() or unfinished:
        from kdlab.train.recipe import load_recipe
        from kdlab.train.build import train

        r = load_recipe(fc.recipe)
        why = "its run is unfinished" if ck.is_file() else f"{ck} is missing"
        log(f"training the feature network {r.name} into {ck.parent.resolve()}, because {why}")
        train(r, ck.parent, progress=progress, method="teacher")
    return FeatureNet(ck, info.name, info.mean, info.std, name=f"{fc.recipe} ({load_model_name(ck)})")


def check_feature_net(recipe: DiffusionRecipe, dataset: str) -> None:
    """Refuse, before anything is trained, a feature network trained on another data set."""
    from kdlab.core.checkpoint import load_checkpoint

    ck = Path(recipe.eval.features.checkpoint)
    if ck.is_file():
        trained_on = load_checkpoint(ck).get("dataset")
        if trained_on != dataset:
            raise ValueError(f"feature network {ck} was trained on {trained_on!r}, not {dataset!r}; give a "
                             f"{dataset} classifier (e.g. `kdlab train-teacher {dataset}/teacher`) as "
                             f"eval.features.checkpoint")


def load_model_name(path) -> str:
    from kdlab.core.checkpoint import load_checkpoint

    return str(load_checkpoint(path).get("model_name"))


def sample_noise(n: int, shape, seed: int) -> torch.Tensor:
    """The fixed starting noise of a run's samples (same for every sampler of the seed: paired)."""
    from kdlab.core.seeding import derive_seed

    g = torch.Generator().manual_seed(derive_seed(seed, "diffusion-samples"))
    return torch.randn((n, *shape), generator=g)


@torch.no_grad()
def generate(denoiser, noise: torch.Tensor, steps: int, *, clip: bool = True, eta: float = 0.0, batch: int = 500,
             seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] from ``noise`` with the ``steps``-step DDIM sampler."""
    from kdlab.distill.diffusion import ddim_sample

    dev = next(denoiser.net.parameters()).device
    g = torch.Generator().manual_seed(seed) if eta else None
    out = [ddim_sample(denoiser, noise[i:i + batch].to(dev), steps, clip=clip, eta=eta, generator=g).cpu()
           for i in range(0, noise.shape[0], batch)]
    return to_image_range(torch.cat(out))


def score(denoiser, steps: int, recipe: DiffusionRecipe, fnet, real01: torch.Tensor, *, seed: int,
          real_feats=None) -> dict:
    """FD, coverage, precision and recall of ``eval.samples`` images from the ``steps``-step sampler."""
    from kdlab.evaluate.generative import score_samples

    noise = sample_noise(recipe.eval.samples, tuple(real01.shape[1:]), seed)
    fake = generate(denoiser, noise, steps, clip=recipe.sampler.clip_x, eta=recipe.sampler.eta,
                    batch=recipe.eval.batch, seed=seed)
    return score_samples(fnet, fake, real01, k=recipe.eval.knn_k, real_feats=real_feats)


@torch.no_grad()
def time_sampler(denoiser, steps: int, shape, *, batch: int = 100, repeats: int = 3) -> float:
    """Seconds per image of the ``steps``-step sampler (best of ``repeats`` runs over ``batch``
    images, after one warm-up run). Meaningful only on an idle machine."""
    from kdlab.distill.diffusion import ddim_sample

    dev = next(denoiser.net.parameters()).device
    z = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(dev)
    ddim_sample(denoiser, z, steps)
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddim_sample(denoiser, z, steps)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best / batch


# ----------------------------------------------------------------------------------------- runs
def train_run(recipe: DiffusionRecipe, run_dir, *, teacher_checkpoint=None, steps: Optional[int] = None,
              init_checkpoint=None, method: str = "", progress: bool = True, resume: bool = True,
              log=print) -> dict:
    """One Trainer run into ``run_dir``: the teacher (``teacher_checkpoint=None``: DDPM training)
    or a progressive-distillation round (a student of ``steps`` steps distilled from the frozen
    ``teacher_checkpoint``, initialised from ``init_checkpoint``). After training the best model is
    scored with its sampler (``sampler.steps`` for a teacher, ``steps`` for a student) on the
    validation and test splits; the result (``result.json``) gets ``val_fd``, ``test_fd``,
    ``test_coverage``, ``test_precision``, ``test_recall``, ... and the feature network's hash."""
    from kdlab.core.checkpoint import file_hash
    from kdlab.core.io import write_json
    from kdlab.train.runtime import Runtime
    from kdlab.train.trainer import Trainer

    run_dir = Path(run_dir)
    cfg = recipe.train
    splits = load_data(recipe)
    info = splits.info
    check_feature_net(recipe, info.name)
    runtime = Runtime.from_cfg(cfg)
    dev = runtime.device
    teacher = None
    identity = recipe.to_dict()
    meta = _meta(recipe, info, recipe.sampler.steps)
    if teacher_checkpoint is not None:
        from kdlab.distill.diffusion import check_steps

        steps = check_steps(steps, "student steps")
        teacher, tck = load_denoiser(teacher_checkpoint, device=dev)
        for p in teacher.net.parameters():
            p.requires_grad_(False)
        ti = tck["diffusion"]
        if (ti["logsnr_min"], ti["logsnr_max"], ti["prediction"]) != (
                recipe.schedule.logsnr_min, recipe.schedule.logsnr_max, recipe.prediction):
            raise ValueError(f"the teacher {teacher_checkpoint} was trained with log-SNR range [{ti['logsnr_min']:g}, "
                             f"{ti['logsnr_max']:g}] and {ti['prediction']}-prediction; give the distill recipe the "
                             f"same schedule and prediction")
        identity["round"] = {"steps": steps, "teacher_checkpoint": str(teacher_checkpoint),
                             "teacher_sha256": file_hash(teacher_checkpoint),
                             "init_checkpoint": str(init_checkpoint or teacher_checkpoint)}
        # the student starts as its teacher: the same architecture (whatever the recipe's model
        # section says) and the same weights
        start, src = load_denoiser(init_checkpoint or teacher_checkpoint, device=dev)
        net = start.net.train()
        meta = {**_meta(recipe, info, steps), "model_name": src["model_name"], "model_kwargs": src["model_kwargs"]}
        eval_steps = steps
    else:
        net = build_net(recipe, info.in_channels, info.hw[0]).to(dev)
        eval_steps = recipe.sampler.steps
    objective = DiffusionObjective(net, schedule_of(recipe), runtime=runtime, prediction=recipe.prediction,
                                   weighting=recipe.weighting, teacher=teacher, steps=steps, meta=meta)
    xtr = to_model_range(splits.train.x).to(dev)
    train_loader = RandomBatches(xtr, splits.train.y.to(dev), cfg.batch_size, recipe.steps_per_epoch, cfg.seed)
    val_loader = InOrder(to_model_range(splits.val.x).to(dev), splits.val.y.to(dev), cfg.eval_batch_size)
    test_loader = InOrder(to_model_range(splits.test.x).to(dev), splits.test.y.to(dev), cfg.eval_batch_size)
    trainer = Trainer(objective, train_loader, val_loader, test_loader, cfg, run_dir, runtime=runtime,
                      identity=identity, method=method or ("teacher" if teacher is None else f"distill-{steps}"),
                      progress=progress, info={"model": meta["model_name"], "dataset": info.name, "sample_unit": "images",
                                               "steps": eval_steps, "task": "diffusion"})
    result = trainer.fit(resume=resume)
    if result.get("interrupted") or "test_fd" in result:
        return result
    fnet = ensure_feature_net(recipe, info, progress=progress, log=log)
    den, _ = load_denoiser(run_dir / "best.pt", device=dev)
    for split, tset in (("val", splits.val), ("test", splits.test)):
        s = score(den, eval_steps, recipe, fnet, tset.x, seed=cfg.seed)
        for k in ("fd", "coverage", "precision", "recall"):
            result[f"{split}_{k}"] = s[k]
        result[f"n_{split}_samples"] = s["n_fake"]
    result.update(fnet.describe())
    write_json(run_dir / "result.json", result)
    return result


def real_images(recipe: DiffusionRecipe, split: str = "test") -> torch.Tensor:
    return getattr(load_data(recipe), split).x


def stats_line(values) -> tuple[float, float]:
    v = np.asarray(list(values), np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# the chain of progressive-distillation rounds (one run of the task: each round a Trainer run)

def teacher_recipe(recipe: DiffusionRecipe) -> DiffusionRecipe:
    """The distill recipe's teacher recipe, at the distill recipe's seed (and at most
    ``distill.teacher_epochs`` epochs: ``--set train.epochs=N`` bounds the teacher too)."""
    t = load_diffusion_recipe(recipe.distill.teacher).with_seed(recipe.train.seed)
    n = recipe.distill.teacher_epochs
    if n is not None and t.train.epochs > n:
        t = t.derive(train={**t.train.model_dump(mode="json"), "epochs": n})
    return t


def check_chain(recipe: DiffusionRecipe) -> None:
    if recipe.distill is None:
        raise ValueError(f"{recipe.source or recipe.name} has no distill section; progressive distillation "
                         f"needs distill: {{teacher: <teacher recipe>, start_steps: 64, end_steps: 1}}")
    check_feature_net(recipe, recipe.data.name)
    if recipe.distill.teacher_checkpoint is None:
        t = teacher_recipe(recipe)
        if t.data.name != recipe.data.name:
            raise ValueError(f"the teacher recipe {recipe.distill.teacher} trains on {t.data.name} but this recipe "
                             f"distils on {recipe.data.name}; give a teacher recipe of the same data set")
        if t.sampler.steps != recipe.distill.start_steps:
            raise ValueError(f"the teacher recipe {recipe.distill.teacher} samples with {t.sampler.steps} steps but "
                             f"distill.start_steps is {recipe.distill.start_steps}; make them equal")


def run_chain(recipe: DiffusionRecipe, out_dir, *, progress: bool = True, resume: bool = True, log=print) -> dict:
    """Train the teacher (when the recipe names a teacher recipe) and every round into ``out_dir``;
    returns the summary (``student``: the last round's result, ``rounds``, ``teacher``,
    ``train_time_s``: the whole chain's training time)."""
    check_chain(recipe)
    out = Path(out_dir)
    d = recipe.distill
    res_t = None
    if d.teacher_checkpoint:
        prev = Path(d.teacher_checkpoint)
        if not prev.is_file():
            raise FileNotFoundError(f"distill.teacher_checkpoint {prev} not found; train the teacher first "
                                    f"(`kdlab diffusion train {d.teacher}`) or leave it out")
    else:
        tr = teacher_recipe(recipe)
        res_t = train_run(tr, out / "teacher", method="teacher", progress=progress, resume=resume, log=log)
        log(f"teacher ({tr.sampler.steps} steps): test FD {res_t['test_fd']:.3f}  [{out / 'teacher'}]")
        prev = out / "teacher" / "best.pt"
    teacher_path = prev
    rounds = []
    for n in d.rounds():
        rd = out / f"steps{n:03d}"
        res = train_run(recipe, rd, teacher_checkpoint=prev, steps=n, init_checkpoint=prev,
                        method=f"distill-{n}", progress=progress, resume=resume, log=log)
        log(f"round {2 * n} -> {n} steps: test FD {res['test_fd']:.3f}  [{rd}]")
        rounds.append({"steps": n, "run_dir": str(rd), "result": res})
        prev = rd / "best.pt"
    total = sum(r["result"]["train_time_s"] for r in rounds) + (res_t["train_time_s"] if res_t else 0.0)
    summary = {"paradigm": "progressive", "seed": recipe.train.seed, "teacher_checkpoint": str(teacher_path),
               "teacher": res_t, "rounds": rounds, "student": rounds[-1]["result"], "train_time_s": total}
    write_json(out / "chain.json", summary)
    return summary


class DiffusionObjective(Objective):
    """The Trainer's objective for a diffusion model: DDPM training in continuous time
    (``teacher=None``: the target is the data ``x`` and its noise ``ε``) or one round of progressive
    distillation (``teacher`` a frozen :class:`Denoiser`, ``steps`` the student's step count: the
    target is :func:`two_step_target`). Loss: :func:`weighted_mse` (default truncated SNR).

    Batches are ``(x, y, idx)`` with ``x`` in [−1, 1]. Validation: the same loss on the split with
    fixed draws (times and noise from ``torch.Generator().manual_seed(eval_seed)``), so epochs are
    compared on identical problems; ``monitor = ("loss", "min")``.
    """

    monitor = ("loss", "min")

    def __init__(self, model: nn.Module, schedule: LogSNRSchedule, *, runtime, prediction: str = "v",
                 weighting: str = "snr_trunc", teacher: Optional[Denoiser] = None, steps: Optional[int] = None,
                 meta: Optional[dict] = None, conditional: bool = False, eval_seed: int = 0):
        self.model = model
        self.schedule = schedule
        self.runtime = runtime
        self.denoiser = Denoiser(model, schedule, prediction)
        if weighting not in ("snr_trunc", "x", "eps", "v"):
            raise ValueError(f"loss weighting must be snr_trunc, x, eps or v, not {weighting!r}")
        self.weighting = weighting
        self.teacher = teacher
        if teacher is not None:
            self.steps = check_steps(steps, "student steps")
        else:
            self.steps = None
        self.meta = dict(meta or {})
        self.conditional = conditional
        self.eval_seed = int(eval_seed)
        self.teacher_time_s = 0.0

    def models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def parameters(self):
        return list(self.model.parameters())

    def checkpoint_meta(self, name: str) -> dict:
        return dict(self.meta)

    def loss(self, x: torch.Tensor, y, u_or_i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example losses for draws ``u`` (teacher runs: times in (0, 1]) or ``i`` (step indices)."""
        import time

        yy = y if self.conditional else None
        if self.teacher is None:
            u = u_or_i
        else:
            u = (u_or_i.to(x.dtype) + 1) / self.steps
        _, a, s = self.schedule.alpha_sigma(u)
        z = per_sample(a, x) * x + per_sample(s, x) * eps
        if self.teacher is None:
            x_tgt, eps_tgt = x, eps
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                x_tgt = two_step_target(self.teacher, z, u_or_i, self.steps, y=yy)
            eps_tgt = eps_from_x(z, x_tgt, a, s)
            self.teacher_time_s += time.perf_counter() - t0
        with self.runtime.autocast():
            x_pred, eps_pred = self.denoiser.x_eps(z, u, y=yy)
        x_pred, eps_pred = x_pred.float(), eps_pred.float()
        if self.weighting == "v":
            dims = tuple(range(1, x.dim()))
            return (v_from_x_eps(x_pred, eps_pred, a, s) - v_from_x_eps(x_tgt, eps_tgt, a, s)).pow(2).mean(dims)
        return weighted_mse(x_pred, x_tgt, eps_pred, eps_tgt, self.weighting)

    def draw(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        if self.teacher is None:
            # u in (0, 1]: 1 − U[0, 1)
            return 1.0 - torch.rand(n, generator=generator).to(device)
        return torch.randint(0, self.steps, (n,), generator=generator).to(device)

    def step(self, batch, ctx):
        x, y, _ = batch
        draws = self.draw(x.shape[0], device=x.device)
        eps = torch.randn_like(x)
        per = self.loss(x, y, draws, eps)
        loss = per.mean()
        return loss, {"loss": loss.detach(), "n": x.shape[0]}

    @torch.no_grad()
    def evaluate(self, name: str, loader) -> dict[str, float]:
        model = self.models()[name]
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.eval_seed)
        total, n = 0.0, 0
        for x, y, _ in loader.epoch(0):
            draws = self.draw(x.shape[0], generator=g, device=x.device)
            eps = torch.randn(x.shape, generator=g).to(x.device)
            total += float(self.loss(x, y, draws, eps).sum())
            n += x.shape[0]
        model.train(was)
        return {"loss": total / max(n, 1), "n": n}
