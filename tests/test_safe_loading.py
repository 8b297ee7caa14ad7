"""Issue 23, must-fix 1: loading a checkpoint never runs code from it, and safetensors works
wherever a checkpoint is read.

A planted ``.pt`` whose pickle calls ``os.system("touch MARKER")`` (and one calling ``exec``) is
given to every reader (profile, evaluate, distill's teacher, prune --teacher, student.weights, a
resumed ``last.pt``): each must refuse it with one ``kdlab: error:`` line, exit 2, and the marker
must not exist afterwards. A control proves the planted file is live: an unsafe ``torch.load``
does create the marker. Runs are tiny (cnn_tiny on digits, 1-2 epochs).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kdlab.core.checkpoint import CheckpointError, convert_trusted, load_checkpoint, read_safetensors
from kdlab.models.adapters import check_program, export_program, load_model

from reliab_fixtures import python_env, run_cli, snapshot, write_recipes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-epoch teacher (``teacher/``) and a finished 1-epoch KD student (``student/``)."""
    root = tmp_path_factory.mktemp("safe")
    write_recipes(root)
    from kdlab.cli.main import main

    assert main(["distill", str(root / "student.yaml"), "--out", str(root / "student"), "--quiet"]) == 0
    return root


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def plant(path: Path, marker: Path, how: str = "system", **keys) -> Path:
    """A kdlab-looking checkpoint whose unpickling creates ``marker``."""
    payload = (_System(f"touch '{marker}'") if how == "system"
               else _Exec(f"open({str(marker)!r}, 'w').write('ran')"))
    ck = {"model": {}, "model_name": "cnn_tiny", "model_kwargs": {}, "num_classes": 10,
          "in_channels": 1, "dataset": "digits", "payload": payload, **keys}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, path)
    return path


def _refused(rc, err, path, marker):
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kdlab: error:"), err
    assert str(path) in err and "refused" in err, err
    assert not marker.exists(), "the planted pickle ran"


def test_planted_file_is_live(tmp_path):
    """Control: the planted file does run code under an unsafe load (so the tests below can fail)."""
    for how in ("system", "exec"):
        marker = tmp_path / f"ran-{how}"
        evil = plant(tmp_path / f"evil-{how}.pt", marker, how)
        code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
        subprocess.run([sys.executable, "-c", code], env=python_env(), check=False, capture_output=True)
        assert marker.exists()


