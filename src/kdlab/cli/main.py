"""The `kdlab` command line: one argparse app.

Each module in :data:`COMMANDS` has ``register(subparsers)`` adding its commands; a new command
family is one module plus one line here. Command modules only parse arguments (with the shared
groups of :mod:`kdlab.cli.args`) and call the library, which they import inside the command
functions: building the parser and printing help import neither torch nor any library module.
"""

from __future__ import annotations

import argparse
import os
import sys

from kdlab.cli import bench, compress, diffusion, explain, lm, methods, robustness, run, tune

#: The command modules, in the order their commands are listed by ``kdlab --help``.
COMMANDS = [run, methods, explain, robustness, compress, bench, lm, tune, diffusion]


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``kdlab: error: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"kdlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from kdlab.version import __version__

    p = OneLineParser(
        prog="kdlab", description="Knowledge distillation toolkit.",
        epilog="`kdlab COMMAND --help` for a command's options. Set KDLAB_DEBUG=1 to see the "
               "full traceback of an error.")
    p.add_argument("--version", action="version", version=f"kdlab {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error: one line (OneLineParser) and SystemExit(2)
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
        print(f"kdlab: error: {one_line(msg)}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that cannot be written or read
        if os.environ.get("KDLAB_DEBUG"):
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"kdlab: error: cannot use{where}: {e.strerror or e}; check the path and its permissions "
              f"(--out, --data-dir, checkpoint paths)", file=sys.stderr)
        return 2
    return int(rc or 0)


def one_line(msg: str) -> str:
    """An error message on one line: a library's multi-line message keeps its first line."""
    lines = [l for l in str(msg).splitlines() if l.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else str(msg)
    return f"{lines[0]} (KDLAB_DEBUG=1 shows the rest)"


if __name__ == "__main__":
    sys.exit(main())
