"""The package's shape: no import cycles (function-level imports included), no private names
imported across modules, the allowed dependencies between packages (function-level imports
included), each CLI command function making one library call; and tests of these tests (a planted
forbidden edge and a planted second library call must fail them)."""

import ast
import subprocess
import sys
from pathlib import Path

import kdlab

ROOT = Path(kdlab.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict, text: str = None) -> list[tuple[str, list[str]]]:
    """(target module, imported names) of every kdlab import in the file (or ``text``), at any
    depth."""
    tree = ast.parse(path.read_text() if text is None else text)
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kdlab"):
                    found.append((a.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("kdlab"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]
            if subs:  # `from pkg import submodule`
                found += [(s, []) for s in subs]
                rest = [n for n in names if f"{mod}.{n}" not in mods]
                if rest:
                    found.append((mod, rest))
            else:
                found.append((mod, names))
    return found


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, mods) if t in mods and t != m} for m, p in mods.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle of the code's logic;
    # everything else must form a DAG
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)

    def only_package_reexports(comp):
        # edges inside the cycle all go from a package to its own submodule or back
        for a in comp:
            for b in graph[a] & set(comp):
                if not (b.startswith(a + ".") or a.startswith(b + ".")):
                    return False
        return True

    bad = [c for c in sccs if not only_package_reexports(c)]
    assert not bad, f"import cycles: {bad}"


def test_no_private_names_imported_across_modules():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        for target, names in _imports(m, p, mods):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != m:
                    bad.append(f"{m} imports {target}.{n}")
    assert not bad, bad


# -- allowed dependencies between packages ------------------------------------------------------
#: package -> the packages its modules may import (at module or function level). The order:
#: core <- data <- models <- distill <- train <- evaluate <- lm / compress <- tasks <- experiments
#: <- api / cli; ``report`` renders numbers and sits just above data (everything may use it; it
#: imports no model, training, evaluation or task code).
LOW = {"core", "data", "models", "distill"}
ALLOWED = {
    "version": set(),
    "core": set(),
    "data": {"core"},
    "models": {"core", "data"},
    "distill": {"core", "data", "models"},
    "report": {"core", "data"},
    "train": LOW | {"report", "version"},
    "evaluate": LOW | {"train", "report"},
    "lm": LOW | {"train", "evaluate", "report"},
    "compress": LOW | {"train", "evaluate", "report"},
    "tasks": LOW | {"train", "evaluate", "report", "lm", "compress"},
    "experiments": LOW | {"train", "evaluate", "report", "lm", "compress", "tasks"},
    "api": LOW | {"train", "evaluate", "report", "tasks"},
    "cli": LOW | {"train", "evaluate", "report", "lm", "compress", "tasks", "experiments", "version"},
    "kdlab": {"api", "version"},
    "__main__": {"cli"},
}
#: module edges that break the order today, each with its reason; the test fails when one of them
#: is gone (remove it here) so the list only shrinks
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kdlab"


def forbidden_edges(mods: dict, texts: dict = None) -> list[str]:
    """``"a -> b (pkg_a may not import pkg_b)"`` for every import of a module into a package its
    package may not depend on (``texts``: module -> source, overriding or adding files)."""
    texts = texts or {}
    mods = {**mods, **{m: mods.get(m, ROOT / "planted.py") for m in texts}}
    bad = []
    for m, p in mods.items():
        a = _package(m)
        for target, _ in _imports(m, p, mods, texts.get(m)):
            if target not in mods and target.rsplit(".", 1)[0] not in mods:
                continue
            b = _package(target)
            if b == a or b in ALLOWED.get(a, set()) or (m, target) in KNOWN_EXCEPTIONS:
                continue
            bad.append(f"{m} -> {target} ({a} may not import {b})")
    return sorted(set(bad))


def test_package_dependencies():
    mods = _modules()
    assert set(_package(m) for m in mods) <= set(ALLOWED), "a new package: give it a row in ALLOWED"
    assert not forbidden_edges(mods), forbidden_edges(mods)


