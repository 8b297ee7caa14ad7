"""The `kdlab` command line: one argparse app.

Core subcommands live here; feature packages add theirs through EXTENSIONS
("module:function" strings, each function taking the argparse subparsers object).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

EXTENSIONS: list[str] = [
    "kdlab.cli.run:register",
    "kdlab.cli.explain:register",
    "kdlab.cli.compress:register",
    "kdlab.cli.robustness:register",
    "kdlab.cli.methods:register",
    "kdlab.cli.bench:register",
]


def build_parser() -> argparse.ArgumentParser:
    from kdlab.version import __version__

    p = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation toolkit.")
    p.add_argument("--version", action="version", version=f"kdlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for spec in EXTENSIONS:
        mod, fn = spec.split(":")
        getattr(importlib.import_module(mod), fn)(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # set KDLAB_DEBUG=1 to see the full traceback of an error
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("kdlab: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, ImportError, RuntimeError) as e:
        if os.environ.get("KDLAB_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"kdlab: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
