"""Recipe files: the machinery every recipe reader (training, paradigm, LM, diffusion, tune)
shares, and the typed sections that need no knowledge of data sets or loss terms. A recipe is a
YAML file; unknown keys and bad values fail at load time with the dotted path of the offending
entry. The classification recipe itself (``Recipe``, ``load_recipe``: its ``data`` section names
registered data sets and transfer-set kinds, its ``loss`` registered terms) is
:mod:`kdlab.train.recipe`, above the packages whose registries it checks.

A recipe may start with ``extends: other.yaml`` (a path relative to the recipe, or a shipped
recipe name such as ``digits/full``); its own keys are then deep-merged over that base.
Shipped recipes live in ``kdlab/recipes`` and are named by their path without ``.yaml``.

Paths, one rule each:

* references to *recipes* (``extends``, ``teacher.recipe``, the ``recipes`` of an ``mtkd`` term) are
  relative to the recipe file that writes them (then the current folder, then the shipped
  recipes); a ``--set`` value is relative to the current folder. They are resolved when the file is
  read, so a recipe extending ``digits/kd`` still finds ``digits/teacher``; a shipped recipe is
  then named by its shipped name, any other by its absolute path;
* paths of *run outputs and data* (``teacher.checkpoint``, the ``checkpoints`` of ``mtkd``,
  ``data.data_dir``, ``--out``) are relative to the current folder, like the default ``runs/``.

Contents: the sections, the one YAML reader (duplicate keys refused), the `extends` merge, the
path rules, the override parser and the loss-number checks; one unit, as each part uses the others.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key path and the fix."""


