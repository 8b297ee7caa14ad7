"""The classification recipe (``kdlab distill``, ``train-teacher``, ``ablate``, studies): its
schema, validation and reader. Unknown keys and bad values fail at load time with the dotted path
of the offending entry; data set names, transfer-set kinds and loss terms (their names and
parameters, checked against each term's constructor) are checked against the registries of
:mod:`kdlab.data` and :mod:`kdlab.distill.losses`, which is why the schema lives here and not in
:mod:`kdlab.core.config`. The recipe-file machinery shared with the other recipe kinds (the YAML
reader, ``extends``, path rules, ``--set`` overrides) and the sections without such knowledge
(``train``, ``student``, ``teacher``, ``loss`` entries, ``mask``, ``study``) are
:mod:`kdlab.core.config`'s.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdlab.core.config import (AugmentCfg, MaskCfg, ModelCfg, RecipeError, Strict, StudyCfg, TeacherCfg,
                               TermCfg, TrainCfg, apply_overrides, check_loss_numbers, describe_error,
                               drop_new_train_defaults, read_recipe_yaml, resolve_recipe_path, resolve_refs)


class TransferSetCfg(BaseModel):
    """One extra transfer set (unlabelled images that join training): ``kind`` is a registered
    transfer-set builder (``folder``, ``factory``, ``munge``, ``deepinv``; see
    :mod:`kdlab.data.transfer`), its other keys the builder's parameters."""

    model_config = ConfigDict(extra="allow")
    kind: str

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from kdlab.data.transfer import check_transfer_kind

        return check_transfer_kind(v)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataCfg(Strict):
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
    # a user's data: an image folder (name: imagefolder) or a factory returning Splits/datasets
    root: Optional[str] = None
    image_size: Optional[list[int]] = None  # [H, W] (imagefolder)
    factory: Optional[str] = None  # "module:function" -> Splits or (train, val, test) datasets
    num_workers: int = Field(0, ge=0)  # decoding processes for streamed data
    # label_fraction < 1: the unlabelled training images are dropped, or join training as the
    # transfer set (label-free terms see them, label terms do not); docs/transfer.md
    unlabelled: Literal["drop", "transfer"] = "drop"
    transfer: list[TransferSetCfg] = []  # extra transfer sets (folder, factory, munge, deepinv)
    # options of the data set's own loader (e.g. mnist-canvas: objects, scale, scenes; coco: ann,
    # max_objects); each key must be a keyword parameter of the registered loader
    kwargs: dict[str, Any] = {}

    def options(self) -> dict:
        """The loader options this section sets beyond the common ones."""
        out = {k: v for k, v in (("root", self.root), ("image_size", self.image_size)) if v is not None}
        return {**out, **self.kwargs}


class Recipe(Strict):
    name: str
    description: str = ""
    task: str = "classification"  # the kdlab.tasks plug-in that runs this recipe
    data: DataCfg = DataCfg()
    student: ModelCfg
    teacher: Optional[TeacherCfg] = None
    train: TrainCfg = TrainCfg()
    loss: list[TermCfg] = [TermCfg(term="ce")]
    mask: Optional[MaskCfg] = None
    study: StudyCfg = StudyCfg()
    source: Optional[str] = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        from kdlab.core.io import check_path_name

        return check_path_name(v, "recipe name")

    def to_dict(self) -> dict:
        """The recipe as plain data (run identities); ``task`` only when not the default, so runs
        made before tasks existed keep their identity."""
        d = self.model_dump(mode="json", exclude={"source"})
        if d.get("task") == "classification":
            del d["task"]
        if isinstance(d.get("teacher"), dict) and not d["teacher"].get("allow_other_dataset"):
            del d["teacher"]["allow_other_dataset"]  # likewise: runs made before it existed
        if not d.get("data", {}).get("kwargs"):  # runs made before data.kwargs keep their identity
            d.get("data", {}).pop("kwargs", None)
        if isinstance(d.get("train"), dict):
            drop_new_train_defaults(d["train"])  # likewise: runs made before those keys existed
        if isinstance(d.get("teacher"), dict) and d["teacher"].get("epochs") is None:
            d["teacher"].pop("epochs", None)  # likewise (set only by --set train.epochs)
        aug = (d.get("data") or {}).get("augment") if isinstance(d.get("data"), dict) else None
        if isinstance(aug, dict) and not aug.get("randaugment"):
            aug.pop("randaugment", None)  # likewise
            aug.pop("magnitude", None)
        return d

    def derive(self, **sections) -> "Recipe":
        """A validated copy with whole top-level sections replaced (``loss=[...]``,
        ``teacher=None``, ``train={...}``; models or plain dicts), keeping ``source``."""
        d = self.to_dict()
        for k, v in sections.items():
            if k not in type(self).model_fields or k == "source":
                raise RecipeError(f"{self.source or self.name}: {k}: unknown recipe section")
            if isinstance(v, BaseModel):
                v = v.model_dump(mode="json")
            elif isinstance(v, list):
                v = [t.model_dump(mode="json") if isinstance(t, BaseModel) else t for t in v]
            d[k] = v
        r = recipe_from_dict(d, self.source or self.name)
        r.source = self.source
        return r

    def with_seed(self, seed: int) -> "Recipe":
        """The same recipe with ``train.seed = seed``."""
        return self.derive(train={**self.train.model_dump(mode="json"), "seed": int(seed)})

    def needs_teacher(self) -> bool:
        from kdlab.distill.losses import build_terms

        return any(term.needs_teacher for _, _, term in build_terms(self.loss))