@pytest.mark.parametrize("how", ["system", "exec"])
def test_profile_and_evaluate_refuse_planted_pickle(tmp_path, capsys, how):
    marker = tmp_path / "MARKER"
    evil = plant(tmp_path / "downloads" / "model.pt", marker, how)
    rc, _, err = run_cli(["profile", evil, "--out", tmp_path / "p", "--no-latency"], capsys)
    _refused(rc, err, evil, marker)
    assert ("posix.system" in err or "nt.system" in err) if how == "system" else "object exec" in err
    rc, _, err = run_cli(["evaluate", evil], capsys)
    _refused(rc, err, evil, marker)
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_teacher_in_distill_refuses_planted_pickle(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = plant(tmp_path / "downloads" / "teacher.pt", marker)
    write_recipes(tmp_path, ckpt=str(evil))
    rc, _, err = run_cli(["distill", tmp_path / "student.yaml", "--out", tmp_path / "s", "--quiet"], capsys)
    _refused(rc, err, evil, marker)
    assert not (tmp_path / "s" / "best.pt").exists()


def test_student_weights_refuse_planted_pickle(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = plant(tmp_path / "downloads" / "init.pt", marker)
    (tmp_path / "r.yaml").write_text(
        f"name: w\ndata: {{name: digits}}\nstudent: {{model: cnn_tiny, weights: {evil}}}\n"
        f"train: {{epochs: 1, patience: null}}\n")
    rc, _, err = run_cli(["train-teacher", tmp_path / "r.yaml", "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(evil) in err and not marker.exists()


def test_prune_teacher_refuses_planted_pickle(base, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = plant(tmp_path / "downloads" / "teacher.pt", marker)
    rc, _, err = run_cli(["prune", base / "student" / "best.pt", "--sparsity", "0.5",
                          "--finetune-epochs", "1", "--max-steps", "1", "--distill", "teacher",
                          "--teacher", evil, "--out", tmp_path / "p", "--repeats", "1", "--warmup", "0"], capsys)
    _refused(rc, err, evil, marker)


def test_resume_refuses_planted_last_pt(base, tmp_path, capsys):
    """An unfinished run folder whose last.pt was replaced: the resume refuses it, runs nothing,
    changes nothing."""
    import shutil

    out = tmp_path / "s"
    shutil.copytree(base / "student", out)
    (out / "result.json").unlink()
    marker = tmp_path / "MARKER"
    ck = torch.load(out / "last.pt", weights_only=True)
    plant(out / "last.pt", marker, payload_models=ck["models"], recipe=ck["recipe"])
    before = snapshot(out)
    rc, _, err = run_cli(["distill", base / "student.yaml", "--out", out, "--quiet"], capsys)
    _refused(rc, err, out / "last.pt", marker)
    assert snapshot(out) == before


def test_convert_trusted_makes_a_file_kdlab_loads(tmp_path):
    """The way out the refusal names, for a file the user trusts: numpy values become plain ones;
    an object that is not data is refused by name."""
    import numpy as np

    src = tmp_path / "old.pt"
    w = torch.randn(3, 2)
    torch.save({"model": {"w": w}, "val": {"acc": np.float64(0.5)}, "n": np.int64(3)}, src)
    with pytest.raises(CheckpointError, match="holds the Python object"):
        load_checkpoint(src)
    dst = convert_trusted(src)
    ck = load_checkpoint(dst)
    assert torch.equal(ck["model"]["w"], w) and ck["val"]["acc"] == 0.5 and type(ck["n"]) is int
    marker = tmp_path / "MARKER"
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "obj": zipfile.ZipInfo("x")}, bad)
    with pytest.raises(CheckpointError, match="zipfile.ZipInfo"):
        convert_trusted(bad)
    assert not marker.exists()


# ---------------------------------------------------------------- exported programs
def _program_bytes():
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(144, 10))
    return export_program(m, torch.zeros(2, 1, 8, 8))


def _edit_archive(data: bytes, edit) -> bytes:
    """A copy of a torch.export archive with ``models/model.json`` passed through ``edit``."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            raw = src.read(info.filename)
            if info.filename.endswith("models/model.json"):
                raw = json.dumps(edit(json.loads(raw))).encode()
            dst.writestr(info, raw)
    return buf.getvalue()


def _nodes(model):
    return model["graph_module"]["graph"]["nodes"]


def test_own_program_passes_the_check_and_a_forged_one_is_refused(tmp_path, capsys):
    """torch.export.load resolves call targets by name under ``torch`` (``torch.os.system`` is
    os.system) and parses shape expressions with sympify (eval): a forged program is refused before
    loading; kdlab's own program loads."""
    good = _program_bytes()
    check_program(good)

    def target(model):
        _nodes(model)[0]["target"] = "torch.os.system"
        return model

    def expr(model):
        vals = model["graph_module"]["graph"]["tensor_values"]
        for v in vals.values():
            for s in v.get("sizes", []):
                if "as_expr" in s:
                    s["as_expr"]["expr_str"] = "__import__('os').system('touch x')"
        return model

    for edit, word in ((target, "torch.os.system"), (expr, "shape expression")):
        forged = _edit_archive(good, edit)
        with pytest.raises(ValueError, match=word.replace(".", r"\.")):
            check_program(forged)
        path = tmp_path / f"forged-{word[:5]}.pt"
        torch.save({"model": {}, "model_name": None, "model_kwargs": {}, "num_classes": 10,
                    "in_channels": 1, "dataset": "x", "program": forged, "input_shape": [1, 8, 8]}, path)
        rc, _, err = run_cli(["evaluate", path, "--dataset", "digits"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and str(path) in err, err
        assert "refused" in err


def test_program_with_pickled_weights_is_refused():
    def weights_pickled(data):
        src = zipfile.ZipFile(io.BytesIO(data))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as dst:
            for info in src.infolist():
                raw = src.read(info.filename)
                if info.filename.endswith("model_weights_config.json"):
                    cfg = json.loads(raw)
                    next(iter(cfg["config"].values()))["use_pickle"] = True
                    raw = json.dumps(cfg).encode()
                dst.writestr(info, raw)
        return buf.getvalue()

    with pytest.raises(ValueError, match="pickle"):
        check_program(weights_pickled(_program_bytes()))


# ---------------------------------------------------------------- safetensors round trip
def test_safetensors_round_trip_profile_evaluate_teacher(base, tmp_path, capsys):
    """export --format safetensors, then profile, evaluate (same accuracy as the .pt) and distill
    with it as the teacher (the same student, bit for bit, as with the .pt teacher)."""
    t_pt = base / "teacher" / "best.pt"
    st = tmp_path / "teacher.safetensors"
    rc, out, err = run_cli(["export", t_pt, "--format", "safetensors", "--model-out", st,
                            "--out", tmp_path / "exp"], capsys)
    assert rc == 0, err
    ck_pt, ck_st = load_checkpoint(t_pt), read_safetensors(st)
    assert ck_st["model"].keys() == ck_pt["model"].keys()
    assert all(torch.equal(ck_st["model"][k], ck_pt["model"][k]) for k in ck_pt["model"])
    for key in ("model_name", "model_kwargs", "num_classes", "in_channels", "dataset"):
        assert ck_st[key] == ck_pt[key], key
    # no pickle anywhere: the header is JSON, the rest raw bytes
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["kdlab"] == "model/1"

    rc, out, err = run_cli(["profile", st, "--out", tmp_path / "prof", "--no-latency"], capsys)
    assert rc == 0, err
    prof = json.loads((tmp_path / "prof" / "profile.json").read_text())
    n_params = sum(v.numel() for k, v in ck_pt["model"].items() if "running" not in k and "num_batches" not in k)
    assert str(prof).count(str(n_params)) >= 1

    rc, out_st, err = run_cli(["evaluate", st, "--device", "cpu"], capsys)
    assert rc == 0, err
    rc, out_pt, err = run_cli(["evaluate", t_pt, "--device", "cpu"], capsys)
    assert rc == 0, err
    assert out_st.replace(str(st), "X") == out_pt.replace(str(t_pt), "X")

    model_st, _ = load_model(st)
    model_pt, _ = load_model(t_pt)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model_st(x), model_pt(x))

    write_recipes(tmp_path / "r", ckpt=str(st))
    rc, _, err = run_cli(["distill", tmp_path / "r" / "student.yaml", "--out", tmp_path / "s", "--quiet"], capsys)
    assert rc == 0, err
    res_st = json.loads((tmp_path / "s" / "result.json").read_text())
    res_pt = json.loads((base / "student" / "result.json").read_text())
    for k in ("test_acc", "val_acc", "val_loss", "best_epoch"):
        assert res_st[k] == res_pt[k], k
    w_st, w_pt = load_checkpoint(tmp_path / "s" / "best.pt")["model"], load_checkpoint(base / "student" / "best.pt")["model"]
    assert w_st.keys() == w_pt.keys() and all(torch.equal(w_st[k], w_pt[k]) for k in w_st)


def test_foreign_safetensors_is_refused_as_checkpoint_but_loads_as_weights(base, tmp_path, capsys):
    from safetensors.torch import save_file

    from kdlab.models.adapters import build_model

    ck = load_checkpoint(base / "teacher" / "best.pt")
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in ck["model"].items()}, str(plain))
    rc, _, err = run_cli(["evaluate", plain], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "without kdlab's metadata" in err, err
    m = build_model("cnn_tiny", 10, 1, {}, weights=str(plain))
    assert all(torch.equal(m.state_dict()[k], ck["model"][k]) for k in ck["model"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rc, _, err = run_cli(["profile", garbage, "--no-latency", "--out", tmp_path / "g"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(garbage) in err, err


def test_cifar_batch_that_runs_code_is_refused(tmp_path):
    """CIFAR's official files are pickles people download: one naming os.system is refused before it
    runs; the real format (numpy arrays, bytes keys) still loads."""
    import pickle

    from cifar_fixtures import write_fake_cifar10

    from kdlab.data import load_dataset

    folder = write_fake_cifar10(tmp_path / "ok")
    splits = load_dataset("cifar10", tmp_path / "ok", val_fraction=0.1)
    assert splits.info.num_classes == 10 and splits.train.x.shape[1:] == (3, 32, 32)
    marker = tmp_path / "MARKER"
    bad = tmp_path / "bad" / folder.name
    bad.parent.mkdir()
    import shutil

    shutil.copytree(folder, bad)
    with open(bad / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _System(f"touch '{marker}'")}, f, protocol=2)
    with pytest.raises(ValueError, match="posix.system|nt.system") as e:
        load_dataset("cifar10", tmp_path / "bad", val_fraction=0.1)
    assert str(bad / "data_batch_1") in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not marker.exists()


# ---------------------------------------------------------------- must-fix 2: nothing lost
def _no_tmp(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_failed_export_keeps_the_previous_file_and_names_the_path(base, tmp_path, capsys, monkeypatch, fmt):
    """A write that fails half-way (disk full) leaves the previous valid file byte-identical, no
    temporary file, and one error line naming the path."""
    import errno

    import kdlab.compress.export as ex
    import kdlab.core.io as kio

    target = tmp_path / f"model.{fmt}"
    rc, _, err = run_cli(["export", base / "teacher" / "best.pt", "--format", fmt, "--model-out", target,
                          "--out", tmp_path / "e1"], capsys)
    assert rc == 0, err
    before = target.read_bytes()

    def half(f, data):  # the ONNX writer: half the bytes, then the disk is full
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def full(fd):  # every format: the data reached the file, fsync finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")

    if fmt == "onnx":
        monkeypatch.setattr(ex, "write_model_bytes", half)
    else:
        monkeypatch.setattr(kio.os, "fsync", full)
    rc, _, err = run_cli(["export", base / "student" / "best.pt", "--format", fmt, "--model-out", target,
                          "--out", tmp_path / "e2"], capsys)
    monkeypatch.undo()
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(target) in err and "No space left" in err, err
    assert target.read_bytes() == before
    assert _no_tmp(tmp_path)


@pytest.mark.parametrize("opset", [1, 13, 17, 20])
def test_opset_is_honoured_or_refused(base, tmp_path, capsys, opset):
    """The exporter used to keep opset 18 silently when asked for another: now the file has the
    opset asked for, or the command refuses in one line and writes no model."""
    import onnx

    target = tmp_path / "m.onnx"
    rc, _, err = run_cli(["export", base / "teacher" / "best.pt", "--opset", str(opset), "--model-out",
                          target, "--out", tmp_path / "e"], capsys)
    if rc == 0:
        got = [o.version for o in onnx.load(str(target)).opset_import if o.domain in ("", "ai.onnx")]
        assert got == [opset]
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and f"--opset {opset}" in err, err
        assert not target.exists()
    if opset == 1:
        assert rc == 2 and "out of range" in err
    if opset == 20:  # up-conversion from 18 handles cnn_tiny
        assert rc == 0, err


def test_run_names_cannot_escape_the_output_folder(tmp_path, capsys, monkeypatch):
    """A recipe name (or --set name=...) like ../../escaped names a folder: refused in one line,
    nothing written outside; a study method name likewise."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "r.yaml").write_text("name: ../../escaped\ndata: {name: digits}\nstudent: {model: cnn_tiny}\n"
                                 "train: {epochs: 1, patience: null}\n")
    (work / "ok.yaml").write_text("name: fine\ndata: {name: digits}\nstudent: {model: cnn_tiny}\n"
                                  "train: {epochs: 1, patience: null}\n")
    for args in (["train-teacher", "r.yaml", "--quiet"],
                 ["train-teacher", "ok.yaml", "--set", "name=../../escaped", "--quiet"],
                 ["train-teacher", "ok.yaml", "--set", "name=/tmp/abs", "--quiet"]):
        rc, _, err = run_cli(args, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "recipe name" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "ok.yaml", "r.yaml"]

    from kdlab.train.recipe import load_recipe
    from kdlab.experiments.study import run_study

    r = load_recipe(str(work / "ok.yaml"))
    with pytest.raises(ValueError, match="outside the output folder"):
        run_study({"../../evil": r}, work / "study", seeds=[0], progress=False, log=lambda *a: None)
    assert not (tmp_path / "evil").exists() and not (work / "study" / "..").resolve().joinpath("evil").exists()

    from kdlab.core.config import RecipeError
    from kdlab.lm.recipe import load_lm_recipe

    (work / "lm.yaml").write_text("extends: lm/docs\nname: x\nstudy: {methods: {'../../evil': {}}}\n")
    with pytest.raises((RecipeError, ValueError), match="study method"):
        load_lm_recipe(str(work / "lm.yaml"))