class Strict(BaseModel):
    """A recipe section: unknown keys, NaN and infinity refused; assignments validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentCfg(Strict):
    crop_pad: int = Field(0, ge=0)
    flip: bool = False
    randaugment: int = Field(0, ge=0, le=6)  # RandAugment-lite operations per image (kdlab.data.augment)
    magnitude: float = Field(0.5, gt=0.0, le=1.0)


class InputCfg(Strict):
    """The view of each sample a model sees (privileged information: the teacher sees the full
    image, the student e.g. a lower resolution). ``resize: [H, W]``: area-averaged when shrinking,
    bilinear when enlarging (:func:`kdlab.data.views.resize_view`)."""

    resize: Optional[list[int]] = None

    @field_validator("resize")
    @classmethod
    def _hw(cls, v):
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ValueError("resize must be [H, W] with H, W >= 1 (e.g. resize: [14, 14])")
        return v


class ModelCfg(Strict):
    # a registered name, timm:<name>, torchvision:<name>, hf:<local path>, or module:function
    model: str
    kwargs: dict[str, Any] = {}
    weights: Optional[str] = None  # a local state dict / checkpoint loaded into the model
    input: Optional[InputCfg] = None  # the student's view of each sample (student.input.resize)


class TeacherCfg(ModelCfg):
    checkpoint: Optional[str] = None
    recipe: Optional[str] = None
    # an ensemble teacher: these checkpoints' outputs averaged (as logits, or as probabilities)
    checkpoints: Optional[list[str]] = None
    ensemble: Literal["logits", "probs"] = "logits"
    # use a teacher whose checkpoint records another data set (deliberate cross-data distillation)
    allow_other_dataset: bool = False
    # at most this many epochs for the teacher trained on the way (``teacher.recipe``); set by
    # ``--set train.epochs=N`` (see :func:`kdlab.train.recipe.bound_teacher`), None: the teacher
    # recipe's own epochs
    epochs: Optional[int] = Field(None, ge=1)

    @field_validator("checkpoints")
    @classmethod
    def _members(cls, v):
        if v is not None and len(v) < 1:
            raise ValueError("checkpoints must list at least one teacher checkpoint")
        return v

    @field_validator("input")
    @classmethod
    def _full_view(cls, v):
        if v is not None:
            raise ValueError("the teacher sees the full image; give the student's view as student.input")
        return v


class TrainCfg(Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False
    optimizer: Literal["sgd", "adamw"] = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: int = Field(0, ge=0)
    grad_accum: int = Field(1, ge=1)
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
    # weight EMA of the student: after every optimiser step e ← ema·e + (1−ema)·w (every floating
    # state entry, BatchNorm statistics included); validation, best.pt and the test use e
    ema: Optional[float] = Field(None, gt=0.0, lt=1.0)
    # mixup / CutMix of every training batch: Beta(α, α) parameters, 0 = off (kdlab.data.augment.MixSpec)
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    # where metrics go besides metrics.csv and train.log: tensorboard (event files under <run>/tb)
    log_to: list[Literal["csv", "tensorboard", "mlflow"]] = ["csv"]
    # teacher outputs: "cache-fp16"/"cache-fp32" (paired data; outputs rounded to that precision,
    # reused from a study's teacher cache when one is attached), "live" (fp32, every step) or
    # "consistent" (fresh augmentation per method, teacher live); see docs/speed.md
    teacher_mode: Literal["cache-fp16", "cache-bf16", "cache-fp32", "live", "consistent"] = "cache-fp16"
    # the frozen teacher runs as an inference copy: BatchNorm folded into its convolutions (exact up
    # to float rounding), in channels-last (CPU and GPU); false (the default until its
    # speed-up is measured on an idle machine, docs/speed.md) runs it as loaded
    fast_teacher: bool = False
    # end training after this many epochs of the ``epochs``-long schedule (the learning-rate schedule
    # still spans ``epochs``); the run then finishes normally from its best epoch so far, with
    # ``stopped_early: true`` in result.json. None (default), or a value at or beyond ``epochs`` (e.g.
    # after ``--set train.epochs=2`` on such a recipe): train all ``epochs``
    stop_after_epochs: Optional[int] = Field(None, ge=1)
    # same numbers on any machine's CPU thread count: torch.use_deterministic_algorithms and a fixed
    # intra-op thread count (``threads``, 1 unless set); ``threads`` alone fixes only the count
    deterministic: bool = False
    threads: Optional[int] = Field(None, ge=1)

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
    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False)  # a negative weight would maximise the term

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MaskCfg(Strict):
    """Causal masks (kdlab.distill.masks; docs/masks.md).

    ``method``: ``grad`` (gradient x activation) or ``ig`` (Integrated Gradients, ``steps``
    quadrature nodes of ``rule``). ``q``/``kind``/``reduce``: the mask made from the attribution.
    ``rule``: ``midpoint`` (default, chosen by the completeness table in docs/masks.md) or
    ``gausslegendre``. ``reuse``: ``per-view`` (default) computes the mask of every augmented
    view (exact); ``per-image`` computes each training image's importance map once per teacher,
    on the un-augmented image, maps it to each view by the view's crop offset and flip at the
    layer's resolution and makes the mask there (kdlab.distill.mask_reuse).
    """

    method: Literal["grad", "ig"] = "grad"
    steps: int = Field(16, ge=1)
    rule: Literal["midpoint", "gausslegendre"] = "midpoint"
    q: float = Field(0.3, gt=0.0, le=1.0)
    kind: Literal["binary", "soft"] = "binary"
    reduce: Literal["abs", "relu"] = "abs"
    reuse: Literal["per-view", "per-image"] = "per-view"


class StudyCfg(Strict):
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    methods: Literal["ladder", "loo", "both"] = "ladder"


#: ``train`` keys added after runs existed: at these values they are left out of run identities
#: (``kdlab.train.recipe.Recipe.to_dict`` and every task recipe built on ``TrainCfg``), so finished
#: runs keep theirs
NEW_TRAIN_DEFAULTS = {"fast_teacher": False, "ema": None, "mixup": 0.0, "cutmix": 0.0, "stop_after_epochs": None}


def drop_new_train_defaults(train: dict) -> dict:
    """``train`` (a dumped :class:`TrainCfg`) without the :data:`NEW_TRAIN_DEFAULTS` keys that hold
    their default; changed in place and returned."""
    for k, v in NEW_TRAIN_DEFAULTS.items():
        if k in train and train[k] == v:
            del train[k]
    return train


def fmt_loc(loc) -> str:
    """Dotted path of a pydantic error location: ``loss[0].weight``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: dicts key by key, anything else (lists too) replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_recipe_path(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe path, or the name of a shipped recipe (``digits/full``): tried relative to
    ``relative_to`` (the folder of the recipe that names it), then the current folder, then the
    shipped recipes."""
    if not isinstance(ref, (str, Path)) or not str(ref).strip():
        raise RecipeError(f"recipe reference {ref!r} must be a YAML path or a shipped recipe name")
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
    if p.is_dir():
        raise FileNotFoundError(f"recipe '{ref}' is a folder; give a YAML file in it or a shipped name "
                                f"(see `kdlab recipes`)")
    where = f" (looked in {relative_to}, the current folder and the shipped recipes)" if relative_to else ""
    raise FileNotFoundError(
        f"recipe '{ref}' not found{where}; give a YAML path or a shipped name (see `kdlab recipes`)"
    )


def recipe_ref(path: Path) -> str:
    """The stable name of a resolved recipe file: its shipped name (``digits/teacher``) for a
    shipped recipe, else its absolute path."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(RECIPES_DIR.resolve()).with_suffix("").as_posix())
    except ValueError:
        return str(path)


def resolve_refs(raw: dict, relative_to: Path | None, where: str) -> dict:
    """Resolve, in place, the recipe references of a raw recipe dict (``teacher.recipe`` and the
    ``recipes`` of loss terms) against ``relative_to`` (see the module doc); unresolvable ones
    raise one line naming ``where`` and the key."""

    def one(ref, key):
        if ref is None:
            return None
        try:
            return recipe_ref(resolve_recipe_path(ref, relative_to))
        except (FileNotFoundError, RecipeError) as e:
            raise RecipeError(f"{where}: {key}: {e}") from None

    t = raw.get("teacher")
    if isinstance(t, dict) and t.get("recipe") is not None:
        t["recipe"] = one(t["recipe"], "teacher.recipe")
    loss = raw.get("loss")
    if isinstance(loss, list):
        for i, term in enumerate(loss):
            if isinstance(term, dict) and isinstance(term.get("recipes"), list):
                term["recipes"] = [one(r, f"loss[{i}].recipes") for r in term["recipes"]]
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last
    silently, dropping the first block)."""


def _unique_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:  # an unhashable key: the base constructor reports it
            continue
        if first is not key_node:
            raise RecipeError(f"line {key_node.start_mark.line + 1}: key '{key}' appears twice in the "
                              f"same section (first on line {first.start_mark.line + 1}); YAML would keep "
                              f"only the last, so merge the two blocks or delete one")
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: Path, what: str = "recipe"):
    """The YAML content of ``path`` (safe types only; a key given twice is an error); any problem is
    one :class:`RecipeError` line naming the file (and line)."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text (UTF-8) file; give a YAML {what}") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror}); give a readable YAML {what}") from None


