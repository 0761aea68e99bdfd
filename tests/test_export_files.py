"""Result files written atomically: whole, replaced in one step, and as readable as a plain write."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from common.atomic_file import write_json_atomic, write_text_atomic


def test_an_atomic_write_has_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    write_text_atomic(atomic, "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_the_umask_is_respected_and_left_as_it_was(tmp_path: Path) -> None:
    before = os.umask(0o077)
    try:
        write_json_atomic(tmp_path / "private.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
        assert os.umask(0o077) == 0o077
    finally:
        os.umask(before)


def test_a_rewrite_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"round": 1})
    write_json_atomic(path, {"round": 2})
    assert json.loads(path.read_text()) == {"round": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