def test_known_exceptions_still_exist():
    mods = _modules()
    edges = {(m, t) for m, p in mods.items() for t, _ in _imports(m, p, mods)}
    stale = [e for e in KNOWN_EXCEPTIONS if e not in edges]
    assert not stale, f"fixed, remove from KNOWN_EXCEPTIONS: {stale}"


def test_a_planted_forbidden_edge_fails():
    """Tests of the test: function-level and module-level imports against the order are caught."""
    mods = _modules()
    planted = {"kdlab.core.planted": "def f():\n    from kdlab.distill.losses import LOSSES\n    return LOSSES\n",
               "kdlab.distill.planted": "from kdlab.train.build import train\n",
               "kdlab.report.planted": "def g():\n    import kdlab.evaluate.robustness\n"}
    bad = forbidden_edges(mods, planted)
    assert any(b.startswith("kdlab.core.planted -> kdlab.distill.losses (core may not import distill)") for b in bad)
    assert any(b.startswith("kdlab.distill.planted -> kdlab.train.build") for b in bad)
    assert any(b.startswith("kdlab.report.planted -> kdlab.evaluate.robustness") for b in bad)
    ok = {"kdlab.experiments.planted": "def h():\n    from kdlab.tasks import get_task\n"}
    assert not forbidden_edges(mods, ok)


# -- one library call per CLI command -----------------------------------------------------------
def library_calls(text: str) -> dict[str, list[str]]:
    """For each ``cmd_*`` function of a CLI module's source: the calls it makes to kdlab library
    names (imported from ``kdlab.*`` outside ``kdlab.cli``, at module or function level),
    counting the calls of the module's own helper functions it calls."""
    tree = ast.parse(text)
    lib: dict[str, str] = {}

    def collect(node, into):
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("kdlab") \
                    and not (n.module or "").startswith("kdlab.cli"):
                for a in n.names:
                    into[a.asname or a.name] = f"{n.module}.{a.name}"
            elif isinstance(n, ast.Import):
                for a in n.names:
                    if a.name.startswith("kdlab") and not a.name.startswith("kdlab.cli"):
                        into[(a.asname or a.name).split(".")[0]] = a.name

    for n in tree.body:
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            collect(n, lib)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def calls(fn, seen) -> list[str]:
        names = dict(lib)
        collect(fn, names)
        out = []
        for n in ast.walk(fn):
            if isinstance(n, ast.Call):
                f = n.func
                while isinstance(f, ast.Attribute):
                    f = f.value
                if isinstance(f, ast.Name) and f.id in names:
                    out.append(ast.unparse(n.func))
                elif isinstance(f, ast.Name) and f.id in funcs and f.id not in seen and not f.id.startswith("cmd_"):
                    out += calls(funcs[f.id], seen | {f.id})
        return out

    return {name: calls(fn, {name}) for name, fn in funcs.items() if name.startswith("cmd_")}


def test_each_cli_command_makes_one_library_call():
    bad = {}
    for p in sorted((ROOT / "cli").glob("*.py")):
        for cmd, c in library_calls(p.read_text()).items():
            if len(c) != 1:
                bad[f"{p.name}:{cmd}"] = c
    assert not bad, f"CLI commands must parse arguments and make one library call: {bad}"


def test_a_planted_second_library_call_fails():
    """Tests of the test: two library calls, directly or through a helper, are counted."""
    one = "def cmd_a(args):\n    from kdlab.experiments.study import run_ablation\n    run_ablation(args.r)\n"
    two = ("from kdlab.train.recipe import load_recipe\n\ndef _load(args):\n    return load_recipe(args.r)\n\n"
           "def cmd_b(args):\n    from kdlab.train.build import train\n    train(_load(args), args.out)\n")
    assert library_calls(one) == {"cmd_a": ["run_ablation"]}
    assert sorted(library_calls(two)["cmd_b"]) == ["load_recipe", "train"]