def read_yaml_mapping(path: Path, shape: str = "a recipe must be a mapping of sections (name, student, ...)") -> dict:
    """A YAML file that must hold a mapping (an empty file is ``{}``), read by :func:`load_yaml`
    (a key given twice is an error), with one-line errors naming the file; ``shape`` says what it
    should be. The one YAML reader of kdlab's recipe files (training, paradigm and LM recipes)."""
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: {shape}")
    return raw


def merge_base(raw: dict, relative_to: Path, where: str, seen: tuple = ()) -> dict:
    """``raw`` with its ``extends`` (a recipe path relative to ``relative_to``, or a shipped name)
    removed and deep-merged over the base it names (read by :func:`read_recipe_yaml`; dicts merge
    key by key, a list such as ``loss`` replaces the base's whole list)."""
    base_ref = raw.pop("extends", None)
    if base_ref is None:
        return raw
    try:
        base_path = resolve_recipe_path(base_ref, relative_to)
    except (FileNotFoundError, RecipeError) as e:
        raise RecipeError(f"{where}: extends: {e}") from None
    return deep_merge(read_recipe_yaml(base_path, seen), raw)


def read_recipe_yaml(path: Path, seen: tuple = ()) -> dict:
    """A recipe file as a raw dict, with its ``extends`` chain merged in."""
    if path.resolve() in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle")
    raw = read_yaml_mapping(path)
    resolve_refs(raw, path.parent, str(path))
    return merge_base(raw, path.parent, str(path), seen + (path.resolve(),))


def check_loss_numbers(loss: list, where: str = "recipe") -> None:
    """Loss-term numbers that would train nothing or train on NaN: every weight 0 (no gradient at
    all), and a NaN or infinite weight or parameter (``T: .nan``) — refused here, naming the key,
    instead of surfacing later as a non-finite loss blamed on the learning rate."""
    import math

    def bad(v) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, float)):
            return not math.isfinite(v)
        if isinstance(v, (list, tuple)):
            return any(bad(x) for x in v)
        return False

    for i, t in enumerate(loss):
        for k, v in [("weight", t.weight), *t.params.items()]:
            if bad(v):
                raise RecipeError(f"{where}: loss[{i}].{k}: {v!r} is not a finite number ({t.term}); "
                                  f"give a real value")
    if loss and all(t.weight == 0 for t in loss):
        raise RecipeError(f"{where}: loss: every term has weight 0, so nothing would be learned; give at "
                          f"least one term a positive weight (e.g. --set loss[0].weight=1)")


