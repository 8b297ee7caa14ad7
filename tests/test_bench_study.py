"""`kdlab bench --study`: where a study's time goes (student / teacher forward / mask), and the
generated CIFAR-format data (kdlab.data.cifar_synthetic)."""

import json
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.cli.main import main
from kdlab.experiments.bench import bench_study, study_breakdown

MASKED = {"kd+align", "kd+attn", "full"}


def _write_recipes(tmp_path):
    """A tiny CIFAR-shape study (cnn_small teacher -> cnn_tiny student, 1 epoch, IG with 2
    steps, crop + flip) and its teacher recipe; the data and teacher paths come from the bench."""
    (tmp_path / "teacher.yaml").write_text(
        "name: tiny-teacher\n"
        "data: {name: cifar10, val_fraction: 0.1}\n"
        "student: {model: cnn_small}\n"
        "train: {epochs: 1, batch_size: 32, lr: 0.05, seed: 0}\n"
        "loss: [{term: ce}]\n")
    (tmp_path / "full.yaml").write_text(
        "name: tiny-full\n"
        "data: {name: cifar10, val_fraction: 0.1, augment: {crop_pad: 4, flip: true}}\n"
        "teacher: {model: cnn_small, checkpoint: unused.pt, recipe: teacher.yaml}\n"
        "student: {model: cnn_tiny}\n"
        "train: {epochs: 1, batch_size: 32, lr: 0.05, seed: 0}\n"
        "loss:\n"
        "  - {term: ce, weight: 0.1}\n"
        "  - {term: kd, weight: 0.9, T: 4.0}\n"
        "  - {term: align, weight: 0.5, layers: [[stage2, stage2]], form: contrastive, tau: 0.1}\n"
        "  - {term: attn, weight: 100.0, layers: [[stage2, stage2]]}\n"
        "mask: {method: ig, steps: 2, q: 0.5, kind: binary}\n"
        "study: {seeds: [0], methods: ladder}\n")
    return str(tmp_path / "full.yaml")


def test_breakdown_by_hand():
    runs = [
        {"method": "baseline", "seed": 0, "train_time_s": 2.0, "teacher_time_s": 0.0, "mask_time_s": 0.0,
         "student_time_s": 2.0, "teacher_forward_time_s": 0.0},
        {"method": "kd+align", "seed": 0, "train_time_s": 6.0, "teacher_time_s": 3.0, "mask_time_s": 2.5,
         "student_time_s": 3.0, "eval_time_s": 0.5},
        # an older result.json without mask_time_s nor student_time_s: student = train - teacher
        {"method": "kd+align", "seed": 1, "train_time_s": 4.0, "teacher_time_s": 1.0},
    ]
    b = study_breakdown(runs, wall_s=12.0)
    assert b["methods"]["kd+align"] == {"runs": 2, "student_s": 6.0, "teacher_forward_s": 1.5, "mask_s": 2.5,
                                        "eval_s": 0.5, "setup_s": 0.0, "checkpoint_s": 0.0}
    t = b["total"]
    assert (t["runs"], t["student_s"], t["teacher_forward_s"], t["mask_s"], t["eval_s"]) == (3, 8.0, 1.5, 2.5, 0.5)
    assert t["other_s"] == pytest.approx(12.0 - 8.0 - 1.5 - 2.5 - 0.5)
    assert t["ratio"] == pytest.approx(12.0 / 8.0)
    assert t["floor"] == pytest.approx((8.0 + 1.5 + 2.5 + 0.5) / 8.0)  # 1.5625: wall's parts less set-up etc.
    # a run's set-up probe: its teacher outputs join the teacher forward, its masks the masks, the
    # rest is set-up; checkpoints and the report are named too, "other" is what is left
    runs.append({"method": "full", "seed": 0, "train_time_s": 3.0, "teacher_time_s": 1.0, "mask_time_s": 0.5,
                 "student_time_s": 2.0, "eval_time_s": 0.25, "setup_time_s": 1.5, "setup_teacher_time_s": 0.75,
                 "setup_mask_time_s": 0.5, "checkpoint_time_s": 0.125})
    t = study_breakdown(runs, wall_s=20.0, report_s=2.0)["total"]
    assert (t["student_s"], t["teacher_forward_s"], t["mask_s"], t["eval_s"], t["setup_s"], t["checkpoint_s"],
            t["report_s"]) == (10.0, 1.5 + 0.5 + 0.25, 2.5 + 0.5 + 0.5, 0.75, 0.75, 0.125, 2.0)
    assert t["other_s"] == pytest.approx(20.0 - 10.0 - 2.25 - 3.5 - 0.75 - 0.75 - 0.125 - 2.0)
    assert t["floor"] == pytest.approx(16.5 / 10.0)  # set-up, checkpoints and the report left out


