"""The command line's shared options, declared once and used by every command that has them.

=================  =========================================================================
``--out DIR``      the command's output folder (default: a folder under ``runs/`` named in
                   each command's help)
``--quiet``        no progress bars (``--no-progress`` is a hidden, deprecated alias)
``--set K=V``      override a recipe value, repeatable (``--set train.epochs=5``)
``--device D``     ``auto`` (default: CUDA when available, else CPU, as recipes resolve it),
                   ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. On recipe commands it sets
                   ``train.device`` when given; without it the recipe's own value counts
                   (itself ``auto`` unless the recipe says otherwise)
``--seeds S ...``  seeds as a list and/or inclusive ranges: ``--seeds 0 1 2``, ``--seeds 0-9``,
                   ``--seeds 0-4 10``; ``--n-seeds N`` means seeds ``0 .. N-1``. Without either:
                   the recipe's ``study.seeds`` (``0 1 2`` unless the recipe says otherwise)
``--data-dir DIR`` folder with the data set files (the CIFAR pickles)
=================  =========================================================================

``--seeds 5`` is seed 5, never "five seeds": a count is always spelled ``--n-seeds 5``.

This module imports only the standard library, so ``kdlab --help`` stays fast (no torch).
"""

from __future__ import annotations

import argparse
import re

#: Value of ``--device`` when not given.
DEFAULT_DEVICE = "auto"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_seeds(tokens) -> list[int]:
    """Seeds from command-line tokens: each a non-negative integer ``k`` or an inclusive range
    ``a-b`` (``a <= b``); a token may also hold several, comma-separated (``0,1,5-7``).

    ``parse_seeds(["0-2", "5"]) == [0, 1, 2, 5]``. Order is kept; a repeated seed is an error.
    """
    seeds: list[int] = []
    for tok in tokens:
        for part in str(tok).split(","):
            part = part.strip()
            m = _RANGE.match(part)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if a > b:
                    raise ValueError(f"seed range '{part}' runs backwards; write it as {b}-{a}")
                seeds.extend(range(a, b + 1))
            elif part.isdigit():
                seeds.append(int(part))
            else:
                raise ValueError(f"'{part}' is not a seed: give integers and ranges, e.g. "
                                 f"--seeds 0 1 2 or --seeds 0-9 (or --n-seeds 10)")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"seed(s) {', '.join(map(str, dup))} given twice in --seeds")
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    return seeds


def check_device(spec: str) -> str:
    """``spec`` if it names a device kdlab accepts (``auto``, ``cpu``, ``cuda``, ``cuda:N``,
    ``mps``), else a one-line ValueError."""
    if not _DEVICE.match(str(spec)):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got '{spec}'")
    return str(spec)


def whole(lo: int | None = None, hi: int | None = None):
    """An argparse ``type`` for a whole number in ``[lo, hi]``: a bad value is one usage line that
    names the flag (``argument --threads: must be a whole number >= 1, got '-1'``)."""
    def parse(text: str) -> int:
        try:
            v = int(str(text).strip())
        except ValueError:
            v = None
        if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be a whole number {_span(lo, hi)}, got '{text}'")
        return v
    parse.__name__ = "whole number"
    return parse


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False):
    """An argparse ``type`` for a finite number in ``[lo, hi]`` (``lo_open``/``hi_open``: the bound
    itself excluded); NaN and infinity are refused, naming the flag."""
    import math

    def parse(text: str) -> float:
        try:
            v = float(str(text).strip())
        except ValueError:
            v = math.nan
        ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(
                f"must be a number {_span(lo, hi, lo_open, hi_open)}, got '{text}'")
        return v
    parse.__name__ = "number"
    return parse


def _span(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    a = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
    b = f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""
    if a and b:
        return f"{'in (' if lo_open else 'in ['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return a or b or "(any)"


def act_bits(text: str):
    """``--act-bits``: a whole number of bits in [2, 16], or ``none`` (activations stay float)."""
    if str(text).strip().lower() in ("none", "fp"):
        return "none"
    try:
        return whole(2, 16)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a whole number of bits in [2, 16] or 'none', got '{text}'") from None


#: Common flag types: counts of at least one, counts that may be zero, seeds.
POSITIVE = whole(1)
COUNT = whole(0)
SEED = whole(0)
FRACTION = number(0.0, 1.0)


class _SeedsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_seeds(values))
        except ValueError as e:
            parser.error(str(e))


class _NSeedsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if values < 1:
            parser.error(f"--n-seeds must be >= 1, got {values}")
        setattr(namespace, self.dest, list(range(values)))


