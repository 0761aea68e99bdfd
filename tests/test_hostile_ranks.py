"""A node cannot choose its own rank: through the real ServerApp, nodes that declare a larger rank than the one the
coordinator learned (first in an evaluate reply, then with a self-consistent update at that rank) are refused with
a named reason, and the global adapter is the honest nodes' aggregate."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hostile import log_lines, simulate_hostile, train_replies

from common.config import RunConfig
from common.updates import AdapterFactors, NodeInfo, TrainReply
from server.checkpoint import load_checkpoint
from server.global_adapter import GlobalAdapter

pytestmark = pytest.mark.slow

PLAN = {
    "partition-1": {"behaviour": "declare-rank", "rank": 16, "from-round": 1},  # above its rank 4, within max-rank
    "partition-3": {"behaviour": "declare-rank", "rank": 100, "from-round": 1},  # above max-rank 64
}
SETTINGS = {"num-rounds": 2, "node-ranks": "2,4,8,4,8"}


def as_reply(flat: dict[str, np.ndarray]) -> TrainReply:
    """A train reply rebuilt from what the audit mod saved of it."""
    adapter = AdapterFactors.from_state_dict({k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("lora/")})
    node = NodeInfo(int(flat["node/rank"]), float(flat["node/scaling"]), str(flat["node/name"]))
    return TrainReply(adapter, int(flat["metrics/num-examples"]), node)


def test_a_node_that_raises_its_own_rank_is_refused_and_left_out(tmp_path: Path) -> None:
    # Act
    run = simulate_hostile(tmp_path, PLAN, nodes=5, **SETTINGS)
    # Assert: the run completed; both declarations were refused, with the reason, in the log ...
    assert run.returncode == 0, run.output[-3000:]
    log = "\n".join(log_lines(run))
    assert "declares rank 16 (scaling 1), refused: it trains at rank 4" in log
    assert "node reports rank 100, above the run's max-rank 64" in log
    # ... their round-2 updates (self-consistent, at the declared rank) were rejected with a named reason ...
    with sqlite3.connect(run.store) as db:
        rejected = dict(db.execute("SELECT node_id, reason FROM rejected WHERE server_round = 2"))
        names = dict(db.execute("SELECT node_id, name FROM nodes"))
        ranks = {name: rank for name, rank in db.execute("SELECT name, rank FROM nodes")}
    reasons = {names[node]: reason for node, reason in rejected.items()}
    assert reasons["partition-1"].startswith("wrong-rank: node reports rank 16, the coordinator knows rank 4")
    assert reasons["partition-3"].startswith("malformed: node reports rank 100, above the run's max-rank 64")
    assert set(reasons) == {"partition-1", "partition-3"}
    assert ranks == {"partition-0": 2, "partition-1": 4, "partition-2": 8, "partition-3": 4, "partition-4": 8}
    # ... and the round-2 global is the aggregate of the honest nodes' updates on the round-1 global.
    cfg = RunConfig.from_mapping({**run.config(), "resume": False})
    before = GlobalAdapter.from_config(cfg)
    before.load_arrays(load_checkpoint(run.out_dir / "checkpoints" / "round-0001.ckpt").arrays)
    sent = train_replies(run, 2)
    honest = [as_reply(sent[name]) for name in sorted(sent) if name not in PLAN]
    assert len(honest) == 3
    before.aggregate(honest, sorted(set(ranks.values())), num_sampled=5, num_available=5)
    after = load_checkpoint(run.out_dir / "checkpoints" / "round-0002.ckpt").arrays
    for key, value in before.to_arrays().items():
        np.testing.assert_allclose(after[key], value, rtol=0, atol=1e-6, err_msg=key)
