"""The bad-input suite (issues 11 and 23): every case runs ``kdlab.cli.main.main([...])`` in-process
from a fresh folder and must exit with code 2, print exactly one line on stderr (``kdlab: error:
...``) that names what the case expects, and leave every file that was present before
byte-identical. Python-API cases must raise one line (ValueError / KeyError / FileNotFoundError).

Cases: the decorated functions below (issue 11) and the one-line rows of ``tests/bad_cases_*.py``
(issue 23; ``tests/bad_case.py`` describes a row, and how a new command family adds its file).

``python tests/test_bad_inputs.py [table.md]`` prints every case's outcome (clear / unclear /
traceback / silent: accepted / lost: a file changed) and the counts per command family.
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import sys
import time
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


@case("ablate --out is a file", "paths", "is a file")
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
# issue 11's groups, as command families for the table
FAMILY = {"recipe": "distill", "override": "distill", "paths": "distill", "teacher": "distill",
          "run folder": "distill", "evaluate": "evaluate", "usage": "usage"}


def load_rows() -> dict:
    """Every ``tests/bad_cases_*.py`` row, by ``"<family>: <name>"``; and the bases they add."""
    rows = {}
    here = Path(__file__).resolve().parent
    for f in sorted(here.glob("bad_cases_*.py")):
        mod = importlib.import_module(f.stem)
        BUILDERS.update(getattr(mod, "BASES", {}))
        for c in mod.CASES:
            key = f"{c.family}: {c.name}"
            assert key not in rows and key not in CASES, f"case named twice: {key}"
            rows[key] = c
    return rows


# ------------------------------------------------------------------------------------------ bases
def _base(root: Path) -> Path:
    """Finished tiny digits runs ``teacher/`` and ``student/``, their recipes, and model files made
    from them: ``notdict.pt`` (``model`` entry a list), ``five.pt`` (5 classes), ``model.onnx``."""
    from kdlab.cli.main import main
    from kdlab.core.checkpoint import model_checkpoint
    from kdlab.models import create_model

    write_recipes(root)
    assert main(["distill", str(root / "student.yaml"), "--out", str(root / "student"), "--quiet"]) == 0
    ck = torch.load(root / "student" / "best.pt", weights_only=False)
    torch.save({**ck, "model": [1, 2, 3]}, root / "notdict.pt")
    m = create_model("cnn_tiny", num_classes=5, in_channels=1)
    torch.save(model_checkpoint(m, model_name="cnn_tiny", model_kwargs={}, num_classes=5, in_channels=1,
                                dataset="digits"), root / "five.pt")
    try:
        from kdlab.compress.export import export_onnx
        from kdlab.models.adapters import load_model

        model, _ = load_model(root / "student" / "best.pt")
        export_onnx(model, root / "model.onnx", (1, 1, 8, 8))
    except ImportError:  # no onnx / onnxruntime: the cases that need the file are skipped
        pass
    return root


LM_RECIPE = """\
name: tiny-lm
corpus: {{name: {corpus}, seq_len: 16, val_tokens: 256, test_tokens: 256}}
teacher:
  kwargs: {{d_model: 16, n_layer: 1, n_head: 2, max_len: 48}}
  train: {{epochs: 1, steps_per_epoch: 2, batch_size: 4, device: cpu}}
student: {{kwargs: {{d_model: 16, n_layer: 1, n_head: 2, max_len: 48}}}}
train: {{epochs: 1, steps_per_epoch: 2, batch_size: 4, device: cpu}}
distill: {{top_k: 4, prompt_len: 6, gen_len: 8, seqkd_pool: 8}}
study:
  seeds: [0]
  methods:
    ce: {{loss: [{{term: ce}}]}}
    fkl: {{loss: [{{term: ce, weight: 0.5}}, {{term: fkl, weight: 0.5}}]}}
