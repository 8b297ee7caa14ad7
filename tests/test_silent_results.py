"""Issue 23, must-fix 3: silent wrong results. Each test reproduces one case that used to give a
wrong (or silently incomplete) result without a word, and asserts the one-line refusal or the
correct result instead. Runs are tiny (cnn_tiny on digits, 1-2 epochs; a few 8x8 PNGs)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.core.checkpoint import load_checkpoint
from kdlab.core.config import RecipeError
from kdlab.train.recipe import load_recipe

from reliab_fixtures import run_cli, snapshot, write_recipes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-epoch digits teacher (``teacher/``) and a 1-epoch KD student (``student/``)."""
    root = tmp_path_factory.mktemp("silent")
    write_recipes(root)
    from kdlab.cli.main import main

    assert main(["distill", str(root / "student.yaml"), "--out", str(root / "student"), "--quiet"]) == 0
    return root


def one_line(rc, err):
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("kdlab: error:"), (rc, err)


# ---------------------------------------------------------------- teacher of another data set
def _other_data_teacher(base, tmp_path) -> Path:
    """The digits teacher's weights, recorded as trained on mnist5k (same classes, same channels:
    what an mnist5k teacher looks like to the old class/channel check)."""
    ck = load_checkpoint(base / "teacher" / "best.pt")
    ck["dataset"] = "mnist5k"
    path = tmp_path / "downloads" / "mnist5k_teacher.pt"
    path.parent.mkdir(parents=True)
    torch.save(ck, path)
    return path


def test_teacher_of_another_data_set_is_refused_with_an_override(base, tmp_path, capsys):
    t = _other_data_teacher(base, tmp_path)
    write_recipes(tmp_path / "r", ckpt=str(t))
    rc, _, err = run_cli(["distill", tmp_path / "r" / "student.yaml", "--out", tmp_path / "s", "--quiet"], capsys)
    one_line(rc, err)
    assert "mnist5k" in err and "digits" in err and "teacher.allow_other_dataset" in err
    assert not (tmp_path / "s" / "best.pt").exists()
    rc, _, err = run_cli(["distill", tmp_path / "r" / "student.yaml", "--out", tmp_path / "s", "--quiet",
                          "--set", "teacher.allow_other_dataset=true"], capsys)
    assert rc == 0, err


def test_evaluate_and_prune_teacher_check_the_data_set(base, tmp_path, capsys):
    t = _other_data_teacher(base, tmp_path)
    rc, _, err = run_cli(["evaluate", t, "--dataset", "digits", "--device", "cpu"], capsys)
    one_line(rc, err)
    assert "--allow-other-dataset" in err
    rc, out, err = run_cli(["evaluate", t, "--dataset", "digits", "--device", "cpu", "--allow-other-dataset"], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["prune", base / "student" / "best.pt", "--sparsity", "0.5", "--finetune-epochs", "1",
                          "--max-steps", "1", "--distill", "teacher", "--teacher", t, "--out", tmp_path / "p",
                          "--repeats", "1", "--warmup", "0"], capsys)
    one_line(rc, err)
    assert str(t) in err and "mnist5k" in err


def test_recipe_identity_unchanged_by_the_override_key(base):
    """Runs made before teacher.allow_other_dataset existed keep their identity (no retraining)."""
    r = load_recipe(str(base / "student.yaml"))
    assert "allow_other_dataset" not in r.to_dict()["teacher"]


