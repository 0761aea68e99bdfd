"""One writer per run folder: the coordinator that writes a run holds its lock for the whole run.

An exclusive ``flock`` on ``<run folder>/.fedlora.lock``, whose text names the holder. The kernel releases it when
the holder's process dies however it dies, so the lock of a killed coordinator is taken over by the next one with
nothing to clean up; while the holder lives, a second writer (a resume, another simulation with the same output
folder) is refused with the holder's name.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".fedlora.lock"


class RunFolderBusy(RuntimeError):
    """Another live process writes this run folder."""


class RunLock:
    """The exclusive lock of one run folder, held from :meth:`acquire` until :meth:`release` or process exit."""

    def __init__(self, folder: Path, holder: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderBusy` naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.path.parent} is in use by {holder_of(self.path)}; wait for that run to end or stop "
                "it first"
            ) from None
        text = f"pid {os.getpid()} on {socket.gethostname()}, {self.holder}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the next writer in (the file stays; its text is stale and harmless once the lock is free)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder_of(path: Path) -> str:
    """What the lock file says about its holder."""
    try:
        return path.read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        return "another process"


def check_free(folder: Path) -> None:
    """Raise :class:`RunFolderBusy` when a live process holds the run folder's lock (a check, not a claim)."""
    if not (Path(folder) / LOCK_NAME).exists():
        return
    RunLock(folder, "a check").acquire().release()
