"""Nodes that fail during a real simulation (10 tiny nodes, 3 rounds, faults injected by client/faults.py).

- Round 1 has no faults: it absorbs the simulation engine's cold start (the first messages wait while the actor
  imports torch and transformers, which on a loaded machine can outlast a round).
- Round 2: 3 of the 10 sampled nodes (30%) fail: partition-7 raises, partition-8 and partition-9 never answer. The
  round completes after round-timeout and the global adapter is the aggregate of the 7 survivors' updates exactly
  as they sent them (the audit folder keeps each node's train reply).
- Round 3: 6 of 10 fail, leaving 4 alive, fewer than min-nodes = 7: the round is skipped, the global adapter is
  kept, and the run finishes. (A skipped round with silent nodes ends at its deadline too: see
  tests/test_reliability_deadlines.py.)

One simulation engine actor runs the nodes one after the other on this machine (2 CPUs per node, 2 cores), in
partition order; the silent nodes are the last partitions, so they hold the actor only after the others answered.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from conftest import SimulationRun, simulate

from common.codec import records
from common.config import RunConfig
from common.updates import AdapterFactors, NodeInfo, TrainReply
from common.validation import reason_code
from server.checkpoint import Checkpoint, load_checkpoint
from server.global_adapter import GlobalAdapter

pytestmark = pytest.mark.slow
NODES = 10
MIN_NODES = 7
ROUND_TIMEOUT = 60.0
FAULTY_ROUND, SKIPPED_ROUND = 2, 3
FAULTY_ROUND_FAILS = {"partition-7": "node-error", "partition-8": "no-reply", "partition-9": "no-reply"}
SKIPPED_ROUND_FAILS = {f"partition-{i}": "node-error" for i in range(4, 10)}
FAULTS = ", ".join(
    [
        "partition-7:raise@2",
        "partition-8:hang@2/train",
        "partition-9:hang@2/train",
        *(f"partition-{i}:raise@3" for i in range(4, 10)),
    ]
)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> SimulationRun:
    run = simulate(
        tmp_path_factory.mktemp("faulty"),
        nodes=NODES,
        **{
            "num-rounds": 3,
            "local-steps": 3,
            "min-nodes": MIN_NODES,
            "round-timeout": ROUND_TIMEOUT,
            "inject-faults": FAULTS,
        },
    )
    assert run.returncode == 0, run.output[-4000:]
    return run


def checkpoint(run: SimulationRun, server_round: int) -> Checkpoint:
    return load_checkpoint(run.out_dir / "checkpoints" / f"round-{server_round:04d}.ckpt")


def node_names(run: SimulationRun) -> dict[str, str]:
    with sqlite3.connect(run.store) as db:
        return {str(node_id): str(name) for node_id, name in db.execute("SELECT node_id, name FROM nodes")}


def rejections(run: SimulationRun, server_round: int) -> dict[str, str]:
    """Node name → reason code of everything the coordinator left out of a round."""
    names = node_names(run)
    with sqlite3.connect(run.store) as db:
        rows = db.execute("SELECT node_id, reason FROM rejected WHERE server_round = ?", (server_round,)).fetchall()
    return {names[str(node_id)]: reason_code(reason) for node_id, reason in rows}


def sent_reply(path: Path) -> TrainReply:
    """A node's train reply as the audit mod kept it (the arrays and numbers it sent)."""
    with np.load(path) as data:
        flat = {key: data[key] for key in data.files}
    prefix = records.ADAPTER + "/"
    adapter = AdapterFactors.from_state_dict({k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)})
    node = NodeInfo(
        int(flat[f"{records.NODE}/{records.RANK}"]),
        float(flat[f"{records.NODE}/{records.SCALING}"]),
        str(flat[f"{records.NODE}/{records.NODE_NAME}"]),
    )
    return TrainReply(adapter, int(flat[f"{records.METRICS}/{records.NUM_EXAMPLES}"]), node)