# ---------------------------------------------------------------- 16-bit PNGs, class names
def _png_folder(root: Path, classes, value16=None, n=10, size=(8, 8), seed=0) -> Path:
    """``root/<class>/*.png``: 16-bit grey PNGs of the constant ``value16``, or 8-bit grey images
    with a class-dependent brightness (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if value16 is not None:
                a = np.full(size, value16, dtype=np.uint16)
            else:
                a = np.clip(rng.normal(60 + 120 * k, 20, size), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def test_16bit_png_decodes_to_its_value_not_white(tmp_path):
    from PIL import Image

    from kdlab.data import load_dataset

    root = _png_folder(tmp_path / "img", ["a", "b"], value16=20000)
    assert Image.open(next((root / "a").glob("*.png"))).mode == "I;16"
    splits = load_dataset("imagefolder", root=str(root), image_size=[8, 8], val_fraction=0.1)
    x, _ = splits.train[0]
    assert x.shape == (1, 8, 8)
    assert torch.allclose(x, torch.full_like(x, 20000 / 65535), atol=1e-6), float(x.mean())


def _imagefolder_recipe(path: Path, root: Path) -> Path:
    path.write_text(f"name: imf\ndata: {{name: imagefolder, root: {root}, image_size: [8, 8]}}\n"
                    f"student: {{model: cnn_tiny}}\ntrain: {{epochs: 2, patience: null, batch_size: 8, lr: 0.05}}\n")
    return path


def test_checkpoint_on_folder_with_other_class_names_is_refused_or_mapped(tmp_path, capsys):
    train_root = _png_folder(tmp_path / "cats_dogs", ["cat", "dog"])
    r = _imagefolder_recipe(tmp_path / "imf.yaml", train_root)
    rc, _, err = run_cli(["train-teacher", r, "--out", tmp_path / "run", "--quiet"], capsys)
    assert rc == 0, err
    best = tmp_path / "run" / "best.pt"
    assert load_checkpoint(best)["classes"] == ["cat", "dog"]

    other = _png_folder(tmp_path / "ants_bees", ["ant", "bee"])
    rc, _, err = run_cli(["evaluate", best, "--dataset", "imagefolder", "--data-dir", other,
                          "--image-size", "8", "8", "--device", "cpu"], capsys)
    one_line(rc, err)
    assert "class names" in err and "cat" in err and "ant" in err

    rc, out, err = run_cli(["evaluate", best, "--dataset", "imagefolder", "--data-dir", train_root,
                            "--image-size", "8", "8", "--device", "cpu"], capsys)
    assert rc == 0, err
    ref = json.loads(out.strip().splitlines()[-1])
    # the same model with its outputs stored in the other order, and its classes recorded so:
    # evaluated on the same folder it is read by name, with the same accuracy
    ck = load_checkpoint(best)
    fc = [k for k in ck["model"] if k.endswith("weight") and ck["model"][k].dim() == 2][-1]
    bias = fc[:-len("weight")] + "bias"
    ck["model"][fc] = ck["model"][fc].flip(0)
    if bias in ck["model"]:
        ck["model"][bias] = ck["model"][bias].flip(0)
    ck["classes"] = ["dog", "cat"]
    swapped = tmp_path / "swapped.pt"
    torch.save(ck, swapped)
    rc, out, err = run_cli(["evaluate", swapped, "--dataset", "imagefolder", "--data-dir", train_root,
                            "--image-size", "8", "8", "--device", "cpu"], capsys)
    assert rc == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["classes_mapped"] is True and got["acc"] == ref["acc"] and got["loss"] == pytest.approx(ref["loss"])


# ---------------------------------------------------------------- recipes
def test_duplicate_yaml_key_names_the_key_and_line(tmp_path, capsys):
    r = tmp_path / "dup.yaml"
    r.write_text("name: dup\ndata: {name: digits}\nstudent: {model: cnn_tiny}\n"
                 "train:\n  epochs: 5\n  lr: 0.1\ntrain:\n  epochs: 1\n")
    with pytest.raises(RecipeError, match=r"line 7: key 'train' appears twice .*first on line 4"):
        load_recipe(str(r))
    rc, _, err = run_cli(["train-teacher", r, "--out", tmp_path / "o", "--quiet"], capsys)
    one_line(rc, err)
    assert str(r) in err and "'train'" in err and "line 7" in err
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: n\nstudent: {model: cnn_tiny}\ntrain: {epochs: 1, lr: 0.1, lr: 0.2}\n")
    with pytest.raises(RecipeError, match="key 'lr' appears twice"):
        load_recipe(str(nested))


def test_negative_loss_weight_is_refused(tmp_path, capsys):
    r = tmp_path / "neg.yaml"
    r.write_text("name: neg\ndata: {name: digits}\nstudent: {model: cnn_tiny}\n"
                 "loss: [{term: ce, weight: 1.0}, {term: ls, weight: -0.5}]\n")
    with pytest.raises(RecipeError, match=r"loss\[1\]\.weight"):
        load_recipe(str(r))
    rc, _, err = run_cli(["train-teacher", r, "--out", tmp_path / "o", "--quiet"], capsys)
    one_line(rc, err)
    assert "loss[1].weight" in err
    from kdlab.lm.objective import parse_terms

    with pytest.raises(ValueError, match=r"loss\[0\]\.weight"):
        parse_terms([{"term": "fkl", "weight": -1}])


def test_loss_term_listed_twice_has_two_log_columns(base, tmp_path, capsys):
    """KD at T=4 and at T=1: each has its own column, and the logged loss is the weighted sum of
    the logged terms (per-epoch means are linear)."""
    r = tmp_path / "twice.yaml"
    r.write_text(f"extends: digits/kd\nname: twice\n"
                 f"teacher: {{model: cnn_tiny, checkpoint: {base / 'teacher' / 'best.pt'}}}\n"
                 f"loss: [{{term: ce, weight: 0.2}}, {{term: kd, weight: 0.5, T: 4.0}}, {{term: kd, weight: 0.3, T: 1.0}}]\n"
                 f"train: {{epochs: 1, patience: null}}\n")
    rc, _, err = run_cli(["distill", r, "--out", tmp_path / "s", "--quiet"], capsys)
    assert rc == 0, err
    row = next(csv.DictReader(open(tmp_path / "s" / "metrics.csv")))
    assert "kd" in row and "kd#2" in row
    ce, kd4, kd1, loss = (float(row[k]) for k in ("ce", "kd", "kd#2", "loss"))
    assert kd4 != kd1
    assert loss == pytest.approx(0.2 * ce + 0.5 * kd4 + 0.3 * kd1, rel=1e-5)


# ---------------------------------------------------------------- study files
@pytest.fixture(scope="module")
def study(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "st"
    from kdlab.cli.main import main

    assert main(["ablate", str(base / "student.yaml"), "--seeds", "0", "--out", str(out), "--quiet"]) == 0
    return out


def test_missing_best_pt_in_robustness_study_is_named(study, tmp_path, capsys):
    st = shutil.copytree(study, tmp_path / "st")
    (st / "kd" / "seed0" / "best.pt").unlink()
    before = snapshot(st)
    rc, _, err = run_cli(["robustness", "--study", st, "--corruptions", "gaussian_noise", "--severities", "1",
                          "--limit", "20", "--device", "cpu", "--quiet"], capsys)
    one_line(rc, err)
    assert str(st / "kd" / "seed0" / "best.pt") in err
    assert snapshot(st) == before


def test_truncated_teacher_result_is_named_not_dropped(base, tmp_path):
    from kdlab.core.io import RunFileError
    from kdlab.report.tables import teacher_accuracy

    t = shutil.copytree(base / "teacher", tmp_path / "teacher")
    write_recipes(tmp_path / "r", ckpt=str(t / "best.pt"))
    recipes = {"kd": load_recipe(str(tmp_path / "r" / "student.yaml"))}
    want = json.loads((t / "result.json").read_text())["test_acc"]
    assert teacher_accuracy(recipes) == want
    text = (t / "result.json").read_text()
    (t / "result.json").write_text(text[: len(text) // 2])
    with pytest.raises(RunFileError, match=str(t / "result.json")):
        teacher_accuracy(recipes)
    (t / "result.json").unlink()  # a lone teacher file: no accuracy, no column (not an error)
    assert teacher_accuracy(recipes) is None


# ---------------------------------------------------------------- fp16 teacher cache
def test_teacher_beyond_float16_range_is_named_not_blamed_on_lr(base, tmp_path, capsys):
    ck = load_checkpoint(base / "teacher" / "best.pt")
    fc = [k for k in ck["model"] if k.endswith("weight") and ck["model"][k].dim() == 2][-1]
    ck["model"][fc] = ck["model"][fc] * 1e5  # logits of order 1e5: finite in fp32, inf in fp16
    big = tmp_path / "big_teacher.pt"
    torch.save(ck, big)
    from kdlab.models.adapters import load_model
    from kdlab.data import load_dataset

    model, _ = load_model(big)
    x = load_dataset("digits").train.x[:64]
    logits = model((x - 0.5) / 0.5)  # the scale is what matters: |logits| > 65504
    assert torch.isfinite(logits).all() and logits.abs().max() > 65504
    write_recipes(tmp_path / "r", ckpt=str(big))
    rc, _, err = run_cli(["distill", tmp_path / "r" / "student.yaml", "--out", tmp_path / "s", "--quiet"], capsys)
    one_line(rc, err)
    assert "float16" in err and "cache-fp32" in err and "train.lr" not in err
    rc, _, err = run_cli(["distill", tmp_path / "r" / "student.yaml", "--out", tmp_path / "s32", "--quiet",
                          "--set", "train.teacher_mode=cache-fp32"], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------- killed prune
def test_rerun_of_killed_prune_removes_its_temporary_files(base, tmp_path, capsys):
    """A prune killed while writing leaves ``<file>.<random>.tmp`` files (the atomic writes'); the
    next run in that folder removes them (under the folder's lock), and writes its files."""
    out = tmp_path / "p"
    out.mkdir()
    left = [out / "pruned_unstructured50.pt.k3j9x2.tmp", out / "prune.json.q8w1z0.tmp",
            out / "original.pt.a1b2c3.tmp"]
    for f in left:
        f.write_bytes(b"half a file")
    args = ["prune", base / "student" / "best.pt", "--sparsity", "0.5", "--finetune-epochs", "0",
            "--out", out, "--repeats", "1", "--warmup", "0"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 0, err
    assert not [f for f in left if f.exists()]
    assert not list(out.rglob("*.tmp")) and (out / "pruned_unstructured50.pt").is_file()
    assert not (out / ".kdlab.lock").exists()


def test_loss_term_listed_twice_keeps_its_ablation_methods(base, tmp_path):
    """Leave-one-out over [ce, kd T=4, kd T=1]: both 'leave a kd out' methods exist (one used to
    overwrite the other), each dropping its own term; two ce terms are refused."""
    from kdlab.experiments.study import ablation_methods

    r = tmp_path / "twice.yaml"
    r.write_text(f"extends: digits/kd\nname: twice\n"
                 f"teacher: {{model: cnn_tiny, checkpoint: {base / 'teacher' / 'best.pt'}}}\n"
                 f"loss: [{{term: ce, weight: 0.2}}, {{term: kd, weight: 0.5, T: 4.0}}, {{term: kd, weight: 0.3, T: 1.0}}]\n")
    full = load_recipe(str(r))
    m = ablation_methods(full, "loo")
    assert set(m) == {"full", "full-kd", "full-kd#2"}
    kept = lambda name: [(t.term, t.params.get("T")) for t in m[name].loss if t.term != "ce"]  # noqa: E731
    assert kept("full-kd") == [("kd", 1.0)] and kept("full-kd#2") == [("kd", 4.0)]
    ladder = ablation_methods(full, "ladder")
    assert set(ladder) == {"baseline", "kd", "full"} and len(ladder["full"].loss) == 3
    r.write_text(r.read_text().replace("{term: kd, weight: 0.3, T: 1.0}", "{term: ce, weight: 0.3}"))
    with pytest.raises(ValueError, match="'ce' term 2 times"):
        ablation_methods(load_recipe(str(r)), "loo")