class _DeviceAction(argparse.Action):
    """Stores the device and remembers that it was given (recipe commands override
    ``train.device`` only then)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, check_device(values))
        except ValueError as e:
            parser.error(str(e))
        namespace.device_given = True


# --------------------------------------------------------------------------- the groups
def folder(text: str) -> str:
    """An argparse ``type`` for a folder path: an empty one (``--out ''``) is refused instead of
    falling back to the default folder."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("give a folder path (got an empty one), or leave the option out for "
                                         "the default")
    return str(text)


def add_out(p: argparse.ArgumentParser, default_help: str) -> None:
    """``--out DIR``; ``default_help`` says where output goes without it."""
    p.add_argument("--out", metavar="DIR", default=None, type=folder,
                   help=f"output folder (default: {default_help})")


def add_quiet(p: argparse.ArgumentParser) -> None:
    """``--quiet`` (and the hidden, deprecated ``--no-progress``)."""
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_set(p: argparse.ArgumentParser, what: str = "the recipe", example: str = "") -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``; ``example`` replaces the default
    example text."""
    example = example or ("e.g. --set train.epochs=5 (also bounds the epochs of a teacher trained on the "
                          "way, and DeepInversion's synthesis steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a value of {what}, {example} (repeatable)")


def add_device(p: argparse.ArgumentParser, recipe: bool = False) -> None:
    """``--device`` (default ``auto``: CUDA when available, else CPU)."""
    extra = ("; sets the recipe's train.device when given, else the recipe's own value counts"
             if recipe else "")
    p.add_argument("--device", default=DEFAULT_DEVICE, action=_DeviceAction, metavar="DEVICE",
                   help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps "
                        f"(default: auto{extra})")
    p.set_defaults(device_given=False)


def add_seeds(p: argparse.ArgumentParser) -> None:
    """``--seeds S [S ...]`` (integers and inclusive ranges ``a-b``) or ``--n-seeds N``
    (seeds ``0..N-1``), both into ``args.seeds``; default None (the recipe's ``study.seeds``)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seeds", nargs="+", action=_SeedsAction, default=None, metavar="S",
                   help="seeds: integers and inclusive ranges, e.g. --seeds 0 1 2 or --seeds 0-9 "
                        "(default: the recipe's study.seeds, 0 1 2 unless it says otherwise)")
    g.add_argument("--n-seeds", dest="seeds", type=int, action=_NSeedsAction, metavar="N",
                   help="N seeds: 0 .. N-1 (the same as --seeds 0-<N-1>)")


def add_parallel(p: argparse.ArgumentParser) -> None:
    """``--jobs N --threads T --launcher local|submitit --launcher-opt KEY=VALUE``: run a study's
    independent runs in parallel (kdlab.experiments.parallel)."""
    p.add_argument("--jobs", type=POSITIVE, default=1, metavar="N",
                   help="runs at once: N local processes or N submitit tasks (default 1: one after another)")
    p.add_argument("--threads", type=POSITIVE, default=None, metavar="T",
                   help="torch threads per run (default: the cores divided by --jobs)")
    p.add_argument("--launcher", choices=["local", "submitit"], default="local",
                   help="local processes, or submitit (a Slurm job array; cluster=local runs it here)")
    p.add_argument("--launcher-opt", dest="launcher_opts", action="append", default=[], metavar="KEY=VALUE",
                   help="a submitit option, e.g. slurm_partition=gpu, timeout_min=120 (repeatable)")


def parallel_kwargs(args) -> dict:
    """The ``jobs/launcher/threads/launcher_options`` keywords of run_study from the parsed flags."""
    opts = {}
    for item in args.launcher_opts:
        if "=" not in item:
            raise ValueError(f"--launcher-opt '{item}' must look like KEY=VALUE (e.g. timeout_min=120)")
        k, v = item.split("=", 1)
        import yaml

        opts[k.strip()] = yaml.safe_load(v)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    return {"jobs": args.jobs, "launcher": args.launcher, "threads": args.threads, "launcher_options": opts or None}


def add_data_dir(p: argparse.ArgumentParser) -> None:
    """``--data-dir DIR``."""
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the data set files, e.g. the CIFAR pickles "
                        "(default: $KDLAB_DATA_DIR or ./data)")


def recipe_overrides(args, with_data_dir: bool = True) -> list[str]:
    """The ``--set`` overrides of a recipe command, plus ``train.device`` from an explicit
    ``--device`` and (``with_data_dir``) ``data.data_dir`` from ``--data-dir``."""
    ov = list(getattr(args, "overrides", None) or [])
    if with_data_dir and getattr(args, "data_dir", None):
        ov.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "device_given", False):
        ov.append(f"train.device={args.device}")
    return ov


def progress(args) -> bool:
    """Progress bars on unless ``--quiet``."""
    return not getattr(args, "quiet", False)
