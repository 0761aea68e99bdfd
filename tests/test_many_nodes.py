"""Fifty simulated nodes with sampling: each round trains a seeded fifth of them, and the run store knows every
node's rank."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import simulate

pytestmark = pytest.mark.slow

NODES = 50
SETTINGS = {
    "fraction-train": 0.2, "fraction-evaluate": 0.2, "partitioner": "iid", "local-steps": 5, "num-rounds": 2,
}  # fmt: skip


def test_fifty_nodes_train_a_seeded_sample_of_ten_each_round(tmp_path: Path) -> None:
    # Act
    run = simulate(tmp_path, nodes=NODES, cpus_per_node=1, **SETTINGS)
    # Assert: completed, ten trained in each round, not the same ten, and every node was learned at its rank.
    assert run.returncode == 0, run.output[-3000:]
    rows = run.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["participants"] for r in rows[1:]] == [10, 10]
    with sqlite3.connect(run.store) as db:
        trained = {
            rnd: {node for (node,) in db.execute(
                "SELECT node_id FROM round_nodes WHERE server_round = ? AND participated = 1", (rnd,))}
            for rnd in (1, 2)
        }  # fmt: skip
        ranks = dict(db.execute("SELECT name, rank FROM nodes"))
    assert len(trained[1]) == len(trained[2]) == 10 and trained[1] != trained[2]
    assert len(ranks) == NODES
    assert all(rank == (2, 4, 8)[int(name.rsplit("-", 1)[1]) % 3] for name, rank in ranks.items())
