"""Parallel studies: per-run results of `jobs=2` (local processes) and of the submitit launcher
are identical to the sequential loop at the same thread count; finished runs are skipped."""

import json

import pytest
import torch

from kdlab.core.checkpoint import atomic_save, model_checkpoint
from kdlab.experiments.parallel import study_jobs, threads_per_job
from kdlab.experiments.study import ablation_methods, run_study
from kdlab.models import create_model
from kdlab.train.recipe import recipe_from_dict

TIMING = ("train_time_s", "images_per_s", "teacher_time_s", "student_time_s", "student_images_per_s", "mask_time_s",
          "eval_time_s", "data_wait_s", "compile_warmup_s", "setup_time_s", "setup_teacher_time_s",
          "setup_mask_time_s", "checkpoint_time_s")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A 2-epoch digits recipe (CE + KD + masked attention) and a random lone teacher file."""
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(7)
    teacher = create_model("cnn_tiny", num_classes=10, in_channels=1)
    ckpt = d / "teacher.pt"
    atomic_save(model_checkpoint(teacher, model_name="cnn_tiny", model_kwargs={}, num_classes=10,
                                 in_channels=1, dataset="digits"), ckpt)
    return recipe_from_dict({
        "name": "par-test",
        "data": {"name": "digits", "label_fraction": 0.1, "augment": {"crop_pad": 1}},
        "student": {"model": "cnn_tiny"},
        "teacher": {"model": "cnn_tiny", "checkpoint": str(ckpt)},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu", "patience": None},
        "loss": [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9, "T": 4.0},
                 {"term": "attn", "weight": 10.0, "layers": [["stage2", "stage2"]]}],
        "mask": {"method": "ig", "steps": 2, "q": 0.5},
    })


def _runs(out, methods, seeds):
    res, hist, weights = {}, {}, {}
    for m in methods:
        for s in seeds:
            d = out / m / f"seed{s}"
            r = json.loads((d / "result.json").read_text())
            res[m, s] = {k: v for k, v in r.items() if k not in TIMING}
            rows = [l.split(",") for l in (d / "metrics.csv").read_text().splitlines()]
            keep = [i for i, k in enumerate(rows[0]) if k not in TIMING]
            hist[m, s] = [[row[i] for i in keep] for row in rows]
            weights[m, s] = torch.load(d / "best.pt", weights_only=False)["model"]
    return res, hist, weights


def _table(out):
    t = json.loads((out / "report" / "table.json").read_text())
    drop = ("train_time_s", "teacher_time_s", "wall", "images_per_s", "latency")
    return [{k: v for k, v in r.items() if not any(x in k for x in drop)} for r in t["methods"]]


def test_threads_split_between_jobs():
    assert threads_per_job(2, cores=16) == 8
    assert threads_per_job(3, cores=16) == 5
    assert threads_per_job(4, cores=2) == 1  # never below one thread
    with pytest.raises(ValueError, match="at least 1"):
        threads_per_job(0)


def test_study_jobs_order_matches_sequential_loop(full, tmp_path):
    methods = ablation_methods(full)
    jobs = study_jobs(methods, tmp_path, [0, 1])
    assert [(j.method, j.seed) for j in jobs] == [(m, s) for m in methods for s in (0, 1)]
    assert jobs[1].recipe.train.seed == 1 and jobs[1].run_dir == str(tmp_path / "baseline" / "seed1")


@pytest.mark.parametrize("launcher", ["local", "submitit"])
def test_parallel_study_equals_sequential(full, tmp_path, launcher):
    torch.set_num_threads(1)
    methods = ablation_methods(full)  # baseline, kd, full
    seeds = [0, 1]
    kw = dict(seeds=seeds, progress=False, profile=False, log=lambda *a: None)
    run_study(methods, tmp_path / "seq", **kw)
    lines = []
    opts = {"cluster": "local", "timeout_min": 10} if launcher == "submitit" else None
    run_study(methods, tmp_path / "par", jobs=2, threads=1, launcher=launcher, launcher_options=opts,
              **{**kw, "log": lines.append})
    seq, par = _runs(tmp_path / "seq", methods, seeds), _runs(tmp_path / "par", methods, seeds)
    assert seq[0] == par[0]  # every result.json field but the timings, threads included (1)
    assert seq[1] == par[1]  # every epoch's losses and validation metrics
    for key, w in seq[2].items():
        assert all(torch.equal(w[k], par[2][key][k]) for k in w)
    assert _table(tmp_path / "seq") == _table(tmp_path / "par")
    # the teacher cache was filled once per seed before the fan-out, then only read
    assert sum("filling 2 seed(s)" in str(l) for l in lines) == 1
    assert list((tmp_path / "par" / ".teacher_cache").rglob("e00001.pt"))
    # a second invocation skips every finished run, in the workers too
    lines.clear()
    run_study(methods, tmp_path / "par", jobs=2, threads=1, launcher=launcher, launcher_options=opts,
              **{**kw, "log": lines.append})
    assert sum("done earlier" in str(l) for l in lines) == 6
    assert not any("filling" in str(l) for l in lines)


def test_bad_launcher_is_a_one_line_error(full, tmp_path):
    with pytest.raises(ValueError, match="launcher 'slurm' is not one of local, submitit"):
        run_study(ablation_methods(full), tmp_path, seeds=[0], jobs=2, launcher="slurm", progress=False,
                  profile=False, log=lambda *a: None)
