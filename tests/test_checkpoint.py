"""Tests for server.checkpoint: exact round trips, corruption fallback, pruning, crashes mid-write."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import checkpoint as ckpt
from server.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def make_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "global.r4.enc.query.lora_A.weight": rng.normal(size=(4, 5)).astype(np.float32),
        "global.r4.enc.query.lora_B.weight": rng.normal(size=(6, 4)).astype(np.float32),
        "head.classifier.weight": np.asfortranarray(rng.normal(size=(3, 5))),
        "half": rng.normal(size=(2, 3)).astype(np.float16),
        "big-endian": np.arange(4, dtype=">f4"),
        "rng.torch": rng.integers(0, 255, size=16, dtype=np.uint8),
        "counts": np.arange(3, dtype=np.int64),
        "mask": np.array([True, False]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "nan": np.array([np.nan, np.inf, -0.0]),
    }


def make_meta(server_round: int) -> dict[str, Any]:
    return {
        "ranks": {"1234": 4, "5678": 8},
        "strategy": {"rule": "svd", "layout": [["enc.query", [6, 5]]]},
        "accountant": {"epsilon": 1.25, "history": [[1.1, 0.01, server_round]]},
        "rng": {"numpy": {"state": {"state": 2**100 + 7, "inc": 3}}, "python": [3, [1, 2, 3], None]},
        "metrics": [{"round": server_round, "eval-loss": math.pi, "note": "ok ✓"}],
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def test_round_trip_is_exact(folder: Path) -> None:
    # Arrange
    arrays, meta = make_arrays(0), make_meta(3)
    # Act
    path = save_checkpoint(folder, 3, arrays, meta)
    loaded = load_checkpoint(path)
    # Assert
    assert path == folder / "round-0003.ckpt" and loaded.path == path
    assert loaded.server_round == 3 and loaded.meta == meta
    assert set(loaded.arrays) == set(arrays)
    for name, value in arrays.items():
        got = loaded.arrays[name]
        assert got.dtype == value.dtype.newbyteorder("=") and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name, strict=False)
        assert np.array_equal(np.signbit(got), np.signbit(value)), name


def test_latest_checkpoint_is_the_highest_round_not_the_last_name(folder: Path) -> None:
    for server_round in (2, 9999, 10000):
        save_checkpoint(folder, server_round, {}, {"round": server_round})
    latest = load_latest_checkpoint(folder, required=True)
    assert latest.server_round == 10000 and latest.meta == {"round": 10000}


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "empty", "footer-only"])
def test_bad_latest_falls_back_to_previous_with_a_message(
    folder: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange
    save_checkpoint(folder, 1, make_arrays(1), make_meta(1))
    latest = save_checkpoint(folder, 2, make_arrays(2), make_meta(2))
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "flip-byte":
        latest.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    elif damage == "empty":
        latest.write_bytes(b"")
    else:
        latest.write_bytes(data[-ckpt.FOOTER_SIZE :])
    # Act
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        loaded = load_latest_checkpoint(folder)
    # Assert
    assert loaded is not None and loaded.server_round == 1 and loaded.meta == make_meta(1)
    assert str(latest) in caplog.text and "falling back" in caplog.text


def test_a_checkpoint_renamed_to_another_round_is_rejected(folder: Path) -> None:
    source = save_checkpoint(folder, 1, {}, {})
    os.replace(source, checkpoint_path(folder, 5))
    with pytest.raises(CheckpointError, match="round-0005.ckpt"):
        load_checkpoint(checkpoint_path(folder, 5))


def test_no_valid_checkpoint(folder: Path) -> None:
    assert load_latest_checkpoint(folder) is None
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_latest_checkpoint(folder, required=True)
    save_checkpoint(folder, 1, {}, {}).write_bytes(b"garbage")
    assert load_latest_checkpoint(folder) is None
    with pytest.raises(CheckpointError, match="round-0001.ckpt"):
        load_latest_checkpoint(folder, required=True)


def test_prune_keeps_the_newest_n(folder: Path) -> None:
    for server_round in range(1, 7):
        save_checkpoint(folder, server_round, make_arrays(server_round), {})
    removed = prune_checkpoints(folder, keep=2)
    assert sorted(p.name for p in removed) == [f"round-000{i}.ckpt" for i in range(1, 5)]
    assert [p.name for p in list_checkpoints(folder)] == ["round-0005.ckpt", "round-0006.ckpt"]


def test_prune_never_counts_a_corrupt_latest(folder: Path) -> None:
    for server_round in range(1, 4):
        save_checkpoint(folder, server_round, {}, {})
    checkpoint_path(folder, 3).write_bytes(b"half a checkpoint")
    prune_checkpoints(folder, keep=1)
    assert [p.name for p in list_checkpoints(folder)] == ["round-0002.ckpt", "round-0003.ckpt"]
    assert load_latest_checkpoint(folder, required=True).server_round == 2


def test_prune_validates_keep(folder: Path) -> None:
    with pytest.raises(ValueError, match="keep=0"):
        prune_checkpoints(folder, keep=0)


def test_partial_temp_file_from_a_crash_is_never_visible(folder: Path) -> None:
    # Arrange: round 1 complete, then a writer died halfway through round 2's temporary file
    save_checkpoint(folder, 1, make_arrays(1), make_meta(1))
    full = ckpt._encode(2, make_arrays(2), make_meta(2))
    partial = folder / ".round-0002.ckpt.abc123.tmp"
    partial.write_bytes(full[: len(full) // 3])
    # Act
    loaded = load_latest_checkpoint(folder, required=True)
    removed = prune_checkpoints(folder, keep=5)
    # Assert
    assert loaded.server_round == 1
    assert [p.name for p in list_checkpoints(folder)] == ["round-0001.ckpt"]
    assert removed == [partial] and not partial.exists()


def test_crash_during_write_leaves_previous_state(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    save_checkpoint(folder, 1, make_arrays(1), make_meta(1))

    def die(fd: int) -> None:
        raise OSError("simulated power loss during fsync")

    monkeypatch.setattr(ckpt.os, "fsync", die)
    # Act
    with pytest.raises(OSError, match="power loss"):
        save_checkpoint(folder, 2, make_arrays(2), make_meta(2))
    # Assert
    assert sorted(p.name for p in folder.iterdir()) == ["round-0001.ckpt"]
    assert load_latest_checkpoint(folder, required=True).server_round == 1


def test_overwriting_a_round_is_atomic(folder: Path) -> None:
    save_checkpoint(folder, 4, {"x": np.zeros(2)}, {"v": 1})
    save_checkpoint(folder, 4, {"x": np.ones(2)}, {"v": 2})
    loaded = load_latest_checkpoint(folder, required=True)
    assert loaded.meta == {"v": 2} and np.array_equal(loaded.arrays["x"], np.ones(2))


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"ranks": {1234: 4}}, "1234"),
        ({"shape": (6, 5)}, "use a list"),
        ({"x": np.int64(3)}, "int64"),
        ({"x": {1, 2}}, "set"),
    ],
)
def test_meta_that_would_not_round_trip_is_refused(folder: Path, meta: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        save_checkpoint(folder, 1, {}, meta)
    assert list_checkpoints(folder) == []


@pytest.mark.parametrize(
    ("server_round", "arrays"),
    [(-1, {}), (True, {}), (1, {"c": np.zeros(2, np.complex128)}), (1, {"l": [1.0]})],
)
def test_bad_round_or_arrays_are_refused(folder: Path, server_round: int, arrays: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        save_checkpoint(folder, server_round, arrays, {})
