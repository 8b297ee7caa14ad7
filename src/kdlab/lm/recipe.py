"""LM recipes: a YAML schema of their own (corpus, teacher, student, distillation, study).

Shipped LM recipes live in ``kdlab/recipes/lm/`` and are named ``lm/<name>`` (``lm/docs``,
``lm/code``, ``lm/arithmetic``). ``extends:`` and ``dotted.key=value`` overrides work as for the
vision recipes (:mod:`kdlab.core.config`, :mod:`kdlab.train.recipe`). Unknown keys fail with the
dotted path of the entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdlab.core.config import (RecipeError, apply_overrides, describe_error, merge_base, read_yaml_mapping,
                               resolve_recipe_path)


def read_lm_yaml(path: Path) -> dict:
    """A recipe file as a dict, with ``extends:`` resolved (relative path or shipped name), read
    by :mod:`kdlab.core.config`'s one recipe reader."""
    raw = read_yaml_mapping(path, "an LM recipe must be a mapping (name, corpus, student, ...)")
    return merge_base(raw, path.parent, str(path), (path.resolve(),))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusCfg(_Strict):
    name: str = "docs"                      # docs | code | a folder | module:function
    tokenizer: Literal["byte", "bpe"] = "byte"
    vocab_size: int = Field(1024, ge=300)   # BPE only
    max_bytes: int = Field(2_000_000, ge=1000)
    seq_len: int = Field(64, ge=4)
    val_tokens: Optional[int] = Field(8192, ge=64)
    test_tokens: Optional[int] = Field(None, ge=64)


