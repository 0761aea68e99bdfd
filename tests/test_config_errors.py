"""A broken config is refused before anything starts: exit 2, one line naming the problem, no traceback, nothing
written. Each case once made every node fail every round (while the run said "completed"), or ended in a
traceback or a vague error."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_SETTINGS, run_fedlora, settings_flags

TINY = settings_flags({k: v for k, v in TINY_SETTINGS.items() if k != "num-rounds"})


def refused(tmp_path: Path, args: list[str], expected: str) -> None:
    """``fedlora ARGS`` exits 2 with one ``fedlora: error:`` line containing ``expected`` and writes nothing."""
    out = tmp_path / "out"
    done = (
        run_fedlora(*args, timeout=180) if args[0] == "resume" else run_fedlora(*args, "--out", str(out), timeout=180)
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("fedlora: error:"), done.stderr
    assert expected in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ('target-modules="query,qkv_proj"', "target-modules qkv_proj match no linear layer of model tiny"),
        ('inject-faults="partition-1:explode@2"', "inject-faults item 'partition-1:explode@2' must look like"),
        ("seed=-1", "seed must be a non-negative integer, got -1"),
        ("keep-checkpoints=0", "keep-checkpoints must be at least 1, got 0"),
        ("norm-factor=0.5", "norm-factor must be >= 1"),
        ("max-num-examples=0", "max-num-examples must be at least 1, got 0"),
        ("node-ranks=100", "node-ranks (100,) exceed max-rank 64"),
        ("num-rounds=1e23", "num-rounds does not fit in 64 bits"),
        ("num-rounds=1e9", "num-rounds must be in 1..100000"),
        ("round-timeout=1e300", "round-timeout must be at most"),
        ("seed=99999999999999999999", "seed does not fit in 64 bits"),
        ("model=[1, 2]", "model must be a single value"),
        ("num-rounds=[3]", "num-rounds must be a single value"),
    ],
)
def test_a_bad_value_is_refused_before_anything_starts(tmp_path: Path, setting: str, expected: str) -> None:
    refused(tmp_path, ["simulate", *TINY, "--set", setting], expected)


def test_a_task_that_cannot_be_split_over_the_nodes_is_refused_saying_why(tmp_path: Path) -> None:
    refused(tmp_path, ["simulate", *TINY, "--nodes", "100"], "task tiny cannot be split over 100 nodes")
    iid = ["--set", 'partitioner="iid"']
    refused(tmp_path, ["simulate", *TINY, *iid, "--nodes", "1000"], "task tiny cannot be split over 1000 nodes")


def test_a_missing_server_eval_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "held-out.jsonl"
    refused(tmp_path, ["simulate", *TINY, "--set", f'server-eval-data="{missing}"'], f"{missing} does not exist")


def test_local_data_without_labels_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "posts.jsonl"
    data.write_text('{"text": "a rocket", "label": 0}\n{"text": "a song", "label": 1}\n')
    refused(tmp_path, ["simulate", *TINY, "--set", f'task="{data}"'], "needs its class names in the run config")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"\x89PNG\r\n\x1a\n\x00\x00", "is not UTF-8 text"), (b"[experiment]\nnum-rounds = 2\n", "has a table")],
)
def test_a_config_file_that_is_not_an_overlay_is_named(tmp_path: Path, content: bytes, expected: str) -> None:
    overlay = tmp_path / "exp.toml"
    overlay.write_bytes(content)
    refused(tmp_path, ["simulate", "--config", str(overlay)], f"config file {overlay} {expected}")


def test_a_config_folder_is_not_a_missing_file(tmp_path: Path) -> None:
    refused(tmp_path, ["simulate", "--config", str(tmp_path)], f"config file {tmp_path} is not a file")


@pytest.mark.parametrize(
    ("content", "expected"), [(b"[]", "holds a JSON list"), (b"\xff\xfe{", "is not the run config")]
)
def test_resume_of_a_broken_config_json_names_the_file(tmp_path: Path, content: bytes, expected: str) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_bytes(content)
    refused(tmp_path, ["resume", str(run_dir)], f"{run_dir / 'config.json'} {expected}")


def test_a_run_folder_held_by_a_live_coordinator_is_refused_naming_it(tmp_path: Path) -> None:
    from server.run_lock import RunLock

    out = tmp_path / "busy"
    lock = RunLock(out, "the coordinator of run 7").acquire()
    try:
        done = run_fedlora("simulate", *TINY, "--out", str(out), timeout=180)
    finally:
        lock.release()
    assert done.returncode == 2
    assert f"run folder {out} is in use by pid" in done.stderr and "the coordinator of run 7" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".fedlora.lock"]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    import subprocess
    import sys

    from server.run_lock import RunLock, check_free

    out = tmp_path / "run"
    code = f"from server.run_lock import RunLock; RunLock({str(out)!r}, 'a run that dies').acquire()"
    subprocess.run([sys.executable, "-c", code], check=True)  # exits holding the lock: the kernel releases it
    assert "a run that dies" in (out / ".fedlora.lock").read_text()
    check_free(out)
    RunLock(out, "the next coordinator").acquire().release()