def describe_error(e: ValidationError) -> str:
    """``<dotted key>: <what is wrong>`` for the first error of a pydantic validation."""
    err = e.errors()[0]
    if err["type"] == "extra_forbidden":
        msg = f"unknown key '{err['loc'][-1]}'"
    elif err["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = f"{err['msg']} (got {err.get('input')!r})"
    return f"{fmt_loc(err['loc'])}: {msg}"


def override_keys(ov: str, key: str) -> list:
    """The steps of an override key: names, and list positions written ``loss[0]`` (or ``loss.0``);
    ``loss.kd`` names the loss entry whose term is ``kd``."""
    import re

    steps: list = []
    for part in key.strip().split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\s*-?\d+\s*\])*)", part)
        if not part or not m or (not m.group(1) and not steps):
            raise RecipeError(f"override '{ov}': the key has an empty part or a malformed one; write it as "
                              f"section.key=value (e.g. train.epochs=5 or loss[0].weight=0.5)")
        if m.group(1):
            steps.append(int(m.group(1)) if m.group(1).isdigit() else m.group(1))
        steps += [int(i) for i in re.findall(r"\[\s*(-?\d+)\s*\]", m.group(2))]
    return steps


def apply_overrides(raw: dict, overrides) -> dict:
    """Set ``dotted.key=value`` overrides (values parsed as YAML) in a raw recipe dict, in place.
    List entries are addressed by position, ``loss[0].weight=0.5`` (also ``loss.0.weight``), or,
    in the loss list, by term name when it is used once: ``loss.kd.T=2``."""
    for ov in overrides or []:
        if "=" not in ov:
            raise RecipeError(f"override '{ov}' must look like key.path=value (e.g. train.epochs=5)")
        key, val = ov.split("=", 1)
        steps = override_keys(ov, key)
        try:
            value = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise RecipeError(f"override '{ov}': the value is not valid YAML "
                              f"({str(e).splitlines()[0]}); quote it or fix the brackets") from None
        node: Any = raw
        where = ""
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if isinstance(node, list):
                step = _list_position(ov, node, step, where)
                if last:
                    node[step] = value
                else:
                    node = node[step]
            elif isinstance(node, dict):
                if isinstance(step, int) and step not in node:
                    raise RecipeError(f"override '{ov}': {where or 'the recipe'} is not a list; "
                                      f"[{step}] addresses list entries (e.g. loss[0].weight=0.5)")
                if last:
                    node[step] = value
                else:
                    if step not in node and isinstance(steps[i + 1], int):
                        raise RecipeError(f"override '{ov}': the recipe file sets no list '{step}' to index; "
                                          f"set the whole list instead, e.g. --set '{step}=[...]'")
                    node = node.setdefault(step, {})
            else:
                raise RecipeError(f"override '{ov}': '{where}' is not a section")
            where = f"{where}[{step}]" if isinstance(step, int) else (f"{where}.{step}" if where else str(step))
    return raw


def _list_position(ov: str, items: list, step, where: str) -> int:
    """The position in the recipe list ``where`` that the override step ``step`` names."""
    if isinstance(step, str):
        found = [i for i, e in enumerate(items) if isinstance(e, dict) and e.get("term") == step]
        if len(found) == 1:
            return found[0]
        terms = [e.get("term") for e in items if isinstance(e, dict)]
        why = "is listed more than once" if found else "is not in it"
        raise RecipeError(f"override '{ov}': {where} holds {terms}; '{step}' {why}: address an entry by "
                          f"position, e.g. {where}[0].weight=0.5")
    if not -len(items) <= step < len(items):
        raise RecipeError(f"override '{ov}': {where} has {len(items)} entries; positions run from 0 to "
                          f"{len(items) - 1}")
    return step % len(items)


def list_recipes() -> list[str]:
    """Shipped training recipes (``recipes/paradigms/``, ``recipes/lm/`` and ``recipes/diffusion/``
    hold files of other schemas: paradigm recipes, language-model recipes (`kdlab lm`) and
    diffusion recipes (`kdlab diffusion`))."""
    names = (str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    return sorted(n for n in names if not n.startswith(("paradigms/", "lm/", "diffusion/")))
