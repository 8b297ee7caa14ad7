"""Diffusion recipes and runs: a teacher (DDPM training of a UNet-lite denoiser) or one round of
progressive distillation, each one :class:`kdlab.train.trainer.Trainer` run, scored after training
by sampling and :mod:`kdlab.evaluate.generative` (FD, class coverage, k-NN precision / recall).

Recipe (YAML, ``task: diffusion``; shipped ones are ``diffusion/<name>``)::

    name: diffusion-digits-teacher
    task: diffusion
    data: {name: digits, val_fraction: 0.1}
    model: {channels: 32, channel_mults: [1, 2], blocks: 1}
    schedule: {logsnr_min: -20, logsnr_max: 20}       # cosine log-SNR
    prediction: v                                      # v | x | eps
    weighting: snr_trunc                               # max(x-MSE, eps-MSE) | x | eps | v
    train: {epochs: 40, batch_size: 128, optimizer: adamw, lr: 2e-3, schedule: cosine, patience: null}
    steps_per_epoch: 25                                # batches per epoch (data redrawn every epoch)
    sampler: {steps: 64, clip_x: true}                 # the teacher's DDIM sampler when scored
    eval: {samples: 1000, knn_k: 3, features: {recipe: digits/teacher, checkpoint: runs/digits-teacher/best.pt}}
    distill: null                                      # or the progressive chain:
    # distill: {teacher: diffusion/digits_teacher, start_steps: 64, end_steps: 1}

A distill recipe's ``train`` section is the training of *each* round.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdlab.core.config import (RecipeError, TrainCfg, apply_overrides, deep_merge, describe_error,
                               recipe_ref, resolve_recipe_path)

DEFAULT_TRAIN = {"epochs": 40, "batch_size": 128, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.0,
                 "schedule": "cosine", "patience": None, "eval_batch_size": 500}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataCfg(_Strict):
    name: str = "digits"
    data_dir: Optional[str] = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)


class UNetCfg(_Strict):
    backend: Literal["unet_lite", "diffusers"] = "unet_lite"   # diffusers: its UNet2DModel (optional extra)
    channels: int = Field(32, ge=4)
    channel_mults: list[int] = Field([1, 2], min_length=1)
    blocks: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    diffusers: dict[str, Any] = {}                             # extra UNet2DModel config keys


class ScheduleCfg(_Strict):
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0

    @model_validator(mode="after")
    def _range(self):
        from kdlab.distill.diffusion import LogSNRSchedule

        try:
            LogSNRSchedule(self.logsnr_min, self.logsnr_max)
        except ValueError as e:  # one line when the range is empty (the key path is said by the caller)
            raise ValueError(str(e).removeprefix("schedule: ")) from None
        return self


class SamplerCfg(_Strict):
    steps: int = Field(64, ge=1)
    clip_x: bool = True
    eta: float = Field(0.0, ge=0.0, le=1.0)


class FeaturesCfg(_Strict):
    recipe: str = "digits/teacher"                  # trains the classifier when the checkpoint is missing
    checkpoint: str = "runs/digits-teacher/best.pt"


class EvalCfg(_Strict):
    samples: int = Field(1000, ge=10)
    knn_k: int = Field(3, ge=1)
    batch: int = Field(500, ge=1)
    features: FeaturesCfg = FeaturesCfg()


def _power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


class DistillCfg(_Strict):
    teacher: str                                    # the teacher's diffusion recipe (trained per seed)
    teacher_checkpoint: Optional[str] = None        # a trained teacher instead (same for every seed)
    start_steps: int = Field(64, ge=2)              # the teacher's DDIM step count
    end_steps: int = Field(1, ge=1)                 # the last student's step count

    @field_validator("start_steps", "end_steps")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if not _power_of_two(v):
            lo = 1 << (v.bit_length() - 1)
            raise ValueError(f"{v} is not a power of two; progressive distillation halves the step count each "
                             f"round, so use a power of two such as {lo} or {lo * 2}")
        return v

    @model_validator(mode="after")
    def _order(self):
        if self.end_steps >= self.start_steps:
            raise ValueError(f"end_steps {self.end_steps} must be below start_steps {self.start_steps} "
                             f"(each round halves the steps: {self.start_steps} -> {self.start_steps // 2} -> ...)")
        return self

    def rounds(self) -> list[int]:
        """The students' step counts, round by round: start/2, start/4, ..., end."""
        out, n = [], self.start_steps
        while n > self.end_steps:
            n //= 2
            out.append(n)
        return out


