"""Run-folder files: atomic writes and reads that name the file and the fix.

Every file kdlab writes into a run folder goes through :func:`write_json`, :func:`write_csv`,
:func:`atomic_savefig` (figures) or :func:`kdlab.core.checkpoint.atomic_save`: the content is written to a temporary file in the same
folder and renamed over the target, so a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


class RunFileError(ValueError):
    """A run file that cannot be read; the message names the file and what to do."""


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write, binary: bool = True) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``:
    a crash at any point leaves the old file or the new one, never a torn one. The file gets the
    mode ``open()`` gives a new file (``0o666`` less the umask, e.g. 0644), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give open()'s mode for a new file
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        named = write_error(e, path)
        if named is not None:
            raise named from None
        raise
    return path


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig`` (a Matplotlib figure) through :func:`atomic_write`: drawn into a temporary
    file beside ``path`` and renamed over it, so a failed draw or write leaves the old figure (or
    none), never a torn one. The format is ``path``'s suffix unless ``format=`` is given."""
    path = Path(path)
    fmt = kwargs.pop("format", None) or path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs))


def save_and_close(fig, path: str | os.PathLike, **kwargs) -> Path:
    """:func:`atomic_savefig` of a Matplotlib figure, then ``fig`` closed (also when the write
    fails); returns ``Path(path)``."""
    import matplotlib.pyplot as plt

    try:
        atomic_savefig(fig, path, **kwargs)
    finally:
        plt.close(fig)
    return Path(path)


def write_error(e: BaseException, path: Path) -> "OSError | None":
    """An ``OSError`` naming ``path`` for a failed write (a full disk, a read-only file system), or
    None to re-raise ``e`` as it is. ``torch.save`` reports a failed write as a RuntimeError
    without the path or the reason; a disk with (almost) no space left is taken as the reason."""
    import errno
    import shutil

    if isinstance(e, OSError):  # named by the target, not by the temporary file beside it
        return OSError(e.errno, e.strerror or str(e), str(path))
    if isinstance(e, RuntimeError) and "write" in str(e).lower():
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            return None
        if free < (4 << 20):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (non-JSON values through ``str``), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def read_json(path: str | os.PathLike, what: str = "run file", need: tuple = (),
              fix: str = "delete it and re-run the command that wrote it", numbers: tuple = ()) -> Any:
    """The JSON content of ``path``; a missing or unreadable file, one that is not an object
    holding the ``need`` keys, or one whose ``numbers`` keys (where present and not null) are not
    numbers, raises one line naming the file and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunFileError(f"{what} {path} is corrupt ({type(e).__name__}); {fix}") from None
    if need:
        missing = [k for k in need if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise RunFileError(f"{what} {path} lacks {', '.join(map(repr, missing))}; {fix}")
    if numbers and isinstance(obj, dict):
        bad = [k for k in numbers if obj.get(k) is not None
               and (isinstance(obj[k], bool) or not isinstance(obj[k], (int, float)))]
        if bad:
            raise RunFileError(f"{what} {path}: {bad[0]} is {obj[bad[0]]!r}, not a number; {fix}")
    return obj


def write_csv(path: str | os.PathLike, rows: Iterable[dict], fields: list[str] | None = None) -> Path:
    """Rows of dicts as CSV (columns: ``fields`` or every key in first-seen order), atomically."""
    rows = list(rows)
    if fields is None:
        fields = list(dict.fromkeys(k for row in rows for k in row))
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def check_out_dir(path: str | os.PathLike, what: str = "output folder", *, create: bool = True) -> Path:
    """Create ``path`` as a writable folder, or raise one line naming the problem and the fix
    (a file in the way, a file above it, no permission) instead of an OSError traceback.
    ``create=False``: only check that it could be created (nothing is written)."""
    path = Path(path)
    for up in [path, *path.parents]:
        if up.exists() and not up.is_dir():
            where = "is a file" if up == path else f"lies below the file {up}"
            raise ValueError(f"{what} {path} {where}; give a folder path (e.g. --out runs/NAME)")
        if up.exists():
            break
    if not create:
        if not os.access(up, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path} cannot be written ({up} is not writable); give a folder you can "
                             f"write to (--out) or fix its permissions")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {what} {path} ({e.strerror}); give a folder you can "
                         f"write to (--out)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} is not writable; give a folder you can write to (--out) "
                         f"or fix its permissions")
    return path


def check_out_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that the file ``path`` could be written (nothing is written): not a folder, and its
    folder could be created (:func:`check_out_dir`); else one ValueError line naming the fix."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path (e.g. {path / 'out.json'})")
    check_out_dir(path.parent, f"{what}'s folder", create=False)
    return path


def check_path_name(name: str, what: str = "name") -> str:
    """A name from a recipe that becomes part of a path under ``--out`` (a recipe or method name):
    relative, without ``..`` parts, backslashes or control characters; else one ValueError line."""
    bad = ""
    if not isinstance(name, str) or not name.strip():
        bad = "is empty"
    elif name.startswith(("/", "~")) or (len(name) > 1 and name[1] == ":"):
        bad = "is an absolute path"
    elif any(part == ".." for part in name.replace("\\", "/").split("/")):
        bad = "contains '..'"
    elif "\\" in name or any(ord(c) < 32 for c in name):
        bad = "contains a backslash or a control character"
    if bad:
        raise ValueError(f"{what} {name!r} {bad}; it names a folder under the output folder, so use "
                         f"letters, digits, '-', '_', '.' (and '/' for subfolders)")
    return name


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "path") -> Path:
    """``path`` if it lies inside the folder ``root`` (after resolving ``..`` and links), else one
    ValueError line: nothing a recipe names may be written outside the output folder."""
    root, path = Path(root), Path(path)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{what} {path} lies outside the output folder {root}; rename it so it stays "
                         f"inside (no '..' or absolute paths in names)")
    return path


#: Temporary files of :func:`atomic_write_text` / ``atomic_save`` (``<name>.<random>.tmp``).
TMP_GLOB = "*.*.tmp"


def clean_tmp(folder: str | os.PathLike, depth: int = 2) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (and subfolders down to
    ``depth``); returns them. Only call it while holding the folder's
    :class:`kdlab.core.lock.RunLock`, so no live writer's file is touched."""
    folder = Path(folder)
    found = []
    for d in range(depth):
        found += [p for p in folder.glob("/".join(["*"] * d + [TMP_GLOB])) if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def read_csv(path: str | os.PathLike, what: str = "metrics file") -> list[dict]:
    """Rows of a CSV written by :func:`write_csv` (values as strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise RunFileError(f"{what} {path} is corrupt ({type(e).__name__}); delete it and re-run the "
                           f"command that wrote it") from None
