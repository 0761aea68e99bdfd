"""Nothing leaves a node outside the audit: four nodes that smuggle data out in their train replies (a base weight as
a list of floats in a metric, an extra config key, the head a second time, whitespace in the packed layout) are
caught by the boundary check on the audit log, each with the offending key named, in a real simulation; the
coordinator refuses their replies too; the honest nodes pass."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from boundary import boundary_violations, tiny_bert
from hostile import simulate_hostile

pytestmark = pytest.mark.slow

RANKS = {"partition-0": 2, "partition-1": 4, "partition-2": 8, "partition-3": 4, "partition-4": 8, "partition-5": 2}
PLAN = {
    "partition-1": {"behaviour": "smuggle-metric", "from-round": 0},
    "partition-2": {"behaviour": "extra-config-key", "from-round": 0},
    "partition-3": {"behaviour": "head-twice", "from-round": 0},
    "partition-4": {"behaviour": "padded-layout", "from-round": 0},
}
CAUGHT = {
    "partition-1": "metrics/warmup (list[float]) is not a value a train reply may carry",
    "partition-2": "node/debug (str) is not a value a train reply may carry",
    "partition-3": "head/base_model.model.classifier.weight [4, 32]: arrays travel in the 'lora' record only",
    "partition-4": "packed.layout",
}
REFUSED = {
    "partition-1": "malformed: 'warmup' must be a number",
    "partition-2": "malformed: 'node' has a key this codec does not know: 'debug'",
    "partition-3": "malformed: reply has a record this codec does not know: 'head'",
    "partition-4": "malformed: 'packed.layout' is not in the canonical form pack() writes",
}


def test_smuggled_data_is_caught_by_the_audit_with_its_key_and_refused(tmp_path: Path) -> None:
    # Act
    run = simulate_hostile(tmp_path, PLAN, nodes=6, **{"num-rounds": 1, "node-ranks": "2,4,8,4,8,2"})
    # Assert: the boundary check names each smuggled key; the honest nodes pass.
    assert run.returncode == 0, run.output[-3000:]
    base = tiny_bert(num_labels=4)
    entries = run.audit()
    for name, rank in RANKS.items():
        sent = [e for e in entries if e["node-name"] == name]
        problems = [p for e in sent for p in boundary_violations(e, rank, base)]
        if name in PLAN:
            assert any(CAUGHT[name] in p for p in problems), problems
        else:
            assert problems == [], problems
    # The coordinator refused the four replies, naming what it did not expect.
    with sqlite3.connect(run.store) as db:
        names = dict(db.execute("SELECT node_id, name FROM nodes"))
        rejected = {names[n]: reason for n, reason in db.execute("SELECT node_id, reason FROM rejected")}
    assert set(rejected) == set(PLAN)
    for name, reason in REFUSED.items():
        assert rejected[name].startswith(reason), rejected[name]
