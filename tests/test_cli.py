"""The command line as one app: shared options, --seeds, help text, no torch to print help."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.cli import args as A
from kdlab.cli.main import COMMANDS, build_parser, main

SRC = str(Path(__file__).resolve().parents[1] / "src")
SHARED = ("--out", "--quiet", "--set", "--device", "--seeds", "--n-seeds", "--data-dir")


def _subparsers(p=None) -> dict[str, argparse.ArgumentParser]:
    p = p or build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(sp: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in sp._actions for s in a.option_strings}


# ------------------------------------------------------------------ --seeds
@pytest.mark.parametrize("tokens, seeds", [
    (["0", "1", "2"], [0, 1, 2]),
    (["0-9"], list(range(10))),
    (["3"], [3]),                       # one seed, number 3: never "three seeds"
    (["0-2", "7", "10-11"], [0, 1, 2, 7, 10, 11]),
    (["4,1", "2-3"], [4, 1, 2, 3]),     # order kept
    (["5-5"], [5]),
])
def test_parse_seeds(tokens, seeds):
    assert A.parse_seeds(tokens) == seeds


@pytest.mark.parametrize("tokens, match", [
    (["3-1"], "backwards"), (["0-2", "2"], "twice"), (["x"], "not a seed"), (["1.5"], "not a seed"),
    ([], "at least one"),
])
def test_parse_seeds_rejects(tokens, match):
    with pytest.raises(ValueError, match=match):
        A.parse_seeds(tokens)


def test_seeds_and_n_seeds_on_the_command_line(capsys):
    p = build_parser()
    assert p.parse_args(["ablate", "digits/full", "--seeds", "0-4", "9"]).seeds == [0, 1, 2, 3, 4, 9]
    assert p.parse_args(["ablate", "digits/full", "--n-seeds", "4"]).seeds == [0, 1, 2, 3]
    assert p.parse_args(["compare", "--all", "digits"]).seeds is None     # the recipe's study.seeds
    for bad in (["--seeds", "2-1"], ["--n-seeds", "0"], ["--seeds", "1", "--n-seeds", "3"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["ablate", "digits/full", *bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "runs backwards" in err and "--n-seeds must be >= 1" in err and "not allowed with" in err


# ------------------------------------------------------------------ shared groups
def test_shared_options_have_one_name_default_and_help_everywhere():
    subs = _subparsers()
    seen: dict[str, list] = {}
    for name, sp in subs.items():
        opts = _options(sp)
        assert "--out-dir" not in opts, name
        for flag in SHARED:
            if flag in opts:
                a = opts[flag]
                seen.setdefault(flag, []).append(
                    (name, a.dest, a.default, type(a).__name__, a.nargs, a.metavar))
    for flag, uses in seen.items():
        shapes = {repr(u[1:]) for u in uses}
        assert len(shapes) == 1, f"{flag} is declared differently: {uses}"
    # where each shared option is used
    users = {flag: sorted(u[0] for u in uses) for flag, uses in seen.items()}
    recipe_cmds = {"train-teacher", "distill", "ablate", "demo", "sweep", "compare", "paradigm", "bench", "tune"}
    assert recipe_cmds <= set(users["--set"])
    assert {"ablate", "demo", "sweep", "compare", "bench"} == set(users["--seeds"]) == set(users["--n-seeds"])
    assert {"train-teacher", "distill", "ablate", "demo", "sweep", "compare", "paradigm", "bench",
            "explain", "robustness", "profile", "prune", "quantize", "export",
            "deploy", "tune", "findings"} == set(users["--out"])
    assert {"evaluate", "explain", "robustness", "profile", "prune", "quantize",
            "deploy", "explain-study"} | recipe_cmds == set(users["--device"])
    # the defaults: --device auto, the others unset
    assert seen["--device"][0][2] == "auto"
    assert seen["--out"][0][2] is None and seen["--seeds"][0][2] is None
    assert seen["--quiet"][0][2] is False and seen["--set"][0][2] == []


def test_no_progress_is_a_hidden_alias_of_quiet():
    p = build_parser()
    assert p.parse_args(["robustness", "a.pt", "--no-progress"]).quiet is True
    sub = _subparsers(p)["robustness"]
    assert "--no-progress" not in sub.format_help()  # deprecated: accepted, not shown
    assert p.parse_args(["robustness", "a.pt"]).quiet is False


def test_every_option_and_argument_has_help():
    missing = []
    for name, sp in _subparsers().items():
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            if not a.help:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def test_device_auto_and_recipe_overrides():
    p = build_parser()
    a = p.parse_args(["distill", "digits/kd", "--data-dir", "d", "--set", "train.epochs=2"])
    assert a.device == "auto" and not a.device_given
    assert A.recipe_overrides(a) == ["train.epochs=2", "data.data_dir=d"]  # the recipe's device counts
    a = p.parse_args(["distill", "digits/kd", "--device", "cpu", "--set", "train.epochs=2"])
    assert A.recipe_overrides(a) == ["train.epochs=2", "train.device=cpu"]
    assert p.parse_args(["evaluate", "x.pt", "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        p.parse_args(["evaluate", "x.pt", "--device", "gpu"])


def test_commands_are_an_explicit_module_list():
    import kdlab.cli.bench, kdlab.cli.compress, kdlab.cli.explain, kdlab.cli.methods  # noqa: E401
    import kdlab.cli.lm, kdlab.cli.robustness, kdlab.cli.run, kdlab.cli.tune, kdlab.cli.diffusion  # noqa: E401

    assert set(COMMANDS) == {kdlab.cli.bench, kdlab.cli.compress, kdlab.cli.explain, kdlab.cli.lm,
                             kdlab.cli.methods, kdlab.cli.robustness, kdlab.cli.run, kdlab.cli.tune,
                             kdlab.cli.diffusion}
    assert all(callable(m.register) for m in COMMANDS)
    assert {"train-teacher", "distill", "ablate", "demo", "sweep", "evaluate", "recipes", "models",
            "losses", "methods", "compare", "paradigm", "explain", "robustness", "profile",
            "prune", "quantize", "export", "deploy", "bench", "lm", "tune", "explain-study", "findings",
            "report", "diffusion"} == set(_subparsers())


# ------------------------------------------------------------------ help without torch
def test_help_imports_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "from kdlab.cli.main import build_parser, main\n"
        "p = build_parser()\n"
        "sub = next(a for a in p._actions if a.__class__.__name__ == '_SubParsersAction')\n"
        "for argv in [['--help']] + [[c, '--help'] for c in sub.choices]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'scipy', 'pydantic', 'yaml') if m in sys.modules)\n"
        "lib = sorted(m for m in sys.modules if m.startswith('kdlab.') and not m.startswith(('kdlab.cli', 'kdlab.version')))\n"
        "print(heavy, lib)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def test_kdlab_help_lists_commands_and_the_debug_variable(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "compare" in text and "KDLAB_DEBUG" in text


# ------------------------------------------------------------------ errors
def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdlab: error:") and "\n" not in err
    assert main(["robustness"]) == 2
    assert "give checkpoints" in capsys.readouterr().err
    assert main(["robustness", "--study", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--study" in capsys.readouterr().err
    assert main(["bench", "--seeds", "0"]) == 2
    assert "--study only" in capsys.readouterr().err


def test_bench_says_1_step_and_out_serves_accuracy_too(capsys, tmp_path, monkeypatch):
    """The header counts '1 step' (not '1 steps'); `bench --help` says --out serves --accuracy too."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--steps", "1", "--repeats", "1", "--variants", "baseline", "--teacher", "cnn_tiny",
                 "--student", "cnn_tiny", "--batch-size", "2", "--image-size", "8"]) == 0
    assert capsys.readouterr().out.startswith("bench: cnn_tiny -> cnn_tiny, batch 2, 1 step, synthetic 3x8x8")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--study and --accuracy only" in " ".join(capsys.readouterr().out.split())
