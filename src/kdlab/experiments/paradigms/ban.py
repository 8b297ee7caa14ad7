"""Born-Again Networks (Furlanello et al., ICML 2018): generations of one architecture."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from kdlab.core.io import write_json
from kdlab.experiments.paradigms.base import ParadigmParams, register_paradigm
from kdlab.experiments.paradigms.common import ce_only, derive, distill_loss, student_section, teacher_from, train_link
from kdlab.train.recipe import Recipe


class BanParams(ParadigmParams):
    generations: int = Field(2, ge=1, description="generations after gen 0")


def ensemble_accuracy(checkpoints: list, recipe: Recipe, split: str = "test") -> float:
    """Top-1 of the ensemble that averages the softmax outputs of the checkpoints' models."""
    from kdlab.models.adapters import load_model
    from kdlab.data import BatchLoader
    from kdlab.evaluate.accuracy import ensemble_accuracy as ens
    from kdlab.train.build import load_splits

    splits = load_splits(recipe)
    loader = BatchLoader(getattr(splits, split), 512, shuffle=False, mean=splits.info.mean, std=splits.info.std)
    return ens([load_model(ck)[0] for ck in checkpoints], loader)


@register_paradigm("ban", "Born-Again Networks: k generations of one architecture, each taught by the previous, + ensemble",
                   "Furlanello et al., Born-Again Neural Networks, ICML 2018", params=BanParams)
def run_ban(recipe: Recipe, params: BanParams, out_dir, *, progress: bool = False, log=print) -> dict:
    """gen0 = the recipe's student trained with CE; gen i (1..k) = the same architecture taught by
    gen i−1's best.pt with the recipe's distillation loss (0.1·CE + 0.9·KD when it has none); plus
    the test accuracy of the ensemble of generations 1..k."""
    out_dir = Path(out_dir)
    st = student_section(recipe)
    gen0 = derive(recipe, loss=ce_only(recipe), teacher=None, name=f"{recipe.name}-ban-gen0")
    rows = [{"generation": 0, **train_link(gen0, out_dir / "gen0", progress, "ban-gen0")}]
    log(f"BAN gen 0: test {rows[-1]['test_acc']:.4f}")
    loss = distill_loss(recipe)
    for g in range(1, params.generations + 1):
        r = derive(recipe, student=st, teacher=teacher_from(out_dir / f"gen{g - 1}" / "best.pt"),
                   loss=loss, name=f"{recipe.name}-ban-gen{g}")
        rows.append({"generation": g, **train_link(r, out_dir / f"gen{g}", progress, f"ban-gen{g}")})
        log(f"BAN gen {g}: test {rows[-1]['test_acc']:.4f}")
    ens = ensemble_accuracy([str(out_dir / f"gen{g}" / "best.pt") for g in range(1, params.generations + 1)], recipe)
    log(f"BAN ensemble of generations 1..{params.generations}: test {ens:.4f}")
    summary = {"paradigm": "ban", "generations": rows, "ensemble_test_acc": ens, "student": rows[-1],
               "train_time_s": sum(g["train_time_s"] for g in rows),
               "extra": {"generations": params.generations, "ensemble_test_acc": ens},
               "rows": [{"suffix": "-ensemble", "test_acc": ens, "val_acc": None, "test_loss": None}]}
    write_json(out_dir / "ban.json", summary)
    return summary
