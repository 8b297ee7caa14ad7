"""Typed recipe schema. A recipe is a YAML file; unknown keys and bad values fail at load time
with the dotted path of the offending entry.

A recipe may start with ``extends: other.yaml`` (a path relative to the recipe, or a shipped
recipe name such as ``digits/full``); its own keys are then deep-merged over that base.
Shipped recipes live in ``kdlab/recipes`` and are named by their path without ``.yaml``.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key path and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentCfg(_Strict):
    crop_pad: int = Field(0, ge=0)
    flip: bool = False


class DataCfg(_Strict):
    name: str = "digits"  # a registered data set (kdlab.data.DATASETS), checked by _dataset

    @field_validator("name")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from kdlab.data.registry import check_dataset_name

        return check_dataset_name(v)

    data_dir: Optional[str] = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    augment: AugmentCfg = AugmentCfg()


class ModelCfg(_Strict):
    model: str
    kwargs: dict[str, Any] = {}


class TeacherCfg(ModelCfg):
    checkpoint: Optional[str] = None
    recipe: Optional[str] = None


class TrainCfg(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    patience: Optional[int] = Field(7, ge=1)
    seed: int = 0
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    grad_clip: Optional[float] = Field(None, gt=0.0)
    # teacher outputs: "cache-fp16"/"cache-fp32" (paired data; outputs rounded to that precision,
    # reused from a study's teacher cache when one is attached), "live" (fp32, every step) or
    # "consistent" (fresh augmentation per method, teacher live); see docs/speed.md
    teacher_mode: Literal["cache-fp16", "cache-fp32", "live", "consistent"] = "cache-fp16"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "mps") and not v.startswith("cuda"):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return v


class TermCfg(BaseModel):
    """One weighted loss term; its other keys are the term's own parameters."""

    model_config = ConfigDict(extra="allow")
    term: str
    weight: float = 1.0

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MaskCfg(_Strict):
    method: Literal["grad", "ig"] = "grad"
    steps: int = Field(16, ge=1)
    q: float = Field(0.3, gt=0.0, le=1.0)
    kind: Literal["binary", "soft"] = "binary"
    reduce: Literal["abs", "relu"] = "abs"


class StudyCfg(_Strict):
    seeds: list[int] = [0, 1, 2]
    methods: Literal["ladder", "loo", "both"] = "ladder"


class Recipe(_Strict):
    name: str
    description: str = ""
    data: DataCfg = DataCfg()
    student: ModelCfg
    teacher: Optional[TeacherCfg] = None
    train: TrainCfg = TrainCfg()
    loss: list[TermCfg] = [TermCfg(term="ce")]
    mask: Optional[MaskCfg] = None
    study: StudyCfg = StudyCfg()
    source: Optional[str] = Field(None, exclude=True)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude={"source"})

    def with_updates(self, **sections) -> "Recipe":
        d = self.to_dict()
        for k, v in sections.items():
            d[k] = v
        r = Recipe.model_validate(d)
        r.source = self.source
        return r

    def needs_teacher(self) -> bool:
        from kdlab.distill.losses import build_terms

        return any(term.needs_teacher for _, _, term in build_terms(self.loss))


def _fmt_loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_recipe_path(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe path, or the name of a shipped recipe (``digits/full``)."""
    p = Path(ref)
    candidates = []
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to / p)
    candidates.append(p)
    name = str(ref)
    candidates.append(RECIPES_DIR / (name if name.endswith(".yaml") else name + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"recipe '{ref}' not found; give a YAML path or a shipped name (see `kdlab recipes`)"
    )


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (name, student, ...)")
    base_ref = raw.pop("extends", None)
    if base_ref:
        base_path = resolve_recipe_path(base_ref, path.parent)
        # dicts are merged key by key; a list (such as `loss`) replaces the base's whole list
        raw = _deep_merge(_read_yaml(base_path, seen + (path.resolve(),)), raw)
    return raw


def validate_terms(recipe: Recipe, where: str = "recipe") -> None:
    """Check every loss term's name and parameters against the term's constructor."""
    from kdlab.distill.losses import LOSSES

    if not recipe.loss:
        raise RecipeError(f"{where}: loss: at least one term is needed (e.g. '- term: ce')")
    for i, t in enumerate(recipe.loss):
        if t.term not in LOSSES:
            try:
                LOSSES.entry(t.term)
            except KeyError as e:
                raise RecipeError(f"{where}: loss[{i}].term: {e.args[0]}") from None
        cls = LOSSES.get(t.term)
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        allowed = [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]
        for k in t.params:
            if k not in allowed:
                raise RecipeError(
                    f"{where}: loss[{i}].{k}: term '{t.term}' has no parameter '{k}' "
                    f"(parameters: {', '.join(allowed) or 'none'})"
                )
        try:
            cls(**t.params)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{where}: loss[{i}] ({t.term}): {e}") from None
    terms = [LOSSES.get(t.term)(**t.params) for t in recipe.loss]
    if any(t.needs_teacher for t in terms) and recipe.teacher is None:
        raise RecipeError(f"{where}: loss terms {[t.term for t in recipe.loss]} need a 'teacher' section")
    if any(t.needs_masks for t in terms) and recipe.mask is None:
        raise RecipeError(f"{where}: a masked term needs a 'mask' section (e.g. mask: {{method: grad}})")


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _fmt_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{err['loc'][-1]}'"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise RecipeError(f"{where}: {loc}: {msg}{more}") from None
    validate_terms(recipe, where)
    return recipe


def apply_overrides(raw: dict, overrides) -> dict:
    """Set ``dotted.key=value`` overrides (values parsed as YAML) in a raw recipe dict, in place."""
    for ov in overrides or []:
        if "=" not in ov:
            raise RecipeError(f"override '{ov}' must look like key.path=value (e.g. train.epochs=5)")
        key, val = ov.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{ov}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(val)
    return raw


def load_recipe(ref: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe; ``overrides`` are ``dotted.key=value`` strings (YAML values)."""
    path = resolve_recipe_path(ref)
    raw = _read_yaml(path)
    apply_overrides(raw, overrides)
    recipe = recipe_from_dict(raw, str(path))
    recipe.source = str(path)
    if recipe.teacher is not None and recipe.teacher.recipe:
        recipe.teacher.recipe = str(resolve_recipe_path(recipe.teacher.recipe, path.parent))
    return recipe


def list_recipes() -> list[str]:
    """Shipped training recipes (``recipes/paradigms/`` holds paradigm files of another schema)."""
    names = (str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    return sorted(n for n in names if not n.startswith("paradigms/"))
