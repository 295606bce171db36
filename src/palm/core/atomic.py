"""Writing files and folders so that no reader ever sees half of one, and a crash loses nothing.

Everything is written to a temporary name beside its destination, flushed to disk (fsync), and
renamed into place; the folder holding it is fsynced too, so that the rename survives a power cut.
An existing destination is replaced only once its successor is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import PalmError

TEMP_MARK = ".tmp-"  # in the name of every temporary file or folder this module makes


class OutputError(PalmError):
    """An output path that cannot be written (under a file, unwritable, or an existing folder)."""


class DiskFullError(OutputError):
    """The device ran out of space while `path` was written; what was there before is untouched and the
    partial output is gone."""

    def __init__(self, path: Path):
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        super().__init__(
            f"no space left on the device to write {path} ({_size(free)} free once the partial "
            "output is removed); what was there before is untouched"
        )
        self.path, self.free = path, free


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def out_of_space(error: BaseException) -> bool:
    """Whether `error` is the device being full: ENOSPC (or EDQUOT), from Python or from a library that
    reports the OS error in its message (safetensors' Rust writer: "... (os error 28)")."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "os error 28" in str(error) or "No space left on device" in str(error)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def make_parent(path: Path) -> None:
    """Create `path`'s parent folders, or say in one line why they cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write {path}: a file is in the way of its folder") from None
    except NotADirectoryError:
        raise OutputError(f"cannot write {path}: a part of its folder path is a file") from None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def make_dir(path: Path) -> None:
    """Create the folder `path` (and its parents), or say in one line why it cannot be."""
    make_parent(path / "x")


def _umask() -> int:
    """The process's umask, read without setting it where Linux allows (os.umask sets it, which would race
    with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False, replace_all: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it is synced and renamed to `out`.

    If the body raises, `out` is untouched. An existing non-empty `out` is an error unless
    `overwrite`, and then it is swapped out only once the new contents are complete, and only when everything
    in it is something the new contents replace: a user's own files in a folder named by `--out --force` are
    never deleted (unless `replace_all`, for folders inside a run, which are palm's alone).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} already exists and is not empty (pass --force to replace it)")
    make_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any other folder
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
        except Exception as e:
            if out_of_space(e):
                shutil.rmtree(tmp, ignore_errors=True)  # first, so that the message counts the space it held
                raise DiskFullError(out) from None
            raise
        old = None
        if out.exists() and not replace_all:
            foreign = sorted({e.name for e in out.iterdir()} - {e.name for e in tmp.iterdir()})
            if foreign:
                shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
                raise OutputError(
                    f"{out} holds {shown}, which this output does not replace: --force replaces only "
                    "what palm writes there; move them away or choose another output"
                )
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """A file object on a temporary file beside `path`, renamed over `path` when the body succeeds."""
    path = Path(path)
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the result should look like any other file
        try:
            with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            if out_of_space(e):
                os.unlink(tmp)
                raise DiskFullError(path) from None
            raise
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str | Path, payload: Any, indent: int | None = 1) -> None:
    """JSON (UTF-8, non-ASCII kept) written atomically; values JSON cannot hold are written as str."""
    with atomic_file(path) as f:
        json.dump(payload, f, indent=indent, ensure_ascii=False, default=str)
        f.write("\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what an interrupted write left in `folder` (names holding TEMP_MARK); returns what went."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMP_MARK in p.name or ".old-" in p.name]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return stale
