"""Diffusion recipes: the YAML schema of the diffusion task (validated with pydantic), read by
:mod:`kdlab.core.config`'s one YAML reader.

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

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdlab.core.config import (RecipeError, TrainCfg, apply_overrides, deep_merge, describe_error,
                               drop_new_train_defaults, recipe_ref, resolve_recipe_path)


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
    teacher_epochs: Optional[int] = Field(None, ge=1)  # set by --set train.epochs: bounds the teacher's epochs

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
        drop_new_train_defaults(d["train"])  # TrainCfg keys newer than these runs, at their defaults
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
    bound_teacher_epochs(raw, overrides)
    if raw.get("task") != "diffusion":
        what = f"a {raw['task']!r} recipe" if raw.get("task") else "a classification recipe (it names no task)"
        raise RecipeError(f"{path} is {what}; kdlab diffusion takes recipes with task: diffusion "
                          f"(see `kdlab recipes`)")
    r = diffusion_recipe_from_dict(raw, str(path) + (" with the --set overrides" if overrides else ""))
    r.source = str(path)
    return r


def bound_teacher_epochs(raw: dict, overrides) -> dict:
    """Small settings reach the teacher, as in classification: with ``train.epochs=N`` among the
    overrides (and no ``distill.teacher_epochs`` / ``distill.teacher_checkpoint`` override), the
    teacher that a distill recipe trains on the way (``distill.teacher``) is trained for at most N
    epochs (``distill.teacher_epochs``). ``raw`` is changed in place."""
    keys = {ov.split("=", 1)[0].strip() for ov in overrides or [] if "=" in ov}
    d = raw.get("distill")
    if ("train.epochs" not in keys or {"distill.teacher_epochs", "distill.teacher_checkpoint"} & keys
            or not isinstance(d, dict) or d.get("teacher_checkpoint")):
        return raw
    n = (raw.get("train") or {}).get("epochs") if isinstance(raw.get("train"), dict) else None
    if isinstance(n, int) and not isinstance(n, bool) and n >= 1:  # else the recipe's validation names it
        d["teacher_epochs"] = n
    return raw


def list_diffusion_recipes() -> list[str]:
    from kdlab.core.config import RECIPES_DIR

    return sorted(f"diffusion/{p.stem}" for p in (RECIPES_DIR / "diffusion").glob("*.yaml"))
