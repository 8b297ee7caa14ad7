"""The bad-input suite (issue 11): every case runs ``kdlab.cli.main.main([...])`` in-process from a
fresh folder and must exit with code 2, print exactly one line on stderr (``kdlab: error: ...``),
and leave every file that was present before byte-identical.

``python tests/test_bad_inputs.py`` prints the table of cases with their outcome (clear /
traceback / data lost / accepted), which is how the before/after counts of the issue were taken.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliab_fixtures import changed, clone, snapshot, spawn, wait_line, write_recipes  # noqa: E402

CASES: dict = {}


def case(name, group, expect=None):
    """Register a case; ``expect``: a fragment the one line must contain (the file, key or fix it
    has to name), else the outcome is ``unclear``."""
    def deco(fn):
        CASES[name] = (group, fn, expect)
        return fn
    return deco


def recipe(tmp: Path, text: str, name: str = "r.yaml") -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


def student(tmp: Path, base: Path, extra: str) -> str:
    """A copy of the base student recipe with ``extra`` YAML merged over it."""
    return recipe(tmp, f"extends: {base / 'student.yaml'}\n{extra}\n")


D = ["--quiet"]

# ------------------------------------------------------------------------------------------ recipes
case("recipe name that does not exist", "recipe")(lambda t, b: ["distill", "no/such/recipe", *D])
case("recipe path is a folder", "recipe", 'is a folder')(lambda t, b: ["distill", str(t), *D])


@case("binary recipe file", "recipe", 'bin.yaml')
def _(t, b):
    (t / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    return ["distill", str(t / "bin.yaml"), *D]


case("empty recipe file", "recipe")(lambda t, b: ["distill", recipe(t, ""), *D])
case("recipe is a YAML list", "recipe")(lambda t, b: ["distill", recipe(t, "- a\n- b\n"), *D])
case("YAML syntax error", "recipe")(lambda t, b: ["distill", recipe(t, "name: [unclosed\n"), *D])
case("extends a missing file", "recipe", 'r.yaml: extends')(lambda t, b: ["distill", recipe(t, "extends: nope.yaml\nname: x\n"), *D])


@case("extends cycle", "recipe")
def _(t, b):
    recipe(t, "extends: b.yaml\nname: a\n", "a.yaml")
    recipe(t, "extends: a.yaml\nname: b\n", "b.yaml")
    return ["distill", str(t / "a.yaml"), *D]


case("unknown top-level key", "recipe")(lambda t, b: ["distill", student(t, b, "trian: {epochs: 1}"), *D])
case("unknown train key", "recipe")(lambda t, b: ["distill", student(t, b, "train: {lrr: 0.1}"), *D])
case("train.epochs is text", "recipe")(lambda t, b: ["distill", student(t, b, "train: {epochs: abc}"), *D])
case("train.epochs 0", "recipe")(lambda t, b: ["distill", student(t, b, "train: {epochs: 0}"), *D])
case("train.lr negative", "recipe")(lambda t, b: ["distill", student(t, b, "train: {lr: -1}"), *D])
case("data.val_fraction 1.5", "recipe")(lambda t, b: ["distill", student(t, b, "data: {val_fraction: 1.5}"), *D])
case("unknown data set", "recipe")(lambda t, b: ["distill", student(t, b, "data: {name: mnist}"), *D])
case("unknown student model", "recipe")(lambda t, b: ["distill", student(t, b, "student: {model: nosuch}"), *D])
case("unknown student kwarg", "recipe")(lambda t, b: ["distill", student(t, b, "student: {kwargs: {foo: 1}}"), *D])
case("loss: []", "recipe")(lambda t, b: ["distill", student(t, b, "loss: []"), *D])
case("unknown loss term", "recipe", '`kdlab losses`')(lambda t, b: ["distill", student(t, b, "loss: [{term: kdd}]"), *D])
case("unknown term parameter", "recipe")(lambda t, b: ["distill", student(t, b, "loss: [{term: kd, Tx: 2}]"), *D])
case("kd T negative", "recipe")(lambda t, b: ["distill", student(t, b, "loss: [{term: kd, T: -1}]"), *D])
case("kd T is text", "recipe", 'needs a number')(lambda t, b: ["distill", student(t, b, "loss: [{term: kd, T: hot}]"), *D])
case("attn layers: 3", "recipe", 'layers must be')(lambda t, b: ["distill", student(t, b, "loss: [{term: attn, layers: 3}]\nmask: {method: grad}"), *D])
case("attn layers entry of one name in a list", "recipe")(
    lambda t, b: ["distill", student(t, b, "loss: [{term: attn, layers: [[a]]}]\nmask: {method: grad}"), *D])
case("loss entry without term", "recipe")(lambda t, b: ["distill", student(t, b, "loss: [{weight: 1}]"), *D])
case("term weight is text", "recipe")(lambda t, b: ["distill", student(t, b, "loss: [{term: ce, weight: heavy}]"), *D])
case("kd without a teacher section", "recipe")(lambda t, b: ["distill", student(t, b, "teacher: null"), *D])
case("attn without a mask section", "recipe")(
    lambda t, b: ["distill", student(t, b, "loss: [{term: attn, layers: [[stage2, layer2]]}]\nmask: null"), *D])
case("mask.method unknown", "recipe")(lambda t, b: ["distill", student(t, b, "mask: {method: foo}"), *D])
case("mask.q 2", "recipe")(lambda t, b: ["distill", student(t, b, "mask: {q: 2}"), *D])
case("train.device tpu", "recipe")(lambda t, b: ["distill", student(t, b, "train: {device: tpu}"), *D])
case("train.optimizer rmsprop", "recipe")(lambda t, b: ["distill", student(t, b, "train: {optimizer: rmsprop}"), *D])
case("train.schedule linear", "recipe")(lambda t, b: ["distill", student(t, b, "train: {schedule: linear}"), *D])
case("train.amp fp8", "recipe")(lambda t, b: ["distill", student(t, b, "train: {amp: fp8}"), *D])
case("train.teacher_mode unknown", "recipe")(lambda t, b: ["distill", student(t, b, "train: {teacher_mode: foo}"), *D])
case("train.patience 0", "recipe")(lambda t, b: ["distill", student(t, b, "train: {patience: 0}"), *D])
case("train.batch_size 0", "recipe")(lambda t, b: ["distill", student(t, b, "train: {batch_size: 0}"), *D])
case("train.threads 0", "recipe")(lambda t, b: ["distill", student(t, b, "train: {threads: 0}"), *D])
case("teacher.recipe missing", "recipe", 'teacher.recipe')(
    lambda t, b: ["distill", student(t, b, f"teacher: {{checkpoint: {t / 'x' / 'best.pt'}, recipe: nope.yaml}}"), *D])
case("study.seeds: [] in the recipe (ablate)", "recipe", 'study.seeds')(
    lambda t, b: ["ablate", student(t, b, "study: {seeds: []}"), "--out", str(t / "o"), *D])

# ---------------------------------------------------------------------------------------- overrides
case("--set without =", "override")(lambda t, b: ["distill", str(b / "student.yaml"), "--set", "train.epochs", *D])
case("--set =5", "override", 'empty part')(lambda t, b: ["distill", str(b / "student.yaml"), "--set", "=5", *D])
case("--set train..epochs=2", "override", 'empty part')(lambda t, b: ["distill", str(b / "student.yaml"), "--set", "train..epochs=2", *D])
case("--set train.epochs=[", "override", 'not valid YAML')(lambda t, b: ["distill", str(b / "student.yaml"), "--set", "train.epochs=[", *D])
case("--set train.epochs=abc", "override")(lambda t, b: ["distill", str(b / "student.yaml"), "--set", "train.epochs=abc", *D])
case("--set unknown section", "override")(lambda t, b: ["distill", str(b / "student.yaml"), "--set", "nosuch.key=1", *D])
case("--set below a value", "override")(lambda t, b: ["distill", str(b / "student.yaml"), "--set", "train.epochs.x=1", *D])
case("--set teacher.recipe missing", "override")(
    lambda t, b: ["distill", str(b / "student.yaml"), "--set", "teacher.recipe=nope.yaml", *D])
case("ablate --set study.seeds=[]", "override", 'study.seeds')(
    lambda t, b: ["ablate", str(b / "student.yaml"), "--set", "study.seeds=[]", "--out", str(t / "o"), *D])
case("ablate --set study.methods=foo", "override")(
    lambda t, b: ["ablate", str(b / "student.yaml"), "--set", "study.methods=foo", "--out", str(t / "o"), *D])
case("ablate a CE-only recipe", "override")(
    lambda t, b: ["ablate", str(b / "student.yaml"), "--set", "loss=[{term: ce}]", "--out", str(t / "o"), *D])


# ---------------------------------------------------------------------------------------- out paths
@case("distill --out is a file", "paths", 'is a file')
def _(t, b):
    (t / "f").write_text("keep me")
    return ["distill", str(b / "student.yaml"), "--out", str(t / "f"), *D]


@case("distill --out below a file", "paths", 'below the file')
def _(t, b):
    (t / "f").write_text("keep me")
    return ["distill", str(b / "student.yaml"), "--out", str(t / "f" / "run"), *D]


@case("ablate --out is a file", "paths", 'below the file')
def _(t, b):
    (t / "f").write_text("keep me")
    return ["ablate", str(b / "student.yaml"), "--out", str(t / "f"), "--seeds", "0", *D]


@case("ablate --out below a file", "paths", 'below the file')
def _(t, b):
    (t / "f").write_text("keep me")
    return ["ablate", str(b / "student.yaml"), "--out", str(t / "f" / "x"), "--seeds", "0", *D]


@case("train-teacher --out is a file", "paths", 'is a file')
def _(t, b):
    (t / "f").write_text("keep me")
    return ["train-teacher", str(b / "teacher.yaml"), "--out", str(t / "f"), *D]


@case("distill --data-dir below a file (cifar10)", "paths")
def _(t, b):
    (t / "f").write_text("keep me")
    return ["train-teacher", "cifar10/teacher", "--data-dir", str(t / "f" / "x"), *D]


# ----------------------------------------------------------------------------------------- teachers
def _with_teacher(t, b, ckpt):
    return ["distill", str(b / "student.yaml"), "--out", str(t / "o"), "--set", f"teacher.checkpoint={ckpt}", *D]


case("teacher.checkpoint is a folder", "teacher", 'is a folder')(lambda t, b: _with_teacher(t, b, b / "teacher"))


@case("teacher.checkpoint missing, no teacher.recipe", "teacher")
def _(t, b):
    return _with_teacher(t, b, t / "none" / "best.pt") + ["--set", "teacher.recipe=null"]


@case("teacher.checkpoint garbage file", "teacher", 't.pt')
def _(t, b):
    (t / "t.pt").write_bytes(b"\x00garbage" * 10)
    return _with_teacher(t, b, t / "t.pt")


@case("teacher.checkpoint empty file", "teacher", 't.pt')
def _(t, b):
    (t / "t.pt").write_bytes(b"")
    return _with_teacher(t, b, t / "t.pt")


@case("teacher.checkpoint truncated", "teacher", 't.pt')
def _(t, b):
    data = (b / "teacher" / "best.pt").read_bytes()
    (t / "t.pt").write_bytes(data[: len(data) // 2])
    return _with_teacher(t, b, t / "t.pt")


@case("teacher.checkpoint torch file without model", "teacher")
def _(t, b):
    torch.save({"weights": torch.ones(2)}, t / "t.pt")
    return _with_teacher(t, b, t / "t.pt")


@case("teacher.checkpoint for 5 classes", "teacher")
def _(t, b):
    from kdlab.core.checkpoint import model_checkpoint
    from kdlab.models import create_model

    m = create_model("cnn_tiny", num_classes=5, in_channels=1)
    torch.save(model_checkpoint(m, model_name="cnn_tiny", model_kwargs={}, num_classes=5, in_channels=1,
                                dataset="digits"), t / "t.pt")
    return _with_teacher(t, b, t / "t.pt")


@case("teacher.checkpoint is an ONNX file", "teacher", 'ONNX')
def _(t, b):
    (t / "t.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    return _with_teacher(t, b, t / "t.onnx")


@case("teacher.checkpoint below a file", "teacher", 'below the file')
def _(t, b):
    (t / "f").write_text("keep me")
    return _with_teacher(t, b, t / "f" / "best.pt")


# ------------------------------------------------------------------------------------ run folders
def _rerun(t, b, folder="student", recipe_name="student.yaml", cmd="distill"):
    return [cmd, str(b / recipe_name), "--out", str(t / "run"), *D]


def _corrupt(name, data, folder="student", recipe_name="student.yaml", cmd="distill", drop=()):
    def fn(t, b):
        clone(b / folder, t / "run")
        for d in drop:
            (t / "run" / d).unlink()
        if data is not None:
            raw = (t / "run" / name).read_bytes()
            (t / "run" / name).write_bytes(data(raw) if callable(data) else data)
        return _rerun(t, b, folder, recipe_name, cmd)
    return fn


case("finished run: corrupt best.pt", "run folder")(_corrupt("best.pt", b"garbage"))
case("finished run: truncated best.pt", "run folder")(_corrupt("best.pt", lambda r: r[: len(r) // 3]))
case("finished run: corrupt metrics.csv", "run folder")(_corrupt("metrics.csv", b"epoch,loss\n1,"))
case("finished run: metrics.csv with rows missing", "run folder")(
    _corrupt("metrics.csv", lambda r: r.splitlines(True)[0]))
case("finished run: empty result.json", "run folder", 'result.json')(_corrupt("result.json", b""))
case("finished run: corrupt run.json", "run folder", 'run.json')(_corrupt("run.json", b"{\"recipe\":"))
case("finished run: binary result.json", "run folder", 'result.json')(_corrupt("result.json", bytes(range(256))))
case("finished run: best.pt and last.pt deleted", "run folder")(_corrupt("x", None, drop=("best.pt", "last.pt")))
case("finished teacher: corrupt best.pt (train-teacher)", "run folder")(
    _corrupt("best.pt", b"garbage", "teacher", "teacher.yaml", "train-teacher"))
case("unfinished run: corrupt last.pt", "run folder")(_corrupt("last.pt", b"garbage", drop=("result.json",)))
case("unfinished run: truncated last.pt", "run folder")(
    _corrupt("last.pt", lambda r: r[:100], drop=("result.json",)))


@case("finished run of another recipe in --out", "run folder")
def _(t, b):
    clone(b / "student", t / "run")
    return _rerun(t, b) + ["--set", "train.lr=0.2"]


@case("unfinished run of another recipe in --out", "run folder")
def _(t, b):
    clone(b / "student", t / "run")
    (t / "run" / "result.json").unlink()
    return _rerun(t, b) + ["--set", "train.lr=0.2"]


@case("teacher run folder holds another recipe's run", "run folder")
def _(t, b):
    clone(b / "student", t / "tt")  # a student's finished run where the teacher recipe would train
    (t / "tt" / "result.json").unlink()
    return ["distill", str(b / "student.yaml"), "--out", str(t / "o"), "--set", f"teacher.checkpoint={t / 'tt' / 'best.pt'}",
            "--set", f"teacher.recipe={b / 'teacher.yaml'}", *D]


@case("--out in use by another process", "run folder", 'in use')
def _(t, b):
    (t / "run").mkdir()
    child = spawn(f"from kdlab.core.lock import RunLock\nRunLock({str(t / 'run')!r}).acquire()\n"
                  f"print('locked', flush=True)\nimport time; time.sleep(600)\n", t)
    assert wait_line(child, b"locked")
    _cleanup.append(child)
    return _rerun(t, b)


@case("train.lr=1e6 (loss becomes NaN)", "run folder", 'non-finite')
def _(t, b):
    return _rerun(t, b) + ["--set", "train.lr=1e6"]


# ------------------------------------------------------------------------------------------ evaluate
case("evaluate: checkpoint not found", "evaluate")(lambda t, b: ["evaluate", str(t / "none.pt")])
case("evaluate: a folder", "evaluate", 'is a folder')(lambda t, b: ["evaluate", str(b / "student")])


@case("evaluate: garbage file", "evaluate")
def _(t, b):
    (t / "x.pt").write_bytes(b"garbage")
    return ["evaluate", str(t / "x.pt")]


@case("evaluate: ONNX file", "evaluate", 'ONNX')
def _(t, b):
    (t / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    return ["evaluate", str(t / "m.onnx")]


@case("evaluate: structurally pruned checkpoint", "evaluate", 'pruned')
def _(t, b):
    ck = torch.load(b / "student" / "best.pt", weights_only=False)
    ck["pruned"] = {"method": "structured", "ratio": 0.5, "arch": {"conv1": {"in_channels": 1, "out_channels": 4, "groups": 1}}}
    first = next(k for k in ck["model"])
    ck["model"][first] = ck["model"][first][:4]
    torch.save(ck, t / "p.pt")
    return ["evaluate", str(t / "p.pt")]


case("evaluate: cifar10 data missing", "evaluate")(
    lambda t, b: ["evaluate", str(b / "student" / "best.pt"), "--dataset", "cifar10", "--data-dir", str(t / "nowhere")])

# ------------------------------------------------------------------------------------------ argparse
case("unknown command", "usage")(lambda t, b: ["distil", "x"])
case("distill without a recipe", "usage")(lambda t, b: ["distill"])
case("--seed is text", "usage")(lambda t, b: ["distill", str(b / "student.yaml"), "--seed", "abc"])
case("ablate --mode bad", "usage")(lambda t, b: ["ablate", str(b / "student.yaml"), "--mode", "bad"])
case("evaluate --split bogus", "usage")(lambda t, b: ["evaluate", "x.pt", "--split", "bogus"])
case("ablate --seeds with no value", "usage")(lambda t, b: ["ablate", str(b / "student.yaml"), "--seeds"])

_cleanup: list = []


# ------------------------------------------------------------------------------------------ harness
def _base(root: Path) -> Path:
    from kdlab.cli.main import main

    write_recipes(root)
    assert main(["distill", str(root / "student.yaml"), "--out", str(root / "student"), "--quiet"]) == 0
    return root


def classify(name: str, tmp: Path, base: Path, capsys=None) -> tuple[str, str]:
    """(outcome, detail): ``clear`` (exit 2, one stderr line naming what the case needs, files
    intact), ``unclear`` (that line lacks it), ``traceback`` (an
    exception escaped or several lines / another exit code), ``data lost`` (a file present before
    changed), ``accepted`` (exit 0: the bad input was not refused)."""
    import contextlib
    import io

    from kdlab.cli.main import main

    group, fn, expect = CASES[name]
    tmp.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        argv = fn(tmp, base)
        before = {**{f"tmp/{k}": v for k, v in snapshot(tmp).items()},
                  **{f"base/{k}": v for k, v in snapshot(base).items()}}
        err, out = io.StringIO(), io.StringIO()
        escaped = None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
            except BaseException:  # noqa: BLE001 - a traceback is what we count
                escaped = traceback.format_exc().strip().splitlines()[-1]
                rc = None
        after = {**{f"tmp/{k}": v for k, v in snapshot(tmp).items()},
                 **{f"base/{k}": v for k, v in snapshot(base).items()}}
    finally:
        os.chdir(cwd)
        while _cleanup:
            c = _cleanup.pop()
            c.send_signal(signal.SIGKILL)
            c.wait()
    lost = changed(before, after)
    lines = [l for l in err.getvalue().splitlines() if l.strip()]
    if lost:
        return "data lost", f"changed: {lost}"
    if escaped is not None:
        return "traceback", escaped
    if rc == 0:
        return "accepted", out.getvalue().strip().splitlines()[-1:] and out.getvalue().strip().splitlines()[-1]
    if rc != 2 or len(lines) != 1 or not lines[0].startswith("kdlab: error:"):
        return "traceback", f"rc={rc}, {len(lines)} stderr lines: {lines[-1] if lines else ''}"
    if expect and expect not in lines[0]:
        return "unclear", lines[0]
    return "clear", lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _base(tmp_path_factory.mktemp("bad-base"))


def test_suite_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, base, tmp_path):
    outcome, detail = classify(name, tmp_path / "case", base)
    assert outcome == "clear", f"{name}: {outcome}: {detail}"


if __name__ == "__main__":  # the table: python tests/test_bad_inputs.py [out.md]
    import tempfile

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="kdlab-bad-"))
    b = _base(root / "base")
    rows, counts = [], {}
    for i, name in enumerate(CASES):
        outcome, detail = classify(name, root / f"c{i}", b)
        counts[outcome] = counts.get(outcome, 0) + 1
        rows.append(f"| {CASES[name][0]} | {name} | {outcome} | {str(detail)[:160].replace('|', '/')} |")
        print(rows[-1], flush=True)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"\n{len(CASES)} cases: {summary}")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text("| group | case | outcome | detail |\n|---|---|---|---|\n"
                                     + "\n".join(rows) + f"\n\n{len(CASES)} cases: {summary}\n")
