"""Progress of long work: a bar (rate, time left) on a terminal, plain periodic lines when piped.

``progress_bar(total, desc, unit)`` returns an object with ``update(n=1)`` and ``close()`` (and
works as a context manager):

* on a terminal (``stream.isatty()``): a :mod:`tqdm` bar with the rate and the time left;
* piped or redirected: one plain line (no carriage return) at most every ``every_s`` seconds and one
  at the end, ``desc: 3/8 batch (38%), 1.2 batch/s, ~4s left``;
* disabled (``enabled=False``), or under torchrun on a rank other than 0 (``RANK`` in the
  environment): nothing at all.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional


def main_rank() -> bool:
    """True unless this process is a torchrun worker of rank > 0 (``RANK`` set and not 0)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PlainLines(Silent):
    """Periodic plain lines for logs: no ``\\r``, one line per ``every_s`` seconds and at the end."""

    def __init__(self, total: int, desc: str, unit: str, stream, every_s: float, clock=time.monotonic,
                 end_line: bool = True):
        self.total, self.desc, self.unit, self.stream, self.every_s = int(total), desc, unit, stream, every_s
        self.end_line, self.said = end_line, False
        self.clock = clock
        self.n, self.t0 = 0, clock()
        self.last = self.t0
        self.postfix = ""
        self.closed = False

    def line(self) -> str:
        el = self.clock() - self.t0
        rate = self.n / el if el > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = f", ~{fmt_seconds((self.total - self.n) / rate)} left" if rate > 0 and self.total > self.n else ""
        post = f"  {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.2f} {self.unit}/s, "
                f"{fmt_seconds(el)} elapsed{left}{post}")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every_s and self.n < self.total:
            self.last, self.said = now, True
            print(self.line(), file=self.stream, flush=True)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.end_line or self.said:
                print(self.line(), file=self.stream, flush=True)


def progress_bar(total: int, desc: str, unit: str = "batch", *, enabled: bool = True, stream=None,
                 every_s: float = 10.0, initial: int = 0, end_line: bool = True):
    """A progress display for ``total`` steps of ``unit`` (see the module doc). ``end_line=False``:
    piped, the closing line is printed only when a periodic one was (e.g. when another line
    reports the end, as the trainer's epoch lines do)."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not main_rank() or total <= 0:
        return Silent()
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, leave=False,
                    dynamic_ncols=True)
    bar = PlainLines(total, desc, unit, stream, every_s, end_line=end_line)
    bar.n = int(initial)
    return bar


def on_terminal(stream=None) -> Optional[bool]:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
