"""One process per run folder: an exclusive lock on RUN/.lock, held while the run trains.

The lock is the kernel's (flock), so it goes away with the process however it ends (kill -9
included); the file itself stays, holding the pid of the last holder for the message a second
process gets.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..core.errors import PalmError


class RunInUseError(PalmError):
    """Another process is training this run."""


class RunLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(
                f"{self.path.parent} is being trained by another process (pid {holder}); "
                "wait for it to end, or stop it, before resuming"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