class StudyCfg(_Strict):
    seeds: list[int] = Field([0, 1, 2], min_length=1)


class DiffusionRecipe(_Strict):
    name: str
    description: str = ""
    task: Literal["diffusion"] = "diffusion"
    data: DataCfg = DataCfg()
    model: UNetCfg = UNetCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    prediction: Literal["v", "x", "eps"] = "v"
    weighting: Literal["snr_trunc", "x", "eps", "v"] = "snr_trunc"
    train: TrainCfg = TrainCfg(**DEFAULT_TRAIN)
    steps_per_epoch: int = Field(25, ge=1)
    sampler: SamplerCfg = SamplerCfg()
    eval: EvalCfg = EvalCfg()
    distill: Optional[DistillCfg] = None
    study: StudyCfg = StudyCfg()
    source: Optional[str] = Field(None, exclude=True)

    def to_dict(self) -> dict:
        """The recipe as plain data (run identities); the default backend's keys left out, so runs
        made before the diffusers backend existed keep their identity."""
        d = self.model_dump(mode="json", exclude={"source"})
        if d["model"].get("backend") == "unet_lite" and not d["model"].get("diffusers"):
            d["model"].pop("backend", None)
            d["model"].pop("diffusers", None)
        return d

    def with_seed(self, seed: int) -> "DiffusionRecipe":
        d = self.to_dict()
        d["train"]["seed"] = int(seed)
        r = diffusion_recipe_from_dict(d, self.source or self.name)
        r.source = self.source
        return r

    def derive(self, **sections) -> "DiffusionRecipe":
        d = self.to_dict()
        for k, v in sections.items():
            if k not in type(self).model_fields or k == "source":
                raise RecipeError(f"{self.source or self.name}: {k}: unknown recipe section")
            d[k] = v.model_dump(mode="json") if isinstance(v, BaseModel) else v
        r = diffusion_recipe_from_dict(d, self.source or self.name)
        r.source = self.source
        return r


def diffusion_recipe_from_dict(raw: dict, where: str = "recipe") -> DiffusionRecipe:
    raw = dict(raw)
    if isinstance(raw.get("train"), dict):
        raw["train"] = {**DEFAULT_TRAIN, **raw["train"]}
    try:
        return DiffusionRecipe.model_validate(raw)
    except ValidationError as e:
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise RecipeError(f"{where}: {describe_error(e)}{more}") from None


def _read(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle")
    from kdlab.core.config import read_yaml_mapping

    raw = read_yaml_mapping(path, "a diffusion recipe must be a mapping (name, data, model, ...)")
    base = raw.pop("extends", None)
    d = raw.get("distill")
    if isinstance(d, dict) and isinstance(d.get("teacher"), str):
        try:
            d["teacher"] = recipe_ref(resolve_recipe_path(d["teacher"], path.parent))
        except (FileNotFoundError, RecipeError) as e:
            raise RecipeError(f"{path}: distill.teacher: {e}") from None
    if base:
        raw = deep_merge(_read(resolve_recipe_path(base, path.parent), seen + (path.resolve(),)), raw)
    return raw


def load_diffusion_recipe(ref, overrides: Optional[list[str]] = None) -> DiffusionRecipe:
    """A diffusion recipe by path or shipped name (``diffusion/digits_teacher``), with
    ``key=value`` overrides; bad entries fail with one line naming the key and the fix."""
    path = resolve_recipe_path(ref)
    raw = _read(path)
    apply_overrides(raw, overrides)
    if raw.get("task", "diffusion") != "diffusion":
        raise RecipeError(f"{path}: task is {raw.get('task')!r}; a diffusion recipe says task: diffusion")
    r = diffusion_recipe_from_dict(raw, str(path) + (" with the --set overrides" if overrides else ""))
    r.source = str(path)
    return r


def list_diffusion_recipes() -> list[str]:
    from kdlab.core.config import RECIPES_DIR

    return sorted(f"diffusion/{p.stem}" for p in (RECIPES_DIR / "diffusion").glob("*.yaml"))


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
        from kdlab.core.config import load_recipe
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
    from kdlab.distill.diffusion import DiffusionObjective
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
