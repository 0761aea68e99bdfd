"""Crash-safe per-round checkpoints: one checksummed file per round, written atomically.

A checkpoint file ``round-NNNN.ckpt`` is::

    MAGIC | header length (u64, little-endian) | header JSON | safetensors bytes | b"sha256:" hex digest b"\\n"

The header holds ``{"format": 1, "server-round": N, "meta": {...}}``; the safetensors part holds the named arrays
(global factors at every rank needed, the head, RNG states that are arrays). The SHA-256 digest covers everything
before the footer, so a truncated or corrupted file is detected on load.

A file is written atomically (:func:`common.atomic_file.write_bytes_atomic`: ``.round-NNNN.ckpt.<random>.tmp``,
fsync, rename, fsync of the folder): a crash leaves either the previous state or the complete new file, never a
half one under a checkpoint name. :func:`load_latest_checkpoint` skips a bad latest file with a
warning naming it and falls back to the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import safetensors.numpy

from common.atomic_file import TEMP_SUFFIX, write_bytes_atomic

log = logging.getLogger(__name__)

MAGIC = b"FEDLORA-CKPT\n"
FORMAT = 1
FOOTER_PREFIX = b"sha256:"
FOOTER_SIZE = len(FOOTER_PREFIX) + 64 + 1
_NAME = re.compile(r"^round-(\d+)\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, or no valid checkpoint exists where one was required."""


@dataclass(frozen=True)
class Checkpoint:
    """The state saved after one round."""

    server_round: int
    """The last round this state includes."""
    arrays: dict[str, np.ndarray]
    """Named arrays, exactly as saved (dtype, shape, values)."""
    meta: dict[str, Any]
    """JSON metadata: node ranks, strategy and accountant state, RNG states, metrics so far."""
    path: Path
    """The file it was read from."""


def checkpoint_path(folder: str | os.PathLike[str], server_round: int) -> Path:
    """Return the file name a round's checkpoint has in ``folder``."""
    return Path(folder) / f"round-{server_round:04d}.ckpt"


def save_checkpoint(
    folder: str | os.PathLike[str], server_round: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> Path:
    """Write one round's checkpoint atomically and return its path.

    ``meta`` must be plain JSON (dicts with ``str`` keys, lists, str, int, float, bool, None) so that it loads back
    equal; a tuple or an ``int`` dict key (which JSON would silently turn into a list or a string) is refused.
    Raises ``ValueError`` naming a bad round, array or metadata entry.
    """
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise ValueError(f"server_round must be a non-negative integer, got server_round={server_round!r}")
    payload = _encode(server_round, arrays, meta)
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return write_bytes_atomic(checkpoint_path(folder, server_round), payload + FOOTER_PREFIX + digest + b"\n", 0o600)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify one checkpoint file; raise :class:`CheckpointError` naming the file if it is bad."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    try:
        return _decode(data, path)
    except CheckpointError:
        raise
    except Exception as err:  # past the checksum, a parse error means a writer bug; still name the file
        raise CheckpointError(f"checkpoint {path} cannot be parsed: {err}") from None


@overload
def load_latest_checkpoint(folder: str | os.PathLike[str], *, required: Literal[True]) -> Checkpoint: ...
@overload
def load_latest_checkpoint(folder: str | os.PathLike[str], *, required: bool = False) -> Checkpoint | None: ...
def load_latest_checkpoint(folder: str | os.PathLike[str], *, required: bool = False) -> Checkpoint | None:
    """Return the newest valid checkpoint in ``folder``, skipping bad ones with a warning; ``None`` if none.

    With ``required=True``, raise :class:`CheckpointError` instead of returning ``None``.
    """
    skipped: list[str] = []
    for path in list_checkpoints(folder)[::-1]:
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            skipped.append(path.name)
    if required:
        detail = f" (skipped invalid: {', '.join(skipped)})" if skipped else ""
        raise CheckpointError(f"no valid checkpoint in {folder}{detail}; cannot resume, aborting")
    return None


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Return the checkpoint files in ``folder`` (valid or not), oldest round first; temporary files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` valid checkpoints, and leftover temporary files; return what was deleted.

    Files are verified newest first; older files are deleted only once ``keep`` valid ones are found, so a
    corrupt latest file never costs the last good state. Invalid files newer than the kept ones are left for
    inspection.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer, got keep={keep!r}")
    folder = Path(folder)
    removed = [p for p in folder.glob(f".round-*.ckpt.*{TEMP_SUFFIX}") if p.is_file()] if folder.is_dir() else []
    valid = 0
    for path in list_checkpoints(folder)[::-1]:
        if valid >= keep:
            removed.append(path)
            continue
        try:
            load_checkpoint(path)
            valid += 1
        except CheckpointError as err:
            log.warning("%s; keeping it for inspection", err)
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed


def _encode(server_round: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    _check_json("meta", meta)
    header = json.dumps({"format": FORMAT, "server-round": server_round, "meta": meta}, sort_keys=True)
    tensors: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise ValueError(f"arrays must map str to numpy arrays, got {name!r}: {type(value).__name__}")
        # safetensors copies raw memory: a Fortran-ordered or big-endian array would come back scrambled
        # (np.asarray, unlike np.ascontiguousarray, keeps a 0-d array 0-d)
        tensors[name] = np.asarray(value, dtype=value.dtype.newbyteorder("="), order="C")
    try:
        body = safetensors.numpy.save(tensors)
    except Exception as err:
        raise ValueError(f"arrays cannot be saved as safetensors: {err}") from None
    header_bytes = header.encode("utf-8")
    return MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + body


def _decode(data: bytes, path: Path) -> Checkpoint:
    payload, footer = data[:-FOOTER_SIZE], data[-FOOTER_SIZE:]
    if len(data) < len(MAGIC) + 8 + FOOTER_SIZE or not footer.startswith(FOOTER_PREFIX):
        raise CheckpointError(f"checkpoint {path} is truncated or not a fedlora checkpoint ({len(data)} bytes)")
    expected = footer[len(FOOTER_PREFIX) : -1].decode("ascii", errors="replace")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 {actual} does not match the recorded {expected}")
    if not payload.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} does not start with the fedlora checkpoint magic")
    (header_len,) = struct.unpack_from("<Q", payload, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(payload[start : start + header_len].decode("utf-8"))
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {header.get('format')!r}; this code reads {FORMAT}")
    server_round = header["server-round"]
    match = _NAME.match(path.name)
    if match and int(match.group(1)) != server_round:
        raise CheckpointError(f"checkpoint {path} holds round {server_round}, not the round in its name")
    arrays = safetensors.numpy.load(payload[start + header_len :])
    return Checkpoint(server_round, dict(sorted(arrays.items())), header["meta"], path)


def _check_json(where: str, value: Any) -> None:
    if value is None or isinstance(value, str | bool | int | float):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(f"{where}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has key {key!r} of type {type(key).__name__}; JSON keys must be str")
            _check_json(f"{where}[{key!r}]", item)
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    raise ValueError(f"{where} is a {type(value).__name__}, which does not survive JSON{hint}")
