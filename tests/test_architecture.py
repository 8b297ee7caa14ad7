"""The package's shape: no import cycles (function-level imports included), no private names
imported across modules, the CLI's help without torch."""

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


def _imports(name: str, path: Path, mods: dict) -> list[tuple[str, list[str]]]:
    """(target module, imported names) of every kdlab import in the file, at any depth."""
    tree = ast.parse(path.read_text())
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
