"""The one atomic file writer, shared by the coordinator and the nodes (the only file I/O in ``common``).

A file is written to a temporary name in its own folder (``.<name>.<random>.tmp``), flushed and fsynced, renamed over
its final name, and the folder is fsynced: a crash leaves either the previous file or the complete new one, never a
half-written file under the final name, and the rename survives a power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
"""Suffix of the temporary files (a crash can leave one behind; its name starts with a dot)."""


def default_mode() -> int:
    """What a plain ``open(path, "w")`` would give: 0666 less the process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` (default :func:`default_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, default_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_folder(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_json_atomic(path: str | os.PathLike[str], value: Any, mode: int | None = None) -> Path:
    """:func:`write_text_atomic` of indented, key-sorted JSON (values JSON cannot hold are written with ``str``)."""
    return write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", mode)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; elsewhere a folder cannot be opened, and the rename is atomic)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
