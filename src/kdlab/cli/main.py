"""The `kdlab` command line: one argparse app.

Each module in :data:`COMMANDS` has ``register(subparsers)`` adding its commands; a new command
family is one module plus one line here. Command modules only parse arguments (with the shared
groups of :mod:`kdlab.cli.args`) and call the library, which they import inside the command
functions: building the parser and printing help import neither torch nor any library module.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from kdlab.cli import bench, compress, diffusion, explain, lm, methods, robustness, run, tune

#: The command modules, in the order their commands are listed by ``kdlab --help``.
COMMANDS = [run, methods, explain, robustness, compress, bench, lm, tune, diffusion]


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``kdlab: error: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"kdlab: error: {suggest(message, self.prog)} (see `{self.prog} --help`)\n")


_CHOICE = re.compile(r"argument (?P<arg>[^:]+): invalid choice: '?(?P<value>[^' ]*)'? \(choose from (?P<choices>.*)\)$")


def suggest(message: str, prog: str) -> str:
    """argparse's "invalid choice" message with the closest valid choice named: a mistyped command
    (losss for losses) gets ``did you mean `kdlab losses`?`` (a command that exists), other choices
    ``did you mean 'both'?``; any other message is returned as it is."""
    import difflib

    m = _CHOICE.match(message.strip())
    if not m:
        return message
    choices = re.findall(r"'([^']*)'", m["choices"]) or [c.strip() for c in m["choices"].split(",")]
    close = difflib.get_close_matches(m["value"], choices, n=1, cutoff=0.6)
    if m["arg"] in ("COMMAND", "LM_COMMAND"):
        hint = f"; did you mean `{prog} {close[0]}`?" if close else ""
        return f"unknown command '{m['value']}'{hint} (commands: {', '.join(choices)})"
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"argument {m['arg']}: invalid choice '{m['value']}'{hint} (choose from {', '.join(choices)})"


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        parser.exit(2, f"kdlab: error: unknown option {argv[0]} before the command; options go after it "
                       f"(`kdlab COMMAND --help` lists a command's options)\n")
    args, extra = parser.parse_known_args(argv)  # a usage error: one line (OneLineParser), SystemExit(2)
    if extra:  # named with the command's own help, not the top-level one
        prog = " ".join(["kdlab", *(c for c in (getattr(args, "command", None),
                                                getattr(args, "lm_command", None)) if c)])
        parser.exit(2, f"kdlab: error: unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)\n")
    # set KDLAB_DEBUG=1 to see the full traceback of an error
    previous = watch_interrupts()
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe (`kdlab recipes | head -3`) shows here, not at exit
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        return interrupted(args)
    except Exception as e:
        if INTERRUPTS["received"]:  # Ctrl-C inside a library that turned it into its own error
            return interrupted(args)  # (torch.save: "RuntimeError: [enforce fail at inline_container.cc]")
        if os.environ.get("KDLAB_DEBUG") or not isinstance(e, (ValueError, KeyError, FileNotFoundError,
                                                               ImportError, RuntimeError, MemoryError, OSError)):
            raise
        return error(e)
    finally:
        stop_watching(previous)
    return int(rc or 0)


def error(e: Exception) -> int:
    """Print ``e`` as the one ``kdlab: error:`` line; exit status 2."""
    oom = out_of_memory(e) if isinstance(e, (RuntimeError, MemoryError)) else ""
    if oom:
        print(f"kdlab: error: {oom}", file=sys.stderr)
    elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # a path that cannot be written
        # or read (a missing file's own message already names it and the fix)
        print(f"kdlab: error: {os_error_line(e)}", file=sys.stderr)
    else:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"kdlab: error: {one_line(msg)}", file=sys.stderr)
    return 2


#: ``received``: a SIGINT arrived while a command ran; ``handler``: the one recording it
#: (:func:`watch_interrupts`)
INTERRUPTS: dict = {"received": False, "handler": None}


def watch_interrupts():
    """While a command runs, SIGINT is recorded before it raises ``KeyboardInterrupt`` (as Python's
    default handler does), so that an error a library makes of the interrupt (torch's checkpoint
    writer turns it into a ``RuntimeError``) is still reported as the interrupt. Returns the
    handler to restore (None when not on the main thread or SIGINT is not Python's default)."""
    import signal

    INTERRUPTS["received"] = False

    def record(signum, frame):
        INTERRUPTS["received"] = True
        raise KeyboardInterrupt

    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None  # ignored (nohup) or a handler of the caller's: left alone
        INTERRUPTS["handler"] = record
        return signal.signal(signal.SIGINT, record)
    except ValueError:  # not the main thread (kdlab.cli.main.main called from a thread)
        return None


def stop_watching(previous) -> None:
    """Restore the SIGINT handler :func:`watch_interrupts` replaced, unless the interrupt already
    installed :func:`exit_on_next_interrupt`'s."""
    import signal

    if previous is None:
        return
    try:
        if signal.getsignal(signal.SIGINT) is INTERRUPTS.get("handler"):
            signal.signal(signal.SIGINT, previous)
    except ValueError:
        pass


def interrupted(args) -> int:
    """The interrupt line (status 130): what to do next, by the command's ``on_interrupt(args)``
    (set by commands that do not resume: a benchmark's timings), else re-running it resumes. A
    second Ctrl-C then ends the process at once."""
    hint = getattr(args, "on_interrupt", None)
    print(f"kdlab: interrupted; {hint(args) if hint else 're-run the same command to resume'}", file=sys.stderr)
    exit_on_next_interrupt()
    return 130


def stdout_closed() -> int:
    """The reader of stdout went away (``kdlab recipes | head -3``): stop quietly, the way the Python
    documentation shows (its "Note on SIGPIPE"): stdout is pointed at devnull so that the flush at
    interpreter exit does not fail a second time; exit status 141 (128 + SIGPIPE), what a shell
    reports for a command a closed pipe stopped."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no real file (called in-process)
        pass
    return 141


_OOM = ("can't allocate memory", "out of memory", "failed to allocate memory")


def out_of_memory(e: BaseException) -> str:
    """The one line for an exhausted memory (torch's CPU allocator, ``torch.OutOfMemoryError``, a
    ``MemoryError``), naming the fix; ``""`` when ``e`` is another error."""
    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or any(k in text.lower() for k in _OOM)):
        return ""
    where = "GPU" if "cuda" in text.lower() or "gpu" in text.lower() else "CPU"
    first = (text.splitlines() or [type(e).__name__])[0].strip()
    return (f"{where} memory ran out ({first[:160]}); lower --batch-size (or the recipe's train.batch_size, "
            f"--set train.batch_size=N)")


def os_error_line(e: OSError) -> str:
    """What went wrong with a file, the file, and what to do (one line)."""
    import errno

    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device to write{where}; free some space and re-run the same command "
                f"(the files written before are kept whole)")
    if e.errno == errno.EROFS:
        return f"cannot write{where}: the file system is read-only; give an --out folder on a writable disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot use{where}: permission denied; give a folder you can write to (--out) or fix its permissions"
    return (f"cannot use{where}: {e.strerror or e}; check the path and its permissions "
            f"(--out, --data-dir, checkpoint paths)")


def exit_on_next_interrupt() -> None:
    """After a first Ctrl-C: a second one ends the process at once, silently (exit status 130),
    instead of a traceback from whatever clean-up (``atexit`` handlers, a cache being saved) it
    interrupts. Every file kdlab writes is replaced atomically, so nothing half-written is left
    behind; run locks are released by the operating system."""
    import signal

    def now(signum, frame):
        os._exit(130)

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        signal.signal(signal.SIGINT, now)
    except ValueError:  # not the main thread (kdlab.cli.main.main called from a thread)
        pass


def one_line(msg: str) -> str:
    """An error message on one line: a library's multi-line message keeps its first line."""
    lines = [l for l in str(msg).splitlines() if l.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else str(msg)
    return f"{lines[0]} (KDLAB_DEBUG=1 shows the rest)"


if __name__ == "__main__":
    sys.exit(main())