def param_type_error(default, value) -> str:
    """What kind of value a term parameter with this ``default`` needs, when ``value`` is not of
    that kind ('' when it fits or the default says nothing): numbers for numeric defaults (bools
    excluded), true/false for boolean ones, text for string ones."""
    if value is None or default is inspect.Parameter.empty or default is None:
        return ""
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return "" if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if isinstance(default, float):
        return "" if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return "" if isinstance(value, str) else "a text value"
    return ""


def validate_terms(recipe: Recipe, where: str = "recipe") -> None:
    """Check every loss term's name and parameters against the term's constructor."""
    from kdlab.distill.losses import LOSSES

    if not recipe.loss:
        raise RecipeError(f"{where}: loss: at least one term is needed (e.g. '- term: ce')")
    for i, t in enumerate(recipe.loss):
        if t.term not in LOSSES:
            import difflib

            close = difflib.get_close_matches(t.term, LOSSES.names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RecipeError(f"{where}: loss[{i}].term: unknown loss '{t.term}'{hint} "
                              f"(see `kdlab losses` for the list)")
        cls = LOSSES.get(t.term)
        sig = inspect.signature(cls.__init__)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        allowed = [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]
        for k, v in t.params.items():
            if k not in allowed:
                raise RecipeError(
                    f"{where}: loss[{i}].{k}: term '{t.term}' has no parameter '{k}' "
                    f"(parameters: {', '.join(allowed) or 'none'})"
                )
            bad = param_type_error(sig.parameters[k].default, v)
            if bad:
                raise RecipeError(f"{where}: loss[{i}].{k}: term '{t.term}' needs {bad}, got {v!r}")
        try:
            cls(**t.params)
        except (TypeError, ValueError, KeyError) as e:
            raise RecipeError(f"{where}: loss[{i}] ({t.term}): {e}") from None
    check_loss_numbers(recipe.loss, where)
    terms = [LOSSES.get(t.term)(**t.params) for t in recipe.loss]
    if any(t.needs_teacher for t in terms) and recipe.teacher is None:
        raise RecipeError(f"{where}: loss terms {[t.term for t in recipe.loss]} need a 'teacher' section")
    if any(t.needs_masks for t in terms) and recipe.mask is None:
        raise RecipeError(f"{where}: a masked term needs a 'mask' section (e.g. mask: {{method: grad}})")


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise RecipeError(f"{where}: {describe_error(e)}{more}") from None
    validate_terms(recipe, where)
    return recipe


def bound_teacher(raw: dict, overrides) -> dict:
    """Small settings reach the teacher: with ``train.epochs=N`` among the overrides (and no
    ``teacher.epochs`` / ``teacher.checkpoint`` override), a teacher that is trained on the way
    (``teacher.recipe`` with more than N epochs) is trained for N epochs into its own folder,
    ``<checkpoint folder>-e<N>/``, so the full teacher's checkpoint is never replaced by a short one.
    ``raw`` is changed in place (references already resolved)."""
    keys = {ov.split("=", 1)[0].strip(): ov.split("=", 1)[1] for ov in overrides or [] if "=" in ov}
    tc = raw.get("teacher")
    if ("train.epochs" not in keys or "teacher.epochs" in keys or "teacher.checkpoint" in keys
            or not isinstance(tc, dict) or not tc.get("recipe") or not tc.get("checkpoint")):
        return raw
    n = (raw.get("train") or {}).get("epochs")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return raw  # the recipe's validation names the bad value
    t_raw = read_recipe_yaml(resolve_recipe_path(tc["recipe"]))
    t_epochs = (t_raw.get("train") or {}).get("epochs", TrainCfg.model_fields["epochs"].default)
    if isinstance(t_epochs, int) and t_epochs > n:
        ck = Path(tc["checkpoint"])
        tc["epochs"] = n
        tc["checkpoint"] = str(ck.parent.with_name(f"{ck.parent.name}-e{n}") / ck.name)
    return raw


def load_recipe(ref: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe; ``overrides`` are ``dotted.key=value`` strings (YAML values);
    ``train.epochs=N`` also bounds the teacher trained on the way (:func:`bound_teacher`)."""
    path = resolve_recipe_path(ref)
    raw = read_recipe_yaml(path)
    apply_overrides(raw, overrides)
    resolve_refs(raw, None, "--set")  # overridden references: relative to the current folder
    bound_teacher(raw, overrides)
    recipe = recipe_from_dict(raw, str(path) + (" with the --set overrides" if overrides else ""))
    recipe.source = str(path)
    return recipe