def test_study_bench_adds_up_and_leaves_results_unchanged(tmp_path, capsys):
    from kdlab.experiments.study import run_ablation

    recipe = _write_recipes(tmp_path)
    out = tmp_path / "bench"
    rc = main(["bench", "--study", recipe, "--synthetic-cifar", "80", "--mask-reuse", "per-view,per-image",
               "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert (out / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert (out / "teacher" / "result.json").is_file()  # trained there, not at the recipe's path
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"study/students: \d+\.\d\d", lines[-1])
    assert sum(bool(re.fullmatch(r"study/students: \d+\.\d\d", l)) for l in lines) == 2
    studies = json.loads((out / "bench-study.json").read_text())["studies"]
    assert [s["mask_reuse"] for s in studies] == ["per-view", "per-image"]
    for s in studies:
        t = s["total"]
        assert t["runs"] == 5 and set(s["methods"]) == {"baseline", "kd", "kd+align", "kd+attn", "full"}
        for m in list(s["methods"].values()) + [t]:
            assert m["student_s"] > 0 and m["teacher_forward_s"] >= 0 and m["mask_s"] >= 0
        assert t["student_s"] + t["teacher_forward_s"] + t["mask_s"] <= t["wall_s"]
        # every part named: they and "other" add up to the wall time, none negative but "other"
        parts = ("student_s", "teacher_forward_s", "mask_s", "eval_s", "setup_s", "checkpoint_s", "report_s")
        assert all(t[k] >= 0 for k in parts) and t["setup_s"] > 0 and t["checkpoint_s"] > 0 and t["report_s"] > 0
        assert sum(t[k] for k in parts) + t["other_s"] == pytest.approx(t["wall_s"])
        assert t["ratio"] == pytest.approx(t["wall_s"] / t["student_s"])
        assert 1 < t["floor"] < t["ratio"]
        # masks are paid only by masked methods; the baseline runs no teacher at all
        assert all(s["methods"][m]["mask_s"] == 0 for m in ("baseline", "kd"))
        assert sum(s["methods"][m]["mask_s"] for m in MASKED) > 0
        assert s["methods"]["baseline"]["teacher_forward_s"] == 0
        # each run's split agrees with its result.json: student + forward + mask = its training loop
        for r in s["results"]:
            assert r["student_time_s"] + r["teacher_forward_time_s"] + r["mask_time_s"] == \
                pytest.approx(r["train_time_s"])
    assert lines[-1] == f"study/students: {studies[-1]['total']['ratio']:.2f}"
    assert lines[-2].startswith(f"floor {studies[-1]['total']['floor']:.2f}: ")

    # the bench only times: the same study run as `kdlab ablate` runs it gives the same numbers
    # (per-image: the mode with the most timed machinery; per-view goes through the same code)
    for s in studies[1:]:
        ref = tmp_path / f"ref-{s['mask_reuse']}"
        run_ablation(recipe, out_dir=ref, progress=False, log=lambda *a: None,
                     overrides=[f"mask.reuse={s['mask_reuse']}", "train.device=cpu", f"data.data_dir={out / 'data'}",
                                f"teacher.checkpoint={out / 'teacher' / 'best.pt'}"])
        want = {(r["method"], r["seed"]): (r["val_acc"], r["test_acc"], r["best_epoch"]) for r in s["results"]}
        got = {}
        for p in ref.glob("*/seed*/result.json"):
            r = json.loads(p.read_text())
            got[(r["method"], r["seed"])] = (r["val_acc"], r["test_acc"], r["best_epoch"])
        assert got == want

    # a folder holding finished runs is refused (they would be reused, not timed)
    with pytest.raises(ValueError, match="not empty"):
        bench_study(recipe, out, mask_reuse=["per-view"], log=lambda *a: None,
                    overrides=[f"data.data_dir={out / 'data'}", f"teacher.checkpoint={out / 'teacher' / 'best.pt'}"])


def test_study_options_need_study(capsys):
    assert main(["bench", "--mask-reuse", "per-image"]) == 2
    assert "--study only" in capsys.readouterr().err
    assert main(["bench", "--study", "digits/full", "--mask-reuse", "per-pixel", "--out", "/nonexistent/x"]) == 2
    assert "per-view and/or per-image" in capsys.readouterr().err
    for bad, says in ((["--mask-reuse", "per-view,per-view"], "each once"), (["--mask-reuse", ""], "each once"),
                      (["--synthetic-cifar", "64", "--data-dir", "/nonexistent/d"], "drop --data-dir")):
        assert main(["bench", "--study", "digits/full", "--out", "/nonexistent/x", *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # refused while parsing, naming the flag
        main(["bench", "--study", "digits/full", "--out", "/nonexistent/x", "--synthetic-cifar", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --synthetic-cifar: must be a whole number >= 10" in err


# --------------------------------------------------------------------------- generated CIFAR


def test_synthetic_cifar_is_official_format_and_loads(tmp_path):
    from kdlab.data.cifar import load_cifar_splits
    from kdlab.data.cifar_synthetic import write_synthetic_cifar

    folder = write_synthetic_cifar(tmp_path, n_train=120, n_test=30, seed=3)
    assert folder == tmp_path / "cifar-10-batches-py"
    sizes = []
    for k in range(1, 6):
        with open(folder / f"data_batch_{k}", "rb") as f:
            d = pickle.load(f, encoding="bytes")
        assert {b"data", b"labels", b"batch_label", b"filenames"} <= set(d)
        assert d[b"data"].dtype == np.uint8 and d[b"data"].shape[1] == 3072
        sizes.append(len(d[b"labels"]))
    assert sizes == [24] * 5
    with open(folder / "batches.meta", "rb") as f:
        assert len(pickle.load(f, encoding="bytes")[b"label_names"]) == 10
    s = load_cifar_splits("cifar10", tmp_path, val_fraction=0.0)
    assert s.train.x.shape == (120, 3, 32, 32) and s.test.x.shape == (30, 3, 32, 32)
    assert torch.bincount(s.train.y, minlength=10).tolist() == [12] * 10  # every class, evenly
    # the same seed writes the same bytes; another seed other images
    again = write_synthetic_cifar(tmp_path / "again", n_train=120, n_test=30, seed=3)
    assert (again / "data_batch_2").read_bytes() == (folder / "data_batch_2").read_bytes()
    other = write_synthetic_cifar(tmp_path / "other", n_train=120, n_test=30, seed=4)
    assert (other / "data_batch_2").read_bytes() != (folder / "data_batch_2").read_bytes()
    with pytest.raises(ValueError, match="at least 10"):
        write_synthetic_cifar(tmp_path / "few", n_train=5, n_test=30)


def test_synthetic_cifar_classes_are_found_by_a_matched_filter(tmp_path):
    """The class evidence is the class's grating on a patch somewhere in the image: correlating
    each image with every class's grating at every position (the matched filter) and taking the
    best class recovers the labels far above chance (10 %)."""
    from kdlab.data.cifar import load_cifar_splits
    from kdlab.data.cifar_synthetic import class_patterns, write_synthetic_cifar

    write_synthetic_cifar(tmp_path, n_train=100, n_test=100, seed=0)
    s = load_cifar_splits("cifar10", tmp_path, val_fraction=0.0)
    x = s.test.x.double() * 255.0 - 128.0
    pats = torch.from_numpy(class_patterns(10, 0))
    pats = pats / pats.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    score = F.conv2d(x, pats).flatten(2).amax(2)  # [N, 10]: best placement of each class
    acc = (score.argmax(1) == s.test.y).double().mean().item()
    assert acc > 0.8


# --------------------------------------------------------------------------- teacher cache: expect


def test_expected_layers_are_tapped_in_the_first_forward_and_change_nothing(tmp_path):
    """A store that expects layer stage2 lets `kd` (logits only) tap it in its own forward pass:
    the following `kd+fitnets` run (logits + stage2 features) then runs no teacher at all, and
    both runs end with exactly the numbers they get without `expect`."""
    from kdlab.train.recipe import recipe_from_dict
    from kdlab.distill.teachers import TeacherStore
    from kdlab.models import create_model
    from kdlab.train.build import train

    torch.manual_seed(0)
    teacher = create_model("cnn_small", num_classes=10, in_channels=1).eval()
    base = {"data": {"name": "digits", "val_fraction": 0.1, "augment": {"crop_pad": 1}},
            "student": {"model": "cnn_tiny"}, "teacher": {"model": "cnn_small"},
            "train": {"epochs": 1, "batch_size": 128, "seed": 0, "device": "cpu"}}
    kd = [{"term": "ce", "weight": 0.1}, {"term": "kd", "weight": 0.9}]
    recipes = {"kd": recipe_from_dict({"name": "kd", **base, "loss": kd}),
               "kd+fitnets": recipe_from_dict({"name": "kdf", **base, "loss": kd + [
                   {"term": "fitnets", "weight": 1.0, "layers": [["stage2", "stage2"]]}]})}
    results = {}
    for expect in (False, True):
        store = TeacherStore()
        if expect:
            store.expect(["stage2", "no_such_layer"])  # a layer the teacher lacks is skipped
        for name, r in recipes.items():
            misses = store.misses
            res = train(r, tmp_path / f"{expect}-{name}", teacher=teacher, progress=False, method=name,
                        teacher_cache=store)
            results[(expect, name)] = (res["val_acc"], res["test_acc"], res["test_loss"], store.misses - misses)
    steps = results[(False, "kd")][3]
    assert steps > 0
    assert results[(False, "kd+fitnets")][3] == steps  # without expect: a second forward per batch
    assert results[(True, "kd+fitnets")][3] == 0        # with it: every batch served
    for name in recipes:
        assert results[(True, name)][:3] == results[(False, name)][:3]
