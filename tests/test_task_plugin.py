"""A task registered in this one file gets the whole study machinery with no other code:
``kdlab ablate`` (paired table, statistics, forest plot), ``kdlab report`` (the same files again),
``kdlab findings`` (sentences) and a 3-trial ``kdlab tune`` on its validation metric."""

import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pytest
from scipy import stats

from kdlab.cli.main import main
from kdlab.tasks import Metric, Task, register_task


# -- the toy task: estimate the mean of N(mu, 1) from n samples, optionally shrunk toward 0 -----
@dataclass
class ToyStudy:
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3])


@dataclass
class ToyParams:
    w: float = 0.0          # shrinkage toward 0: estimate = (1 - w) * sample mean
    seed: int = 0


@dataclass
class ToyRecipe:
    name: str
    mu: float
    n: int
    params: ToyParams
    methods: dict
    study: ToyStudy
    task: str = "toy"
    description: str = ""
    source: str = None

    @property
    def train(self):  # the tuner reads the sampler's seed here
        return self.params

    def with_seed(self, k):
        return replace(self, params=replace(self.params, seed=int(k)))

    def to_dict(self):
        d = asdict(self)
        d.pop("source")
        return d


def toy_from_dict(raw):
    raw = dict(raw)
    raw["params"] = ToyParams(**raw.get("params", {}))
    raw["study"] = ToyStudy(**raw.get("study", {}))
    raw.pop("tune", None)
    return ToyRecipe(**raw)


def estimate_error(mu, n, w, seed, split):
    """Squared error of the shrunk sample mean of n draws (rng seeded by seed and split)."""
    rng = np.random.default_rng([seed, {"val": 1, "test": 2}[split]])
    return float(((1 - w) * rng.normal(mu, 1.0, n).mean() - mu) ** 2)


@register_task("toy-mean", "toy: shrunk mean estimation")
class ToyTask(Task):
    metrics = (Metric("err", "min", "", 1.0, "squared error", delta=0.01),)
    select = "err"
    sample_unit = "samples"

    def load_recipe(self, ref, overrides=None):
        from kdlab.core.config import apply_overrides, read_recipe_yaml
        from kdlab.tasks.base import resolve_ref

        raw = apply_overrides(read_recipe_yaml(resolve_ref(ref)), overrides)
        r = toy_from_dict(raw)
        r.source = str(ref)
        return r

    def from_dict(self, raw, where="recipe"):
        return toy_from_dict(raw)

    def ablation_methods(self, recipe, mode="ladder"):
        return {m: replace(recipe, params=replace(recipe.params, w=w)) for m, w in recipe.methods.items()}

    def train(self, recipe, run_dir, *, context=None, method="", progress=True, resume=True):
        run_dir.mkdir(parents=True, exist_ok=True)
        p = recipe.params
        res = {"method": method, "seed": p.seed, "best_epoch": 1, "train_time_s": 0.01, "samples_per_s": 100.0,
               **{f"{s}_err": estimate_error(recipe.mu, recipe.n, p.w, p.seed, s) for s in ("val", "test")}}
        (run_dir / "result.json").write_text(json.dumps(res))
        (run_dir / "metrics.csv").write_text(f"epoch,val_err\n1,{res['val_err']}\n")
        return res


RECIPE = """name: toy-study
task: toy-mean
mu: 0.3
n: 4
params: {w: 0.0}
methods: {baseline: 0.0, shrink: 0.9, mild: 0.2}
study: {seeds: [0, 1, 2, 3]}
"""


def test_toy_task_gets_ablate_report_findings_and_tune(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "findings.md").write_text("the project's page\n")
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "study"
    assert main(["ablate", str(recipe), "--out", str(out), "--quiet"]) == 0
    table = json.loads((out / "report" / "table.json").read_text())
    assert table["task"] == "toy-mean" and [m["method"] for m in table["methods"]] == ["baseline", "shrink", "mild"]
    # the table's numbers from the definitions: per-seed errors, paired t-test, Holm over two
    err = {m: [estimate_error(0.3, 4, w, s, "test") for s in range(4)] for m, w in
           {"baseline": 0.0, "shrink": 0.9, "mild": 0.2}.items()}
    rows = {m["method"]: m for m in table["methods"]}
    assert rows["shrink"]["test_err_mean"] == pytest.approx(np.mean(err["shrink"]))
    p = {m: stats.ttest_rel(err[m], err["baseline"]).pvalue for m in ("shrink", "mild")}
    lo, hi = sorted(p.values())
    holm = {m: min(1.0, (2 if v == lo else 1) * v) for m, v in p.items()}
    holm[max(p, key=p.get)] = max(holm[max(p, key=p.get)], 2 * lo)
    for m in ("shrink", "mild"):
        assert rows[m]["p_ttest"] == pytest.approx(p[m], rel=1e-9)
        assert rows[m]["p_holm"] == pytest.approx(holm[m], rel=1e-9)
        assert rows[m]["diff_vs_baseline"] == pytest.approx(np.mean(np.subtract(err[m], err["baseline"])))
    md = (out / "report" / "table.md").read_text()
    assert "squared error (mean ± sd)" in md and "Lower squared error is better" in md
    assert (out / "report" / "forest.png").read_bytes()[:4] == b"\x89PNG"
    # kdlab report: the same files, byte for byte
    before = {f: (out / "report" / f).read_bytes() for f in ("table.md", "table.csv", "table.json", "results.csv", "index.html", "table.tex")}
    assert main(["report", str(out), "--no-figures"]) == 0
    assert {f: (out / "report" / f).read_bytes() for f in before} == before
    # kdlab findings: into the study's report folder, one sentence per contrast
    assert main(["findings", str(out)]) == 0
    page = (out / "report" / "findings.md").read_text()
    assert "*shrink over baseline* (shrink vs baseline): test squared error" in page
    assert (tmp_path / "docs" / "findings.md").read_text() == "the project's page\n"  # left alone
    # kdlab tune: 3 trials on validation err (minimised), the best value is the smallest
    tdir = tmp_path / "tune"
    assert main(["tune", str(recipe), "--param", "params.w=0:1", "--trials", "3", "--out", str(tdir),
                 "--pruner", "none", "--quiet"]) == 0
    summary = json.loads((tdir / "tune.json").read_text())
    assert summary["metric"] == "val_err" and summary["direction"] == "minimize"
    import csv

    with open(tdir / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 3
    by_hand = [estimate_error(0.3, 4, float(t["param:params.w"]), 0, "val") for t in trials]
    assert [float(t["value"]) for t in trials] == pytest.approx(by_hand)
    assert summary["best_value"] == pytest.approx(min(by_hand))
    assert math.isfinite(summary["best_value"])
