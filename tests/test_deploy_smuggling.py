"""A smuggling node in a real deployment (TLS SuperLink with node authentication, two ``fedlora client`` devices):
node-1 adds a key of its own to its train reply; the audit on the device records it, the boundary check names it,
and the coordinator refuses the reply. node-0 is honest and passes."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
from boundary import boundary_violations, tiny_bert
from conftest import TINY_SETTINGS
from deploy import Deployment, bounded
from hostile import hostile_app

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="process groups, SIGALRM")]
RANKS = {"node-0": 2, "node-1": 8}
PLAN = {"node-1": {"behaviour": "extra-config-key", "from-round": 0}}


def test_a_smuggled_key_in_a_deployed_reply_is_caught_and_refused(tmp_path: Path) -> None:
    outputs = {
        "out-dir": str(tmp_path / "run"),
        "store": str(tmp_path / "fedlora.db"),
        "audit-dir": str(tmp_path / "audit"),
    }
    settings = {**TINY_SETTINGS, "node-ranks": "2,8", "num-rounds": 1, "min-nodes": 1, **outputs}
    with bounded(900), Deployment(tmp_path / "deployment", nodes=len(RANKS)) as dep, hostile_app(PLAN) as app:
        devices = []
        for index, (name, rank) in enumerate(RANKS.items()):
            dep.register(index)
            partition = ("--partition-id", str(index), "--num-partitions", str(len(RANKS)))
            devices.append(dep.start_client(dep.client_args(index, rank, "--name", name, *partition), name))
        dep.wait_online(devices, timeout=300)
        status = dep.wait_run(dep.run_app(app, settings), timeout=800)
    assert status == "finished:completed"
    base = tiny_bert(num_labels=4)
    for name, rank in RANKS.items():
        lines = (tmp_path / "audit" / f"{name}.jsonl").read_text().splitlines()
        problems = [p for line in lines for p in boundary_violations(json.loads(line), rank, base)]
        if name in PLAN:
            assert any("node/debug (str) is not a value a train reply may carry" in p for p in problems), problems
        else:
            assert problems == []
    with sqlite3.connect(tmp_path / "fedlora.db") as db:
        reasons = [reason for (reason,) in db.execute("SELECT reason FROM rejected")]
    assert reasons and all("'node' has a key this codec does not know: 'debug'" in r for r in reasons)
