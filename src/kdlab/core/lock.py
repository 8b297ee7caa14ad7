"""A lock on a run folder, so that two kdlab processes never write into the same run.

:class:`RunLock` takes an exclusive ``fcntl.flock`` on ``<folder>/.kdlab.lock``. The kernel drops a
flock when the process that holds it ends for any reason (``kill -9`` included), so a crashed run
never leaves a stuck lock: the lock *file* stays, but nobody holds it. A second process asking for
the same folder is refused at once with one line naming the folder and the holder's pid.
A clean release deletes the lock file (while still holding the lock; a process that locked the
deleted file notices that the path now names another file and tries again), so a finished run
folder holds only its run files.

The same process may take the lock of a folder it already holds (re-entrant, counted), so nested
code paths of one run need not coordinate. On systems without ``fcntl`` (Windows) the lock is a
no-op. Network file systems that do not support flock are not protected.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".kdlab.lock"
_HELD: dict[str, list] = {}  # resolved folder -> [fd, count] held by this process


class RunLockedError(ValueError):
    """The run folder is in use by another process (one line, names the folder and the fix)."""


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


class RunLock:
    """Exclusive lock of a run folder; use as a context manager or with acquire()/release().

    Args:
        folder: the run folder (created when missing).
        what: how the folder is named in the refusal message (e.g. ``run folder``).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run folder"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        key = str(self.folder.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            self.held = True
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunLockedError(
                    f"{self.what} {self.folder} is in use by another kdlab process{_holder(self.path)}; "
                    f"wait for it to finish or give another output folder") from None
            try:  # the holder may have deleted the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - 20 lost races in a row
            raise RunLockedError(f"{self.what} {self.folder} is being locked and unlocked by other "
                                 f"processes; try again")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _HELD[key] = [fd, 1]
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.folder.resolve())
        ent = _HELD.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] == 0:
            del _HELD[key]
            try:
                self.path.unlink()  # still locked: nobody else can hold this file now
            except OSError:
                pass
            if fcntl is not None:
                fcntl.flock(ent[0], fcntl.LOCK_UN)
            os.close(ent[0])

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(folder: str | os.PathLike) -> bool:
    """Whether another process holds the lock of ``folder`` (False when this process holds it)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    if fcntl is None or not path.is_file() or str(folder.resolve()) in _HELD:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may just have taken
    return False


@contextmanager
def file_lock(path):
    """An exclusive, blocking ``flock`` on the file ``path`` for the ``with`` block (a no-op where
    fcntl is missing): what the workers of a shared ``kdlab tune`` study ask for trials under.
    :class:`RunLock` is the non-blocking lock of a run folder."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
