"""Crash and resume, end to end: the process group of a real ``fedlora simulate`` is killed with SIGKILL in the middle
of a round (from outside, as an OOM killer or a closed terminal would); within seconds no process it started is
left and nothing writes to its folder; ``fedlora resume`` finishes it with the adapter and metrics of an
uninterrupted run (the shared ``tiny_simulation``, same settings and seeds); a corrupted latest checkpoint is skipped
for the previous one, with a message naming it.

One killed run and one resume carry both checks (each simulation costs minutes on this machine): before resuming,
the test puts a rotted round-2 checkpoint next to the real round-1 one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import safetensors.numpy
from conftest import TINY_SETTINGS, SimulationRun, fedlora_command, run_fedlora, settings_flags

from client.reaper import marked_processes
from common.config import RunConfig
from server.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

TAG = "FEDLORA_TEST_PROCESS_TAG"
"""Environment variable that marks every process a test starts (Flower and Ray pass the environment down)."""
TIMING = {"round_seconds", "aggregation_seconds", "global_eval_seconds"}
"""Metrics columns that measure wall time and so differ between any two runs."""


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag`` (only the ones this test started)."""
    return marked_processes(TAG, tag)


def kill_everything(root: subprocess.Popen[bytes], tag: str, timeout: float = 60.0) -> int:
    """SIGKILL ``root`` and every process started under it (SuperLink, simulation, Ray); return how many."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        victims = {p.pid: p for p in tagged(tag)}
        with contextlib.suppress(psutil.NoSuchProcess):
            victims.update({p.pid: p for p in psutil.Process(root.pid).children(recursive=True)})
        if root.poll() is None:
            victims[root.pid] = psutil.Process(root.pid)
        if not victims:
            return len(killed)
        assert time.monotonic() < deadline, f"processes survive SIGKILL: {sorted(victims)}"
        for proc in victims.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        killed.update(victims)
        psutil.wait_procs(list(victims.values()), timeout=5)
        root.poll()


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)


@contextlib.contextmanager
def started_simulation(tmp: Path, tag: str) -> Iterator[subprocess.Popen[bytes]]:
    """``fedlora simulate`` with the settings of ``tiny_simulation``, in its own session; everything is gone after."""
    settings = {**TINY_SETTINGS, "audit-dir": str(tmp / "audit")}
    command = fedlora_command(
        "simulate", "--cpus-per-node", "2",
        "--nodes", "3", "--out", str(tmp / "run"), "--store", str(tmp / "fedlora.db"),
        *settings_flags(settings),
    )  # fmt: skip
    with (tmp / "simulate.log").open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, TAG: tag}
        )
    try:
        yield proc
    finally:
        kill_everything(proc, tag)
        proc.wait(timeout=30)


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_outcome(run_dir: Path, reference: SimulationRun) -> None:
    """Final adapter to 1e-6, every checkpointed global factor to 1e-6, metrics rows equal but for wall time."""
    want, got = adapter(reference.out_dir), adapter(run_dir)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)
    final = list_checkpoints(run_dir / "checkpoints")[-1].name
    ref_arrays = load_checkpoint(reference.out_dir / "checkpoints" / final).arrays
    for key, value in load_checkpoint(run_dir / "checkpoints" / final).arrays.items():
        np.testing.assert_allclose(value, ref_arrays[key], rtol=0, atol=1e-6, err_msg=key)
    rows, ref_rows = metrics(run_dir), reference.metrics()
    assert [r["round"] for r in rows] == [r["round"] for r in ref_rows]
    for row, ref_row in zip(rows, ref_rows, strict=True):
        assert set(row) == set(ref_row)
        for key in set(row) - TIMING:
            want_value = (
                pytest.approx(ref_row[key], rel=1e-6, abs=1e-6) if isinstance(ref_row[key], float) else ref_row[key]
            )
            assert row[key] == want_value, (row["round"], key)


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file under ``folder``."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_killed_mid_round_then_resumed_ends_as_an_uninterrupted_run(
    tmp_path: Path, tiny_simulation: SimulationRun
) -> None:
    # Arrange: a run killed once round 1 is checkpointed and a node has answered round 2 ...
    tag = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    with started_simulation(tmp_path, tag) as proc:
        wait_until(
            lambda: (
                (run_dir / "checkpoints" / "round-0001.ckpt").is_file()
                and any((tmp_path / "audit").glob("*-round2.npz"))
            ),
            proc,
            timeout=900,
            what="a train reply in round 2",
        )
        started = [p.pid for p in tagged(tag)]
        os.killpg(proc.pid, signal.SIGKILL)  # what an OOM killer, a closed terminal or a CI timeout does
        proc.wait(timeout=10)
        # Assert: within 10 s nothing it started is left (found by this test's own mark, not the project's) ...
        gone_by = time.monotonic() + 10.0
        while tagged(tag) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert len(started) >= 5  # fedlora, flwr run, SuperLink, superexec, the simulation (+ Ray)
        assert not tagged(tag), f"processes outlived the killed command: {[p.pid for p in tagged(tag)]}"
    # ... and nothing writes to the run folder any more.
    state = files_state(run_dir)
    time.sleep(5.0)
    assert files_state(run_dir) == state
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["round-0001.ckpt"]
    assert [r["round"] for r in metrics(run_dir)] == [0, 1]
    # ... and a latest checkpoint that rotted on disk: the round-2 file this run would have written, one byte off.
    rotted = run_dir / "checkpoints" / "round-0002.ckpt"
    shutil.copyfile(tiny_simulation.out_dir / "checkpoints" / "round-0002.ckpt", rotted)
    flip_a_byte(rotted)
    # Act
    done = run_fedlora("resume", str(run_dir), timeout=900, env={TAG: tag})
    # Assert: the bad file is named and skipped, round 1 is the restart point, and the run ends as if never stopped.
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "round-0002.ckpt is corrupt" in done.stderr
    assert "falling back to the previous checkpoint" in done.stderr
    assert "resuming from round-0001.ckpt (after round 1)" in done.stdout
    assert not tagged(tag), "the resumed run left processes behind"
    assert load_checkpoint(rotted).server_round == 2
    assert_same_outcome(run_dir, tiny_simulation)
    with sqlite3.connect(tmp_path / "fedlora.db") as db:
        ((status, adapter_path),) = db.execute("SELECT status, adapter_path FROM runs").fetchall()
        rounds = [r for (r,) in db.execute("SELECT server_round FROM rounds ORDER BY server_round")]
    assert (status, rounds) == ("completed", [0, 1, 2])
    assert Path(adapter_path) == (run_dir / "adapter").resolve()


def test_resume_refuses_when_no_checkpoint_is_valid(tmp_path: Path) -> None:
    # Arrange: a run folder whose every checkpoint is corrupt.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    config = RunConfig.from_mapping({"out-dir": str(run_dir)}).to_mapping()
    (run_dir / "config.json").write_text(json.dumps({"run-id": "r", **config}))
    for server_round in (1, 2):
        flip_a_byte(save_checkpoint(run_dir / "checkpoints", server_round, {"x": np.zeros(64)}, {}))
    # Act
    done = run_fedlora("resume", str(run_dir), timeout=120)
    # Assert: refused before anything starts, naming every file it tried.
    assert done.returncode == 2
    assert "no valid checkpoint" in done.stderr and "cannot resume" in done.stderr
    assert "round-0001.ckpt" in done.stderr and "round-0002.ckpt" in done.stderr