"""


def _lm_base(root: Path) -> None:
    """A text corpus, ``lm.yaml`` and two finished LM teachers: ``byte/`` and ``bpe/`` tokens."""
    from kdlab.cli.main import main

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(12):
        (corpus / f"f{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog. " * 4)
    (root / "lm.yaml").write_text(LM_RECIPE.format(corpus=corpus))
    assert main(["lm", "train-teacher", str(root / "lm.yaml"), "--out", str(root / "byte"), "--quiet"]) == 0
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return
    assert main(["lm", "train-teacher", str(root / "lm.yaml"), "--out", str(root / "bpe"), "--quiet",
                 "--set", "corpus.tokenizer=bpe", "--set", "corpus.vocab_size=300"]) == 0


def _study_base(root: Path, bases) -> None:
    """A finished study: ``baseline`` (CE) and ``kd`` runs of seed 0 and ``report/table.json``."""
    from kdlab.train.recipe import load_recipe
    from kdlab.experiments.study import run_study

    student = Path(bases["b"]) / "student.yaml"
    recipes = {"baseline": load_recipe(str(student), ["loss=[{term: ce}]", "name=baseline"]),
               "kd": load_recipe(str(student), ["name=kd"])}
    run_study(recipes, root, seeds=[0], progress=False, log=lambda *a, **k: None, profile=False)


BUILDERS: dict = {"lm": lambda root, bases: _lm_base(root), "study": _study_base}


class Bases(dict):
    """The folders ``{b}``, ``{lm}``, ``{study}``, ... of the rows, built the first time a case
    names them (``str.format_map`` asks for them one by one)."""

    def __init__(self, root: Path, digits: Path):
        super().__init__(b=str(digits))
        self.root = root

    def __missing__(self, key):
        if key not in BUILDERS:
            raise KeyError(f"no base folder named {{{key}}}; add it to BASES in a bad_cases_*.py file")
        folder = self.root / key
        fn = BUILDERS[key]
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            fn(folder, self) if fn.__code__.co_argcount > 1 else fn(folder)
        finally:
            os.chdir(cwd)
        self[key] = str(folder)
        return self[key]


ROWS: dict = {}


def all_cases() -> list[str]:
    if not ROWS:
        ROWS.update(load_rows())
    return list(CASES) + list(ROWS)


def family_of(name: str) -> str:
    return ROWS[name].family if name in ROWS else FAMILY.get(CASES[name][0], CASES[name][0])


def _prepare(name: str, tmp: Path, bases: Bases):
    """``(argv or api callable, expect, kind)`` of a case, its files written into ``tmp``."""
    if name in CASES:
        group, fn, expect = CASES[name]
        return fn(tmp, Path(bases["b"])), expect, "cli"
    c = ROWS[name]
    for rel, content in c.files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path, bases)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    if c.kind == "api":
        return c.argv, c.expect, "api"
    if callable(c.argv):
        return c.argv(tmp, bases), c.expect, "cli"
    return shlex.split(c.argv.format_map(_Fmt(bases, tmp))), c.expect, "cli"


class _Fmt(dict):
    def __init__(self, bases: Bases, tmp: Path):
        super().__init__()
        self.bases, self.tmp = bases, tmp

    def __missing__(self, key):
        return str(self.tmp) if key == "t" else self.bases[key]


def _snap(tmp: Path, root: Path) -> dict:
    """Digests of the case folder and of every base folder built so far."""
    out = {f"tmp/{k}": v for k, v in snapshot(tmp).items()}
    for d in root.iterdir():
        if d.is_dir():
            out.update({f"{d.name}/{k}": v for k, v in snapshot(d).items()})
    return out


def classify(name: str, tmp: Path, bases: Bases, capsys=None) -> tuple[str, str]:
    """(outcome, detail): ``clear`` (exit 2, one stderr line ``kdlab: error: ...`` naming what the
    case needs, files intact), ``unclear`` (that line lacks it), ``traceback`` (an exception
    escaped, or several lines / another exit code), ``lost`` (a file present before changed),
    ``silent`` (exit 0: the bad input was accepted), ``noisy`` (a ``quiet`` case printed on stdout
    or created a file or folder)."""
    import contextlib
    import io

    from kdlab.cli.main import main

    tmp.mkdir(parents=True, exist_ok=True)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    root = Path(bases["b"]).parent
    os.chdir(tmp)
    try:
        argv, expect, kind = _prepare(name, tmp, bases)
        before = _snap(tmp, root)
        dirs = {p for p in tmp.rglob("*") if p.is_dir()}
        err, out = io.StringIO(), io.StringIO()
        escaped = None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                if kind == "api":
                    try:
                        argv(tmp, bases)
                        rc = 0
                    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
                        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                        print(f"kdlab: error: {msg}", file=sys.stderr)
                        rc = 2
                else:
                    rc = main(argv)
            except SystemExit as e:
                rc = e.code
            except BaseException:  # noqa: BLE001 - a traceback is what we count
                escaped = traceback.format_exc().strip().splitlines()[-1]
                rc = None
        after = _snap(tmp, root)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        while _cleanup:
            c = _cleanup.pop()
            c.send_signal(signal.SIGKILL)
            c.wait()
    lost = changed(before, after)
    lines = [l for l in err.getvalue().splitlines() if l.strip()]
    if lost:
        return "lost", f"changed: {lost}"
    quiet = getattr(ROWS.get(name), "quiet", False)
    if quiet and escaped is None and rc != 0:
        printed = out.getvalue().strip().splitlines()
        new = sorted(set(after) - set(before)) + sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                                                          if p.is_dir() and p not in dirs)
        if printed or new:
            return "noisy", f"stdout: {printed[:1]}, new: {new[:3]}"
    if escaped is not None:
        return "traceback", escaped
    if rc == 0:
        last = out.getvalue().strip().splitlines()[-1:]
        return "silent", last[0] if last else ""
    if rc != 2 or len(lines) != 1 or not lines[0].startswith("kdlab: error:"):
        return "traceback", f"rc={rc}, {len(lines)} stderr lines: {lines[-1] if lines else ''}"
    if expect and expect not in lines[0]:
        return "unclear", lines[0]
    return "clear", lines[0]


_SHARED: list = []


def shared_bases(tmp_path_factory) -> Bases:
    """One set of base folders per test session (this file and tests/test_faults.py share it)."""
    if not _SHARED:
        root = tmp_path_factory.mktemp("bad-bases")
        _SHARED.append(Bases(root, _base(root / "b")))
    return _SHARED[0]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return shared_bases(tmp_path_factory)


@pytest.fixture(scope="module")
def base(bases):
    return Path(bases["b"])


def test_suite_is_large_enough():
    names = all_cases()
    assert len(names) >= 300
    fams = {family_of(n) for n in names}
    # every command family of the CLI has cases
    from kdlab.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    listings = {"recipes", "models", "losses", "methods"}  # no input to get wrong
    missing = set(sub.choices) - listings - fams
    assert not missing, (f"command families without bad-input cases: {sorted(missing)}; add "
                         f"tests/bad_cases_<family>.py with their CASES (see tests/bad_case.py)")


def _commands() -> dict:
    """``{command: {subcommands}}`` of the kdlab parser."""
    from kdlab.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    out = {}
    for name, p in sub.choices.items():
        inner = [a for a in p._actions if a.dest == "lm_command"]
        out[name] = set(inner[0].choices) if inner else set()
    return out


def _bad_hints(text: str, commands: dict) -> list[str]:
    import re

    bad = []
    for m in re.finditer(r"`kdlab ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", text):
        cmd, sub = m.group(1), m.group(2)
        if cmd not in commands or (commands[cmd] and sub and sub not in commands[cmd]):
            bad.append(m.group(0))
    return bad


def test_every_hint_names_a_command_that_exists():
    """Messages point to `kdlab X` commands that exist (an unknown loss term once pointed to
    `kdlab losss`): every such hint in the sources, and the unknown-name errors of the registries."""
    commands = _commands()
    src = Path(__file__).resolve().parent.parent / "src" / "kdlab"
    bad = {str(f.relative_to(src)): b for f in src.rglob("*.py") if (b := _bad_hints(f.read_text(), commands))}
    assert not bad, bad
    from kdlab.data import DATASETS
    from kdlab.data.corruptions.ops import CORRUPTION_REGISTRY
    from kdlab.distill.losses import LOSSES
    from kdlab.experiments.paradigms.base import PARADIGMS
    from kdlab.models import MODELS

    for reg in (DATASETS, CORRUPTION_REGISTRY, LOSSES, PARADIGMS, MODELS):
        with pytest.raises(KeyError) as e:
            reg.entry("zzz-no-such-name")
        assert "zzz-no-such-name" in e.value.args[0] and not _bad_hints(e.value.args[0], commands)


def _needs(name: str) -> str:
    """A reason to skip a case whose optional dependency is missing ('' when none)."""
    c = ROWS.get(name)
    text = "" if c is None or callable(c.argv) else c.argv
    if "model.onnx" in text or "onnx" in str(c and c.files):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime not installed"
    if "tune" == getattr(c, "family", ""):
        try:
            import optuna  # noqa: F401
        except ImportError:
            return "optuna not installed"
    if "--device cuda" in text and torch.cuda.is_available():
        return "a CUDA device is visible (the case needs a machine without one)"
    if "{lm}/bpe" in text:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            return "tokenizers not installed"
    return ""


@pytest.mark.parametrize("name", all_cases())
def test_bad_input(name, bases, tmp_path):
    why = _needs(name)
    if why:
        pytest.skip(why)
    outcome, detail = classify(name, tmp_path / "case", bases)
    assert outcome == "clear", f"{name}: {outcome}: {detail}"


def table(results: dict) -> str:
    """Markdown: cases per command family with counts of each outcome."""
    kinds = ["clear", "unclear", "traceback", "silent", "lost", "noisy"]
    fams: dict = {}
    for name, (outcome, _) in results.items():
        row = fams.setdefault(family_of(name), dict.fromkeys(kinds, 0))
        row[outcome] += 1
    lines = ["| family | cases | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
    for fam in sorted(fams):
        r = fams[fam]
        lines.append(f"| {fam} | {sum(r.values())} | " + " | ".join(str(r[k]) for k in kinds) + " |")
    tot = {k: sum(r[k] for r in fams.values()) for k in kinds}
    lines.append(f"| **all** | **{sum(tot.values())}** | " + " | ".join(f"**{tot[k]}**" for k in kinds) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # the table: python tests/test_bad_inputs.py [out.md]
    import tempfile

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="kdlab-bad-"))
    bs = Bases(root, _base(root / "b"))
    rows, results = [], {}
    t_all = time.time()
    for i, name in enumerate(all_cases()):
        t0 = time.time()
        if _needs(name):
            continue
        try:
            outcome, detail = classify(name, root / f"c{i}", bs)
        except Exception as e:  # noqa: BLE001 - a base that cannot be built on this kdlab
            outcome, detail = "traceback", f"set-up failed: {type(e).__name__}: {e}"
        results[name] = (outcome, detail)
        rows.append(f"| {family_of(name)} | {name} | {outcome} | {time.time() - t0:.1f}s | "
                    f"{str(detail)[:160].replace('|', '/')} |")
        print(rows[-1], flush=True)
    summary = table(results)
    print("\n" + summary + f"\n\n{len(results)} cases in {time.time() - t_all:.0f}s")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text("| family | case | outcome | time | detail |\n|---|---|---|---:|---|\n"
                                     + "\n".join(rows) + "\n\n" + summary + "\n")
