"""Hostile nodes through the real ServerApp (``tests/hostile_clientapp.py``): an inflated example count moves the
global by its capped share only, a huge head is refused with a named reason, and multikrum leaves a scaled update
out while ``norm-bound`` cuts it down."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hostile import log_lines, metrics, simulate_hostile, train_replies
from test_hostile_ranks import as_reply

from common.config import RunConfig
from server.checkpoint import load_checkpoint
from server.global_adapter import GlobalAdapter
from server.weighting import aggregation_weights

pytestmark = pytest.mark.slow

SETTINGS = {"num-rounds": 2, "node-ranks": "2,4,8,4,8"}


def rejected_reasons(run_store: Path, server_round: int) -> dict[str, str]:
    with sqlite3.connect(run_store) as db:
        names = dict(db.execute("SELECT node_id, name FROM nodes"))
        rows = db.execute("SELECT node_id, reason FROM rejected WHERE server_round = ?", (server_round,))
        return {names[node]: reason for node, reason in rows}


def test_an_inflated_count_is_capped_and_a_huge_head_is_refused(tmp_path: Path) -> None:
    plan = {"partition-1": {"behaviour": "inflate-examples"}, "partition-3": {"behaviour": "huge-head"}}
    # Act
    run = simulate_hostile(tmp_path, plan, nodes=5, **SETTINGS)
    # Assert: the run completed, the head was refused in both rounds with the norm rule's reason ...
    assert run.returncode == 0, run.output[-3000:]
    for server_round in (1, 2):
        reasons = rejected_reasons(run.store, server_round)
        assert set(reasons) == {"partition-3"}
        assert (
            reasons["partition-3"].startswith("norm: ‖head‖_F = ") and "× the round's median" in reasons["partition-3"]
        )
    log = "\n".join(log_lines(run))
    assert "claims 10000000 examples, weighted as" in log
    # ... and the round-2 global is the aggregate with the liar at its capped weight, not at its claim.
    cfg = RunConfig.from_mapping({**run.config(), "resume": False})
    before = GlobalAdapter.from_config(cfg)
    before.load_arrays(load_checkpoint(run.out_dir / "checkpoints" / "round-0001.ckpt").arrays)
    after = load_checkpoint(run.out_dir / "checkpoints" / "round-0002.ckpt").arrays
    sent = train_replies(run, 2)
    used = [as_reply(sent[name]) for name in sorted(sent) if name != "partition-3"]
    counts = {i: r.num_examples for i, r in enumerate(used)}
    first_counts = dict(counts)  # the liar lied from round 1 on: its first count is the lie too
    capped, _ = aggregation_weights(counts, "examples-capped", cfg.robustness.weight_cap, first_counts)
    assert max(capped.values()) < 10_000_000
    ranks = sorted({2, 4, 8})
    for weights, should_match in ((list(capped.values()), True), ([float(n) for n in counts.values()], False)):
        trial = GlobalAdapter.from_config(cfg)
        trial.load_arrays(before.to_arrays())
        trial.aggregate(used, ranks, weights=weights, num_sampled=5, num_available=5)
        gaps = [np.abs(after[k] - v).max() for k, v in trial.to_arrays().items()]
        assert bool(max(gaps) <= 1e-5) is should_match, (weights, max(gaps))


def test_multikrum_leaves_a_scaled_update_out(tmp_path: Path) -> None:
    plan = {"partition-2": {"behaviour": "scale", "factor": 5.0}}
    # Act
    run = simulate_hostile(tmp_path, plan, nodes=5, rule="multikrum", **SETTINGS)
    # Assert
    assert run.returncode == 0, run.output[-3000:]
    log = "\n".join(log_lines(run))
    assert "round 1: multikrum (f = 1) left out partition-2" in log
    assert "round 2: multikrum (f = 1) left out partition-2" in log
    rows = metrics(run)
    assert rows[-1]["participants"] == 5 and rows[-1]["rejected"] == 0  # accepted, then weighted out
