"""Paradigm recipes: a YAML file with a ``paradigm`` section (the schedule and its settings) and a
``recipe`` (a normal kdlab recipe: a path / shipped name, or an inline mapping that may
``extends:`` one). Shipped ones live in ``recipes/paradigms/<dataset>/<name>.yaml``::

    description: "digits paradigms: Born-Again Networks, 2 generations"
    paradigm: {name: ban, generations: 2}
    recipe:
      extends: ../../methods/digits/kd.yaml
      name: digits-paradigm-ban

Unknown keys fail with their path (``<file>: paradigm.generatons: unknown key ...``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import ValidationError

from kdlab.core.config import (RECIPES_DIR, RecipeError, apply_overrides, describe_error, merge_base,
                               read_recipe_yaml, read_yaml_mapping, resolve_recipe_path)
from kdlab.experiments.paradigms.base import PARADIGMS, ParadigmParams
from kdlab.train.recipe import Recipe, bound_teacher, recipe_from_dict

TOP_KEYS = ("paradigm", "recipe", "description")
PARADIGMS_DIR = RECIPES_DIR / "paradigms"


@dataclass
class ParadigmSpec:
    name: str                       # a registered paradigm (dml | ban | ta | self | deepinv | ...)
    params: Any                     # its validated settings (a ParadigmParams model)
    recipe: Recipe
    source: str = ""
    description: str = ""


def is_paradigm_file(ref) -> bool:
    """True when ``ref`` names a YAML file whose top level has a ``paradigm`` section."""
    try:
        return "paradigm" in read_yaml_mapping(resolve_recipe_path(ref))
    except (FileNotFoundError, RecipeError):
        return False


def paradigm_kind(ref) -> str:
    """The ``paradigm.name`` of a paradigm recipe file (unvalidated)."""
    raw = read_yaml_mapping(resolve_recipe_path(ref), PARADIGM_SHAPE)
    return str((raw.get("paradigm") or {}).get("name"))


def check_params(name: str, params: dict, where: str = "paradigm") -> ParadigmParams:
    """``params`` validated against the paradigm's settings model, with the defaults filled in."""
    if name not in PARADIGMS:
        raise RecipeError(f"{where}.name: unknown paradigm '{name}' (one of: {', '.join(PARADIGMS.names())})")
    cls = PARADIGMS.entry(name).meta["params"]
    try:
        return cls.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            key = ".".join(str(p) for p in err["loc"])
            raise RecipeError(f"{where}.{key}: unknown key '{key}' for paradigm '{name}' "
                              f"(settings: {', '.join(cls.model_fields)})") from None
        raise RecipeError(f"{where}.{describe_error(e)}") from None


PARADIGM_SHAPE = "a paradigm recipe is a mapping with 'paradigm' and 'recipe'"


def load_paradigm(ref, overrides: Optional[list[str]] = None) -> ParadigmSpec:
    """Load and validate a paradigm recipe; ``overrides`` (``key.path=value``) apply to its recipe,
    except ``paradigm.<setting>=value``, which sets one of the paradigm's settings."""
    path = resolve_recipe_path(ref)
    where = str(path)
    raw = read_yaml_mapping(path, PARADIGM_SHAPE)
    for k in raw:
        if k not in TOP_KEYS:
            raise RecipeError(f"{where}: {k}: unknown key '{k}' (a paradigm recipe has: {', '.join(TOP_KEYS)})")
    for k in ("paradigm", "recipe"):
        if k not in raw:
            raise RecipeError(f"{where}: {k}: required key is missing")
    par = raw["paradigm"]
    if not isinstance(par, dict) or "name" not in par:
        raise RecipeError(f"{where}: paradigm.name: required key is missing (one of: {', '.join(PARADIGMS.names())})")
    par = dict(par)
    name = par.pop("name")
    rec_ov = []
    for ov in overrides or []:  # `paradigm.<setting>=value` sets the paradigm, the rest its recipe
        if ov.startswith("paradigm.") and "=" in ov:
            holder = {"paradigm": par}
            apply_overrides(holder, [ov])
        else:
            rec_ov.append(ov)
    params = check_params(name, par, f"{where}: paradigm")
    rec = raw["recipe"]
    if isinstance(rec, str):
        rpath = resolve_recipe_path(rec, path.parent)
        rraw, base = read_recipe_yaml(rpath), rpath
    elif isinstance(rec, dict):
        rraw, base = merge_base(copy.deepcopy(rec), path.parent, f"{where}: recipe"), path
    else:
        raise RecipeError(f"{where}: recipe: expected a recipe name/path or a mapping, got {rec!r}")
    apply_overrides(rraw, rec_ov)
    bound_teacher(rraw, rec_ov)
    recipe = recipe_from_dict(rraw, f"{where}: recipe")
    recipe.source = str(path)
    if recipe.teacher is not None and recipe.teacher.recipe:
        recipe.teacher.recipe = str(resolve_recipe_path(recipe.teacher.recipe, base.parent))
    return ParadigmSpec(name=name, params=params, recipe=recipe, source=str(path),
                        description=str(raw.get("description") or ""))


def list_paradigm_recipes(dataset: Optional[str] = None) -> list[str]:
    """Shipped paradigm recipes (``paradigms/<dataset>/<name>``)."""
    if not PARADIGMS_DIR.is_dir():
        return []
    names = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in PARADIGMS_DIR.rglob("*.yaml"))
    return [n for n in names if dataset is None or n.startswith(f"paradigms/{dataset}/")]


def paradigm_spec(first: str, ref: Optional[str] = None, overrides: Optional[list[str]] = None,
                  seed: Optional[int] = None) -> ParadigmSpec:
    """The spec of ``kdlab paradigm NAME RECIPE`` (a normal recipe plus ``--set paradigm.X=v``
    settings) or ``kdlab paradigm PARADIGM_RECIPE``; ``seed`` overrides ``train.seed``."""
    from kdlab.train.recipe import load_recipe

    ov = list(overrides or [])
    if first not in PARADIGMS:  # the first argument is a paradigm recipe
        if ref is not None:
            raise ValueError(f"unknown paradigm '{first}' (one of: {', '.join(PARADIGMS.names())})")
        first, ref = None, first
    if ref is None:
        raise ValueError(f"name a recipe: kdlab paradigm {first} RECIPE (or a paradigm recipe, "
                         f"e.g. kdlab paradigm paradigms/digits/{first})")
    if is_paradigm_file(ref):
        spec = load_paradigm(ref, ov)
        if first is not None and first != spec.name:
            raise ValueError(f"{ref} is a '{spec.name}' paradigm recipe, not '{first}'")
    else:
        if first is None:
            raise ValueError(f"'{ref}' is not a paradigm recipe (no 'paradigm:' section); "
                             f"use kdlab paradigm NAME {ref}")
        par = apply_overrides({"paradigm": {}}, [o for o in ov if o.startswith("paradigm.")])["paradigm"]
        spec = ParadigmSpec(first, check_params(first, par, "--set paradigm"),
                            load_recipe(ref, [o for o in ov if not o.startswith("paradigm.")]), str(ref))
    if seed is not None:
        spec.recipe = spec.recipe.with_seed(seed)
    return spec
