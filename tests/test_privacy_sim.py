"""Real 3-node, 2-round simulations of each privacy mode: local DP, central DP, and SecAgg+ with ``fedavg``.

Each mode runs once per session (a module fixture) and the tests read its outputs. Node ledgers go to a fresh
``FEDLORA_STATE_DIR`` so runs never share a privacy budget.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from boundary import assert_no_violations, boundary_violations, tiny_bert
from conftest import TINY_SETTINGS, SimulationRun, run_fedlora, settings_flags

from client.privacy import STATE_DIR_ENV
from common.accounting import PrivacyLedger, compose_epsilon

pytestmark = pytest.mark.slow

SMALL = {**TINY_SETTINGS, "local-steps": 10, "eval-examples": 40}
"""The shared tiny task, a little smaller (each mode is one more real simulation)."""


def simulate_private(tmp: Path, **overrides: Any) -> SimulationRun:
    settings = {**SMALL, **overrides, "audit-dir": str(tmp / "audit")}
    done = run_fedlora(
        "simulate", "--cpus-per-node", "2",
        "--nodes", "3", "--out", str(tmp / "run"), "--store", str(tmp / "fedlora.db"),
        *settings_flags(settings), env={STATE_DIR_ENV: str(tmp / "node-state")},
    )  # fmt: skip
    run = SimulationRun(tmp / "run", tmp / "fedlora.db", tmp / "audit", done.returncode, done.stdout + done.stderr)
    assert run.returncode == 0, run.output[-4000:]
    return run


def stored_epsilons(run: SimulationRun) -> list[float | None]:
    with sqlite3.connect(run.store) as db:
        return [row[0] for row in db.execute("SELECT epsilon FROM rounds ORDER BY server_round")]


# --- local DP ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_dp(tmp_path_factory: pytest.TempPathFactory) -> SimulationRun:
    return simulate_private(tmp_path_factory.mktemp("local-dp"), dp="local", **{"noise-multiplier": 1.0})


def test_local_dp_completes_and_epsilon_grows(local_dp: SimulationRun) -> None:
    rows = local_dp.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["rejected"] == 0 for r in rows)
    assert rows[0]["epsilon"] is None and 0 < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert stored_epsilons(local_dp) == [r["epsilon"] for r in rows]


def test_local_dp_epsilon_is_one_accountant_over_both_rounds(local_dp: SimulationRun) -> None:
    ledgers = sorted((local_dp.out_dir.parent / "node-state").glob("partition-*.json"))
    assert len(ledgers) == 3
    epsilons = []
    for path in ledgers:
        ledger = PrivacyLedger.from_dict(json.loads(path.read_text()))
        (z, q, steps), *rest = ledger.history  # each round re-read the file (a fresh ClientApp) and appended to it
        assert not rest and z == 1.0 and steps == 2 * SMALL["local-steps"]
        epsilons.append(compose_epsilon(ledger.history, 1e-5))
    assert local_dp.metrics()[2]["epsilon"] == pytest.approx(max(epsilons))


def test_local_dp_sends_peft_keys_only(local_dp: SimulationRun) -> None:
    sent = [a["key"] for e in local_dp.audit() if e["message-type"] == "train" for a in e["sent"]["arrays"]]
    assert sent and not any("_module." in key for key in sent)


# --- central DP --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def central_dp(tmp_path_factory: pytest.TempPathFactory) -> SimulationRun:
    overrides = {"dp": "central", "noise-multiplier": 0.8, "clip-norm": 0.5, "noise-seed": 11}
    return simulate_private(tmp_path_factory.mktemp("central-dp"), **overrides)


def test_central_dp_completes_and_accounts_every_round(central_dp: SimulationRun) -> None:
    rows = central_dp.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    expected = [compose_epsilon([(0.8, 1.0, n)], 1e-5) for n in (1, 2)]  # all 3 nodes sampled: q = 1
    assert [r["epsilon"] for r in rows[1:]] == pytest.approx(expected)
    assert stored_epsilons(central_dp)[1:] == pytest.approx(expected)


def test_central_dp_checkpoint_holds_the_accountant(central_dp: SimulationRun) -> None:
    from server.checkpoint import load_latest_checkpoint

    checkpoint = load_latest_checkpoint(central_dp.out_dir / "checkpoints", required=True)
    ledger = PrivacyLedger.from_dict(checkpoint.meta["aggregator"]["central-dp"]["ledger"])
    assert ledger.history == [(0.8, 1.0, 2)]


# --- SecAgg+ -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> SimulationRun:
    overrides = {"rule": "fedavg", "secure-aggregation": True, "secagg-max-weight": 300.0}
    return simulate_private(tmp_path_factory.mktemp("secagg"), **overrides)


def test_secure_aggregation_completes_with_the_usual_outputs(secure: SimulationRun) -> None:
    out = secure.out_dir
    for name in ("config.json", "metrics.csv", "metrics.json", "metrics.png", "summary.txt"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = secure.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["participants"] for r in rows[1:]] == [3, 3] and all(r["rejected"] == 0 for r in rows)
    assert all(r["bytes_up"] > 0 for r in rows[1:])
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]


SECURE_CLEAR = {
    ("secaggplus_configs", "pk1"), ("secaggplus_configs", "pk2"), ("secaggplus_configs", "dsts"),
    ("secaggplus_configs", "ctxts"), ("secaggplus_configs", "masked_params"), ("secaggplus_configs", "nids"),
    ("secaggplus_configs", "shares"), ("fitres.metrics", "node.rank"), ("fitres.metrics", "node.scaling"),
    ("fitres.metrics", "node.name"), ("fitres.metrics", "node.device"), ("fitres.metrics", "train-loss"),
    ("fitres.metrics", "train-loss-first"), ("fitres.metrics", "train-loss-last"),
    ("fitres.metrics", "summand-keys"), ("fitres.num_examples", "num_examples"), ("fitres.status", "code"),
    ("fitres.status", "message"),
}  # fmt: skip
"""Every (record, key) a node sends on the SecAgg+ path: the protocol's values, and the clear metadata."""


