"""A real deployed federation on 127.0.0.1: a TLS SuperLink with node authentication, two devices, two rounds.

``flower-superlink`` runs with TLS and ``--enable-supernode-auth``; two devices join with ``fedlora client`` (each
runs a real ``flower-supernode``) at LoRA ranks 2 and 8 on the two halves of the tiny task; the coordinator submits
the fedlora app with ``flwr run`` and reads the run's final status with ``flwr ls``. The ClientApp's audit mod logs
every array each node receives and sends, so the tests can check that only LoRA factors of the node's own rank and
the classification head ever left a node, within the Σ r·(in + out)·itemsize bound.

Every wait is bounded, SIGALRM ends a run that overruns ``RUN_TIMEOUT_S``, and every process the deployment started
is stopped on the way out, also when something fails (``Deployment.__exit__``; checked below).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from boundary import NPY_HEADER_BYTES, PEFT_PREFIX, TARGETS, BaseModel, boundary_violations, tiny_bert
from conftest import TINY_SETTINGS, simulate
from deploy import Deployment, bounded, running, wait_until

from client.audit import audit_mod
from client.tasks import TINY_TOPICS
from server.certs import create_certs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="process groups, SIGALRM")]
PROJECT_DIR = Path(__file__).resolve().parents[1]
RANKS = {"node-0": 2, "node-1": 8}
ROUNDS = 2
RUN_CONFIG: dict[str, Any] = {
    **TINY_SETTINGS, "node-ranks": "2,8", "rule": "raflora", "num-rounds": ROUNDS, "min-nodes": 2
}  # fmt: skip
"""raflora here, svd (the default) in the simulations: every rule goes through the same engine, so the deployed run
also shows that the newest rule works on real SuperNodes."""
INTRUDER_EXIT_S = 120.0
"""How long a refused SuperNode may take to give up (it retries the connection a few times first)."""
RUN_TIMEOUT_S = 1500
"""The 2-round run took 10 min on 2 cores at a load average of 17: every message starts a fresh ClientApp process."""


@dataclass(frozen=True)
class DeployedRun:
    """What a finished deployed run left behind."""

    status: str
    seconds: float
    """Wall time from ``flwr run`` to the final status."""
    out_dir: Path
    store: Path
    audit_dir: Path
    server_log: str
    node_logs: dict[str, str]
    leftover: set[int]
    """Processes the deployment started (and their descendants) still running after it stopped."""
    intruders: dict[str, tuple[int | None, str]]
    """SuperNodes that tried to join while the run went on: name → (exit status, log)."""

    def metrics(self) -> list[dict[str, Any]]:
        return list(json.loads((self.out_dir / "metrics.json").read_text()))

    def audit(self, node: str) -> list[dict[str, Any]]:
        lines = (self.audit_dir / f"{node}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> DeployedRun:
    tmp = tmp_path_factory.mktemp("deployed-run")
    outputs = {"out-dir": str(tmp / "run"), "store": str(tmp / "fedlora.db"), "audit-dir": str(tmp / "audit")}
    other_ca = create_certs(tmp / "other-ca", nodes=0)[0].ca_cert
    with bounded(RUN_TIMEOUT_S), Deployment(tmp / "deployment", nodes=len(RANKS) + 1) as dep:
        devices = []
        for index, (name, rank) in enumerate(RANKS.items()):
            dep.register(index)
            partition = ("--partition-id", str(index), "--num-partitions", str(len(RANKS)))
            devices.append(dep.start_client(dep.client_args(index, rank, "--name", name, *partition), name=name))
        dep.wait_online(devices, timeout=300)
        # Three SuperNodes try to join the same SuperLink as the run starts: without the CA certificate, with another
        # CA, and with a key that was never registered (node-2's). Each would be sampled if it got in.
        intruding = {"no-ca": (1, False), "wrong-ca": (1, other_ca), "unregistered": (len(RANKS), True)}
        intruders = [
            dep.start_supernode(key, root_cert=cert, node_config={"lora-rank": 4, "partition-id": 1}, name=name)
            for name, (key, cert) in intruding.items()
        ]
        started = time.monotonic()
        run_id = dep.run_app(PROJECT_DIR, {**RUN_CONFIG, **outputs})
        status = dep.wait_run(run_id, timeout=RUN_TIMEOUT_S)
        seconds = time.monotonic() - started
        server_log = dep.cli.run_log(run_id)
        refused = {}
        for proc in intruders:
            try:
                refused[proc.name] = (proc.wait(INTRUDER_EXIT_S), proc.log())
            except subprocess.TimeoutExpired:
                refused[proc.name] = (None, proc.log())
        started_here = dep.process_tree()
    try:
        wait_until(lambda: not any(running(pid) for pid in started_here), 30, "the deployment's processes to end")
    except TimeoutError:
        pass  # what is left is reported by test_every_process_the_deployment_started_is_gone
    return DeployedRun(
        status=status,
        seconds=seconds,
        out_dir=Path(outputs["out-dir"]),
        store=Path(outputs["store"]),
        audit_dir=Path(outputs["audit-dir"]),
        server_log=server_log,
        node_logs={proc.name: proc.log() for proc in dep.procs if proc.name in RANKS},
        leftover={pid for pid in started_here if running(pid)},
        intruders=refused,
    )


@pytest.fixture(scope="module")
def tiny_bert_shapes() -> BaseModel:
    return tiny_bert(num_labels=len(TINY_TOPICS))


# --- the deployed run -----------------------------------------------------------------------------------------------


def test_the_run_completed(deployed: DeployedRun) -> None:
    assert deployed.status == "finished:completed", deployed.server_log[-4000:]
    assert "fedlora | done" in deployed.server_log
    assert [row["round"] for row in deployed.metrics()] == list(range(ROUNDS + 1))
    assert all(row["participants"] == len(RANKS) for row in deployed.metrics()[1:])


@pytest.mark.parametrize(
    ("intruder", "refusal"),
    [
        ("no-ca", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong-ca", "CERTIFICATE_VERIFY_FAILED"),
        ("unregistered", "[code: 2004] Failed to activate SuperNode."),
    ],
)
def test_supernodes_without_the_ca_with_a_wrong_ca_or_an_unregistered_key_are_refused(
    deployed: DeployedRun, intruder: str, refusal: str
) -> None:
    code, log = deployed.intruders[intruder]

    assert code == 1, log[-2000:]  # Flower's connection-error exit
    assert "Exit Code: 305" in log and "Failed to initialize the connection to the SuperLink." in log
    assert refusal in log
    # ... and the run went on with the two registered devices only (every connected node is sampled).
    with sqlite3.connect(deployed.store) as db:
        assert sorted(name for (name,) in db.execute("SELECT name FROM nodes")) == sorted(RANKS)
    assert all(row["participants"] == len(RANKS) for row in deployed.metrics()[1:])


def test_the_outputs_exist(deployed: DeployedRun) -> None:
    for name in ("config.json", "metrics.csv", "metrics.json", "metrics.png", "summary.txt"):
        assert (deployed.out_dir / name).is_file(), name
    assert (deployed.out_dir / "adapter" / "adapter_config.json").is_file()
    assert (deployed.out_dir / "adapter" / "adapter_model.safetensors").is_file()
    with sqlite3.connect(deployed.store) as db:
        assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]


def test_each_node_trained_and_received_factors_at_its_own_rank(deployed: DeployedRun) -> None:
    with sqlite3.connect(deployed.store) as db:
        assert sorted(db.execute("SELECT name, rank FROM nodes").fetchall()) == sorted(RANKS.items())
    for node, rank in RANKS.items():
        assert f"({node}) trains at rank {rank}" in deployed.server_log
        received = [array for entry in deployed.audit(node) for array in entry["received"]["arrays"]]
        factors = [array for array in received if ".lora_" in array["key"]]
        assert factors, f"{node} never received global factors"
        for array in factors:
            rank_axis = 0 if array["key"].endswith(".lora_A.weight") else 1
            assert array["shape"][rank_axis] == rank, (node, array)


def test_the_audit_saw_every_message_a_node_sent(deployed: DeployedRun) -> None:
    for node in RANKS:
        sent = [
            line.split("Sending: ")[1].split()[0]
            for line in deployed.node_logs[node].splitlines()
            if "Sending: " in line
        ]

        assert [entry["message-type"] for entry in deployed.audit(node)] == sent
        assert sent.count("train") == ROUNDS


def test_only_lora_factors_and_the_head_left_a_node(deployed: DeployedRun, tiny_bert_shapes: BaseModel) -> None:
    for node, rank in RANKS.items():
        entries = deployed.audit(node)

        violations = [problem for entry in entries for problem in boundary_violations(entry, rank, tiny_bert_shapes)]

        assert violations == []
        train_bytes = [
            sum(array["nbytes"] for array in entry["sent"]["arrays"])
            for entry in entries
            if entry["message-type"] == "train"
        ]
        assert train_bytes == [tiny_bert_shapes.bound(rank)] * ROUNDS  # every target module's factors, and the head


def test_each_node_loaded_its_model_and_data_once_for_the_whole_run(deployed: DeployedRun) -> None:
    # The warm node's line for every message: "warm node: train (round 2) in 0.4 s; model loaded 1×, data prepared 1×"
    for name, text in deployed.node_logs.items():
        lines = re.findall(r"warm node: (\w+)\b.*; model loaded (\d+)×, data prepared (\d+)×", text)
        assert [op for op, _, _ in lines].count("train") == ROUNDS, (name, lines)
        assert all(int(model) <= 1 and int(data) <= 1 for _, model, data in lines), (name, lines)
        assert lines[-1][1:] == ("1", "1"), (name, lines)


def test_every_process_the_deployment_started_is_gone(deployed: DeployedRun) -> None:
    assert deployed.leftover == set()


def test_the_deployed_run_computes_what_the_simulation_computes(
    deployed: DeployedRun, tmp_path_factory: pytest.TempPathFactory, record_property: Any
) -> None:
    # Arrange: the same run (config, seed, partitions, ranks) on Flower's simulation engine.
    with bounded(RUN_TIMEOUT_S):
        started = time.monotonic()
        simulation = simulate(tmp_path_factory.mktemp("simulated-run"), nodes=len(RANKS), **RUN_CONFIG)
        seconds = time.monotonic() - started
    assert simulation.returncode == 0, simulation.output[-4000:]
    # Act
    report = overhead_report(deployed.metrics(), deployed.seconds, simulation.metrics(), seconds)
    record_property("deployment-overhead", report)
    print(f"\ndeployment vs simulation: {json.dumps(report)}")
    # Assert: the same numbers, whatever the transport.
    assert all(0 < row["mean_min_rank_energy"] <= 1 for row in deployed.metrics()[1:])  # the collapse measure
    for key in ("eval_loss", "eval_accuracy", "train_loss", "bytes_up", "bytes_down", "mean_min_rank_energy"):
        got = [row.get(key) for row in deployed.metrics()]
        want = [row.get(key) for row in simulation.metrics()]
        assert np.allclose(np.array(got, dtype=float), np.array(want, dtype=float), rtol=1e-5, equal_nan=True), key


def overhead_report(
    deployed: list[dict[str, Any]], deployed_s: float, simulated: list[dict[str, Any]], simulated_s: float
) -> dict[str, float]:
    """Wall times of both runs and the deployment's extra seconds per federated round (rounds 1.., not round 0).

    Round 0 also pays each side's start-up (Ray and its actors; the first ClientApp processes), so it is left out
    of the per-round comparison.
    """
    per_round = [
        float(np.mean([row["round_seconds"] for row in rows if row["round"] > 0])) for rows in (deployed, simulated)
    ]
    return {
        "deployed_run_s": round(deployed_s, 1),
        "simulated_run_s": round(simulated_s, 1),
        "deployed_round_s": round(per_round[0], 1),
        "simulated_round_s": round(per_round[1], 1),
        "overhead_per_round_s": round(per_round[0] - per_round[1], 1),
    }


def test_submit_exits_1_on_a_failed_run_that_flwr_run_accepted(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "simulations.submit", "--min-nodes", "0", "--app", str(PROJECT_DIR)]
    command += ["--run-config", 'rule="bogus"', "--flwr-home", str(tmp_path / "flwr"), "--timeout", "240"]

    with bounded(300), Deployment(tmp_path / "deployment", nodes=0) as dep:
        connection = ["--superlink", dep.address, "--root-cert", str(dep.certs.ca_cert)]
        done = subprocess.run([*command, *connection], capture_output=True, text=True, timeout=280, env=dep.env)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "finished:failed" in done.stderr
    assert "unknown aggregation rule 'bogus'" in done.stdout  # the ServerApp's log, streamed


# --- the check is not vacuous ---------------------------------------------------------------------------------------


def _audit_entry(sent: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    arrays = [
        {
            "record": "lora",
            "key": key,
            "dtype": "float32",
            "shape": list(shape),
            "nbytes": nbytes,
            "wire_bytes": nbytes + NPY_HEADER_BYTES,
        }
        for key, shape in sent.items()
        for nbytes in [4 * int(np.prod(shape))]
    ]
    payload = sum(a["wire_bytes"] for a in arrays)
    sent_record = {"arrays": arrays, "values": [], "error": 0, "bytes": payload, "message_bytes": payload}
    received = {"arrays": [], "values": [], "error": 0, "bytes": 0, "message_bytes": 0}
    return {"node-name": "node-0", "message-type": "train", "received": received, "sent": sent_record}


def _honest_reply(base: BaseModel, rank: int) -> dict[str, tuple[int, ...]]:
    sent: dict[str, tuple[int, ...]] = {}
    for name, (out, inn) in base.linear.items():
        if name.rsplit(".", 1)[-1] in TARGETS:
            sent[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, inn)
            sent[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (out, rank)
    return sent | {f"{PEFT_PREFIX}{name}": shape for name, shape in base.head.items()}


def test_an_honest_reply_passes_the_check(tiny_bert_shapes: BaseModel) -> None:
    entry = _audit_entry(_honest_reply(tiny_bert_shapes, 8))

    assert boundary_violations(entry, 8, tiny_bert_shapes) == []


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight", (32, 32)),
        ("base_model.model.bert.embeddings.word_embeddings.weight", (64, 32)),
        ("bert.encoder.layer.0.attention.self.query.weight", (32, 32)),
    ],
)
def test_a_base_weight_in_a_reply_fails_the_check(
    tiny_bert_shapes: BaseModel, key: str, shape: tuple[int, ...]
) -> None:
    entry = _audit_entry({**_honest_reply(tiny_bert_shapes, 2), key: shape})

    violations = boundary_violations(entry, 2, tiny_bert_shapes)

    assert any(key in problem and "neither a LoRA factor nor the head" in problem for problem in violations)
    assert any("above the rank-2 bound" in problem for problem in violations)


def test_factors_of_another_rank_fail_the_check(tiny_bert_shapes: BaseModel) -> None:
    entry = _audit_entry(_honest_reply(tiny_bert_shapes, 8))

    violations = boundary_violations(entry, 2, tiny_bert_shapes)

    assert any("expected [2, 32] at rank 2" in problem for problem in violations)
    assert any("above the rank-2 bound" in problem for problem in violations)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-like-the-codec", "one-array-per-tensor"])
def test_the_audit_mod_records_a_base_weight_added_to_a_reply(
    tmp_path: Path, tiny_bert_shapes: BaseModel, packed: bool
) -> None:
    from flwr.app import Array, ArrayRecord, Context, Metadata, RecordDict
    from flwr.app.message.message import make_message

    from common.codec import packing

    # Arrange: a handler whose reply carries honest factors plus one base weight, behind the real audit mod.
    leaked = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    shapes = {**_honest_reply(tiny_bert_shapes, 2), leaked: (32, 32)}
    state = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    arrays = {key: Array(value) for key, value in (packing.pack(state) if packed else state).items()}

    def metadata(message_id: str, reply_to: str) -> Metadata:
        return Metadata(1, message_id, 0, 1, reply_to, "1", time.time(), 60.0, "train")

    message = make_message(metadata("in", ""), RecordDict())
    reply = make_message(metadata("out", "in"), RecordDict({"lora": ArrayRecord(arrays)}))
    context = Context(1, 1, {"node-name": "node-0"}, RecordDict(), {"audit-dir": str(tmp_path)})
    # Act
    audit_mod(message, context, lambda _msg, _ctx: reply)
    # Assert
    (entry,) = [json.loads(line) for line in (tmp_path / "node-0.jsonl").read_text().splitlines()]
    assert any(leaked in problem for problem in boundary_violations(entry, 2, tiny_bert_shapes))


def test_processes_are_stopped_when_the_block_fails(tmp_path: Path) -> None:
    started: set[int] = set()

    with bounded(300), pytest.raises(RuntimeError, match="failing on purpose"):
        with Deployment(tmp_path, nodes=1) as dep:
            dep.register(0)
            dep.wait_online([dep.start_client(dep.client_args(0, 2), name="node-0")], timeout=240)
            started = dep.process_tree()
            raise RuntimeError("failing on purpose")

    assert len(started) >= 3  # the SuperLink, fedlora client, flower-supernode (and their helpers)
    wait_until(lambda: not any(running(pid) for pid in started), 30, "the deployment's processes to end")
