"""No wait without a deadline: node sampling, silent nodes, the launcher, and the fault-injection knobs."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_reliability_rejections import CFG, RANKS, FakeGrid, valid_reply

from client.faults import HANG_MARGIN_FRACTION, HANG_MARGIN_S, hang_seconds
from common.codec import records
from common.config import RunConfig
from common.faults import Fault, parse_faults
from common.validation import reason_code
from server.checkpoint import load_checkpoint
from server.recorder import RunRecorder
from server.sampling import wait_for_nodes
from server.strategy import LoRAStrategy
from simulations.launcher import LaunchError, _stream, flower_env, launch_processes, stop_launch
from simulations.simulate import run_deadline

TIMEOUT = 0.5


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the identity a ServerApp process has (Flower sets it when it starts a run)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class RoundGrid(FakeGrid):
    """A fake grid whose nodes behave per round: ``silent[r]`` never answer their round-r train message."""

    def __init__(self, silent: dict[int, set[int]], connected: Iterable[int] = RANKS) -> None:
        super().__init__({n: records.encode_train_reply(valid_reply(n)) for n in RANKS}, connected)
        self.silent = silent

    def _answer(self, msg: Message) -> Message | None:
        server_round = records.server_round_of(msg.content)
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id in self.silent.get(server_round or 0, ()):
            return None
        return super()._answer(msg)


def run(tmp_path: Path, grid: FakeGrid, cfg: RunConfig) -> tuple[LoRAStrategy, float]:
    strategy = LoRAStrategy(cfg, RunRecorder(cfg, tmp_path / "run", "deadlines", tmp_path / "fedlora.db"))
    started = time.monotonic()
    strategy.evaluate_round_zero(grid)  # type: ignore[arg-type]
    strategy.start(grid, ArrayRecord(), num_rounds=cfg.num_rounds, timeout=cfg.reliability.round_timeout)  # type: ignore[arg-type]
    return strategy, time.monotonic() - started


def test_waiting_for_nodes_ends_at_the_deadline() -> None:
    grid = FakeGrid({}, connected=[5])
    started = time.monotonic()
    nodes = wait_for_nodes(grid, 3, TIMEOUT)  # type: ignore[arg-type]
    assert nodes == [5]
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 2


def test_too_few_connected_nodes_skip_rounds_and_the_run_still_finishes(tmp_path: Path) -> None:
    # Flower's own sample_nodes would wait forever here for min_available_nodes = 2.
    cfg = RunConfig.from_mapping({"num-rounds": 2, "min-nodes": 2, "node-ranks": "2,4,8", "round-timeout": TIMEOUT})
    grid = RoundGrid({}, connected=[11])
    strategy, seconds = run(tmp_path, grid, cfg)
    assert grid.timeouts and all(t is not None and t <= cfg.reliability.round_timeout for t in grid.timeouts)
    assert [row["round"] for row in strategy.recorder.rows] == [0, 1, 2]
    assert all(row["skipped"].startswith("only 1 valid replies") for row in strategy.recorder.rows[1:])
    assert strategy.engine.global_adapter.empty
    assert seconds < 2 * (cfg.num_rounds + 1) * TIMEOUT + 30  # each phase waits for nodes at most once


def test_a_round_whose_nodes_fall_silent_is_skipped_at_its_deadline(tmp_path: Path) -> None:
    # Arrange: round 1 is normal; in round 2 three of the four nodes never answer.
    cfg = RunConfig.from_mapping({**CFG.to_mapping(), "num-rounds": 2, "round-timeout": TIMEOUT})
    silent = {2: {n for n in RANKS if n != 11}}
    # Act
    grid = RoundGrid(silent)
    strategy, seconds = run(tmp_path, grid, cfg)
    # Assert: round 2 waited once for its deadline, recorded who was missing, kept the round-1 adapter.
    rows = strategy.recorder.rows
    assert rows[1]["skipped"] == "" and rows[1]["participants"] == len(RANKS)
    assert rows[2]["skipped"].startswith("only 1 valid replies") and rows[2]["participants"] == 0
    assert sorted((n, reason_code(r)) for n, r in strategy.engine.outcome.rejected) == sorted(
        (n, "no-reply") for n in silent[2]
    )
    assert grid.timeouts and all(t is not None and t <= cfg.reliability.round_timeout for t in grid.timeouts)
    assert TIMEOUT <= rows[2]["round_seconds"] < TIMEOUT + 30  # generous: this machine is shared and loaded
    assert seconds < TIMEOUT + 60
    ckpt = tmp_path / "run" / "checkpoints"
    before, after = load_checkpoint(ckpt / "round-0001.ckpt").arrays, load_checkpoint(ckpt / "round-0002.ckpt").arrays
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_the_launcher_stops_a_run_past_its_deadline(tmp_path: Path) -> None:
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(LaunchError, match="deadline of 1 s"):
        _stream(["sleep", "600"], tmp_path, tmp_path / "flwr.log", lines.append, deadline_s=1.0)
    assert time.monotonic() - started < 20


def test_the_launcher_stops_processes_re_parented_out_of_its_tree(tmp_path: Path) -> None:
    # Arrange: a grandchild whose parent exits at once (as a Ray worker can, while the SuperLink goes down).
    home = tmp_path / "fedlora-flwr-test"
    subprocess.run(["bash", "-c", "(sleep 300 &) ; exit 0"], env=flower_env(home), check=True)
    (orphan,) = launch_processes(home.name)
    # Act
    survivors = stop_launch(home.name, grace=5.0)
    # Assert
    assert survivors == [] and not orphan.is_running()


def test_the_run_deadline_covers_every_wait_of_every_round() -> None:
    cfg = RunConfig.from_mapping({"num-rounds": 5, "round-timeout": 600.0})
    deadline = run_deadline(cfg)
    assert math.isfinite(deadline)
    assert deadline >= (cfg.num_rounds + 1) * (4 * cfg.reliability.round_timeout + 4 * 120.0)


def test_fault_items_parse_with_an_optional_phase() -> None:
    faults = parse_faults("partition-1:raise@2, partition-3:hang@*/train")
    assert faults == [Fault("partition-1", "raise", 2), Fault("partition-3", "hang", None, ("train",))]
    assert faults[1].hits("partition-3", 7, "train") and not faults[1].hits("partition-3", 7, "evaluate")
    with pytest.raises(ValueError, match="partition-1:hang@2/query"):
        parse_faults("partition-1:hang@2/query")


def test_a_hanging_node_stays_silent_until_the_round_deadline_has_passed() -> None:
    msg = Message(RecordDict(), message_type="train", dst_node_id=3)
    created = msg.metadata.created_at
    assert hang_seconds(msg, 10.0, now=created + 4) == pytest.approx(6 + HANG_MARGIN_S)
    assert hang_seconds(msg, 10.0, now=created + 100) == 0.0
    # A long round gets a proportional margin: the coordinator's clock starts only after every message is pushed.
    assert hang_seconds(msg, 60.0, now=created + 10) == pytest.approx(50 + HANG_MARGIN_FRACTION * 60.0)
    assert HANG_MARGIN_FRACTION * 60.0 > HANG_MARGIN_S