def test_the_run_finishes_with_every_round_recorded(faulty_run: SimulationRun) -> None:
    assert [row["round"] for row in faulty_run.metrics()] == [0, 1, 2, 3]
    assert "finished:completed" in faulty_run.output
    assert (faulty_run.out_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_thirty_percent_failing_leaves_the_aggregate_of_the_survivors(faulty_run: SimulationRun) -> None:
    # Arrange: what the 7 survivors sent in the faulty round, from the audit folder.
    row = faulty_run.metrics()[FAULTY_ROUND]
    survivors = [f"partition-{i}" for i in range(NODES) if f"partition-{i}" not in FAULTY_ROUND_FAILS]
    replies = [sent_reply(faulty_run.audit_dir / f"{name}-round{FAULTY_ROUND}.npz") for name in survivors]
    cfg = RunConfig.from_mapping({"node-ranks": "2,4,8"})
    # Act: the aggregate computed directly from the survivors' updates (on top of round 1's global adapter, which
    # keep-residual reads; plain svd does not).
    expected = GlobalAdapter.from_config(cfg)
    expected.load_arrays(checkpoint(faulty_run, FAULTY_ROUND - 1).arrays)
    expected.aggregate(sorted(replies, key=lambda r: r.node.name), [2, 4, 8])
    # Assert
    assert (row["participants"], row["rejected"], row["skipped"]) == (len(survivors), len(FAULTY_ROUND_FAILS), "")
    assert rejections(faulty_run, FAULTY_ROUND) == FAULTY_ROUND_FAILS
    assert ROUND_TIMEOUT <= row["round_seconds"] <= 2 * ROUND_TIMEOUT  # waited out the silent nodes, no longer
    got = checkpoint(faulty_run, FAULTY_ROUND).arrays
    assert set(got) == set(expected.to_arrays())
    for key, value in expected.to_arrays().items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_too_few_alive_skips_the_round_and_keeps_the_adapter(faulty_run: SimulationRun) -> None:
    row = faulty_run.metrics()[SKIPPED_ROUND]
    assert row["skipped"].startswith(f"only {NODES - len(SKIPPED_ROUND_FAILS)} valid replies")
    assert (row["participants"], row["rejected"]) == (0, len(SKIPPED_ROUND_FAILS))
    assert rejections(faulty_run, SKIPPED_ROUND) == SKIPPED_ROUND_FAILS
    assert row["round_seconds"] < ROUND_TIMEOUT  # every node answered (most with an error): no deadline to wait for
    before, after = checkpoint(faulty_run, FAULTY_ROUND).arrays, checkpoint(faulty_run, SKIPPED_ROUND).arrays
    assert set(before) == set(after)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_the_exported_adapter_is_the_last_aggregate(faulty_run: SimulationRun) -> None:
    cfg = RunConfig.from_mapping({"node-ranks": "2,4,8"})
    state = GlobalAdapter.from_config(cfg)
    state.load_arrays(checkpoint(faulty_run, FAULTY_ROUND).arrays)
    expected = state.export(8, cfg.lora.lora_alpha, cfg.lora.use_rslora)
    assert expected is not None
    exported = safetensors.numpy.load_file(str(faulty_run.out_dir / "adapter" / "adapter_model.safetensors"))
    assert set(exported) == set(expected.to_state_dict())
    for key, value in expected.to_state_dict().items():
        np.testing.assert_allclose(exported[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_a_run_in_which_every_node_fails_ends_failed_saying_why(tmp_path: Path) -> None:
    # Arrange: every node raises in every round (what a config every node trips on used to do, silently).
    faults = ", ".join(f"partition-{i}:raise@*" for i in range(3))
    # Act
    run = simulate(tmp_path, nodes=3, **{"num-rounds": 2, "inject-faults": faults})
    # Assert: a non-zero exit, "failed" in the store and the summary with the reason, and no adapter.
    assert run.returncode == 1, run.output[-3000:]
    assert "finished:failed" in run.output
    with sqlite3.connect(run.store) as db:
        ((status, adapter_path),) = db.execute("SELECT status, adapter_path FROM runs").fetchall()
    assert (status, adapter_path) == ("failed", None)
    summary = (run.out_dir / "summary.txt").read_text()
    assert summary.startswith("status: failed: no round aggregated an update (last: only 0 valid replies")
    assert not (run.out_dir / "adapter").exists()