def test_no_update_leaves_a_node_in_clear_under_secure_aggregation(secure: SimulationRun) -> None:
    trains = [e for e in secure.audit() if e["message-type"] == "train"]
    sent = {(v["record"], v["key"]) for e in trains for v in e["sent"]["values"]}
    # Exactly these keys, no arrays: the update itself travels only as masked integers ...
    assert trains and all(e["sent"]["arrays"] == [] for e in trains)
    assert sent == SECURE_CLEAR
    # ... whose size is that of the node's summands at the round's padding rank, and nothing else scales with the
    # model: the boundary check of tests/boundary.py passes on every message.
    base = tiny_bert(num_labels=4)
    for name, rank in {"partition-0": 2, "partition-1": 4, "partition-2": 8}.items():
        assert_no_violations([e for e in trains if e["node-name"] == name], rank, base)
    masked = [v["bytes"] for e in trains for v in e["sent"]["values"] if v["key"] == "masked_params"]
    assert len(masked) == 3 * 2 and all(0.9 * base.summand_bound(8) <= m <= base.summand_bound(8) for m in masked)


def test_a_model_sized_payload_added_to_a_secure_reply_fails_the_check(secure: SimulationRun) -> None:
    base = tiny_bert(num_labels=4)
    (entry, *_) = [e for e in secure.audit() if e["message-type"] == "train" and e["server-round"] == 1]
    smuggled = {"record": "fitres.metrics", "kind": "config", "key": "notes", "type": "list[float]"}
    entry["sent"]["values"].append({**smuggled, "length": 8192, "bytes": 8 * 8192})
    rank = {"partition-0": 2, "partition-1": 4, "partition-2": 8}[entry["node-name"]]
    assert any("fitres.metrics/notes" in p for p in boundary_violations(entry, rank, base))