class LMTrainCfg(_Strict):
    epochs: int = Field(3, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    patience: Optional[int] = Field(None, ge=1)
    grad_clip: Optional[float] = Field(1.0, gt=0.0)
    grad_accum: int = Field(1, ge=1)
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = 0


class LMModelCfg(_Strict):
    model: Literal["gpt", "hf"] = "gpt"
    kwargs: dict[str, Any] = {}


class LMTeacherCfg(LMModelCfg):
    checkpoint: Optional[str] = None
    train: LMTrainCfg = LMTrainCfg(epochs=6, steps_per_epoch=100)


class MiniLLMCfg(_Strict):
    """MiniLLM's on-policy step (Gu et al. 2024; :mod:`kdlab.lm.minillm`)."""
    alpha: float = Field(0.2, ge=0.0, lt=1.0)        # teacher mix of the sampling distribution
    baseline: Literal["whiten", "mean", "none"] = "whiten"
    length_norm: bool = True
    single_step: bool = True
    long_term: bool = True
    pt_weight: float = Field(1.0, ge=0.0)            # CE on the step's data batch (L_PT)

    @model_validator(mode="after")
    def _some_term(self):
        if not (self.single_step or self.long_term):
            raise ValueError("distill.minillm needs single_step or long_term (or both) true")
        return self


class DistillCfg(_Strict):
    loss: list[dict[str, Any]] = [{"term": "ce"}]
    teacher_source: Literal["sparse", "live"] = "sparse"
    top_k: int = Field(16, ge=1)
    seqkd: float = Field(0.0, ge=0.0, le=1.0)        # fraction of batches from teacher generations
    seqkd_pool: int = Field(512, ge=1)               # teacher continuations generated (cached)
    seqkd_greedy: bool = False
    on_policy: float = Field(0.0, ge=0.0, le=1.0)    # GKD λ: probability the student generates
    on_policy_start: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of epochs trained supervised first
    prompt_len: int = Field(16, ge=1)
    gen_len: int = Field(32, ge=1)
    gen_temperature: float = Field(1.0, gt=0.0)
    minillm: Optional[MiniLLMCfg] = None             # on-policy steps are MiniLLM's (needs on_policy > 0)

    @model_validator(mode="after")
    def _minillm_needs_on_policy(self):
        if self.minillm is not None and self.on_policy <= 0:
            raise ValueError("distill.minillm replaces the on-policy steps; set distill.on_policy > 0 "
                             "(e.g. on_policy: 1)")
        if self.minillm is not None and self.gen_temperature != 1.0:
            raise ValueError(f"distill.minillm's estimator needs samples from the student itself (temperature 1); "
                             f"set distill.gen_temperature: 1 (got {self.gen_temperature})")
        return self


class LMStudyCfg(_Strict):
    seeds: list[int] = [0, 1, 2]
    baseline: str = "ce"
    methods: dict[str, dict[str, Any]] = {}          # name -> overrides of the distill section
    exposure_prompts: int = Field(32, ge=1)

    @field_validator("methods")
    @classmethod
    def _method_names(cls, v: dict) -> dict:
        from kdlab.core.io import check_path_name

        for name in v:  # each names a folder under <out>/runs/
            check_path_name(name, "study method")
        return v


class ArithmeticCfg(_Strict):
    ops: list[Literal["+", "*"]] = ["+", "*"]
    train_digits: list[int] = [1, 3]                 # operand digit range seen in training
    long_digits: int = Field(4, ge=1)                # held-out longer operands
    pad_to: int = Field(0, ge=0)                     # zero-pad operands to this many digits (0: no)
    n_train: int = Field(4000, ge=10)
    n_val: int = Field(200, ge=10)
    n_test: int = Field(300, ge=10)
    students: list[Literal["answers", "traces", "teacher_traces"]] = ["answers", "traces", "teacher_traces"]
    teacher_samples: int = Field(2, ge=1)            # rejection sampling: tries per problem


class LMRecipe(_Strict):
    name: str
    description: str = ""
    task: Literal["lm"] = "lm"                       # the kdlab.tasks plug-in (kdlab.tasks.lm)
    kind: Literal["corpus", "arithmetic"] = "corpus"  # the study this recipe runs
    corpus: CorpusCfg = CorpusCfg()
    arithmetic: ArithmeticCfg = ArithmeticCfg()
    teacher: Optional[LMTeacherCfg] = None
    student: LMModelCfg = LMModelCfg()
    train: LMTrainCfg = LMTrainCfg()
    distill: DistillCfg = DistillCfg()
    study: LMStudyCfg = LMStudyCfg()
    source: Optional[str] = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _legacy_task(cls, v):
        """``task: corpus`` / ``task: arithmetic`` (recipes written before tasks were plug-ins)
        mean ``task: lm`` with that ``kind``."""
        if isinstance(v, dict) and v.get("task") in ("corpus", "arithmetic"):
            v = {**v, "kind": v.get("kind", v["task"]), "task": "lm"}
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from kdlab.core.io import check_path_name

        return check_path_name(v, "recipe name")

    @field_validator("distill")
    @classmethod
    def _terms(cls, v: DistillCfg) -> DistillCfg:
        from kdlab.lm.objective import parse_terms

        parse_terms(v.loss)
        return v

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude={"source"})

    def with_seed(self, seed: int) -> "LMRecipe":
        """The same recipe with ``train.seed = seed`` (the seed of a student run)."""
        d = self.to_dict()
        d["train"] = {**d["train"], "seed": int(seed)}
        r = lm_recipe_from_dict(d, self.name)
        r.source = self.source
        return r

    def method(self, name: str) -> "LMRecipe":
        """This recipe with the study method ``name``'s overrides applied to ``distill``."""
        if name not in self.study.methods:
            raise KeyError(f"no study method '{name}' in {self.name}; methods: {', '.join(self.study.methods)}")
        d = self.to_dict()
        d["distill"] = {**d["distill"], **self.study.methods[name]}
        r = lm_recipe_from_dict(d, f"{self.name}[{name}]")
        r.source = self.source
        return r


def lm_recipe_from_dict(raw: dict, where: str = "recipe") -> LMRecipe:
    try:
        return LMRecipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{where}: {describe_error(e)}") from None


def load_lm_recipe(ref: str, overrides: Optional[list[str]] = None) -> LMRecipe:
    """Load an LM recipe by path or shipped name (``lm/docs``); ``overrides`` are ``key=value``."""
    ref_s = str(ref)
    try:
        path = resolve_recipe_path(ref_s)
    except FileNotFoundError:
        path = resolve_recipe_path("lm/" + ref_s) if not ref_s.startswith("lm/") else None
        if path is None:
            raise
    raw = read_lm_yaml(path)
    apply_overrides(raw, overrides)
    r = lm_recipe_from_dict(raw, str(path))
    r.source = str(path)
    return r


def list_lm_recipes() -> list[str]:
    """Shipped LM recipes (``lm/<name>``); the vision ``list_recipes`` must skip ``lm/``."""
    from kdlab.core.config import RECIPES_DIR

    return sorted(f"lm/{p.stem}" for p in (RECIPES_DIR / "lm").glob("*.yaml"))
