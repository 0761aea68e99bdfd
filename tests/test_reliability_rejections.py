"""Every rejection reason, through the real strategy and Flower's round loop: the bad update is rejected with its
reason, the round completes, and the global adapter is the aggregate of the valid updates alone.

The coordinator side is real (``LoRAStrategy.start``, the codec, validation, the recorder writing metrics,
checkpoints and the run store into ``tmp_path``); only the transport is a fake grid that answers each message the
way a node would, with replies built by the codec.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.codec import records
from common.config import RunConfig
from common.lora import lora_scaling
from common.updates import AdapterFactors, EvaluateReply, NodeInfo, TrainReply
from common.validation import UpdateLimits, reason_code
from server.checkpoint import load_checkpoint
from server.global_adapter import GlobalAdapter
from server.recorder import RunRecorder
from server.strategy import LoRAStrategy

BAD_NODE = 7
"""The misbehaving node; its id sorts first, so it would be the first reply a naive layout check learns from."""
RANKS = {BAD_NODE: 4, 11: 2, 22: 4, 33: 8}
MODULES = {"encoder.layer.0.attention.self.query": (10, 9), "encoder.layer.0.attention.self.value": (10, 9)}
"""(out, in) of each target module: wide enough for every rank the nodes train at."""
HEAD = {"base_model.model.classifier.weight": (3, 9), "base_model.model.classifier.bias": (3,)}
HEAD_WEIGHT = "base_model.model.classifier.weight"
LIMITS = UpdateLimits(norm_factor=10.0, max_num_examples=10_000, max_bytes=1 << 20)
CFG = RunConfig.from_mapping(
    {"num-rounds": 1, "min-nodes": 2, "node-ranks": "2,4,8", "round-timeout": 5.0, "max-num-examples": 10_000}
)


def info(node_id: int) -> NodeInfo:
    rank = RANKS[node_id]
    return NodeInfo(rank, lora_scaling(CFG.lora.lora_alpha, rank), f"node-{node_id:03d}", "cpu: test")


def valid_reply(node_id: int) -> TrainReply:
    """A plausible trained update: random factors at the node's rank, a head, an example count."""
    rng = np.random.default_rng(node_id)
    rank = RANKS[node_id]
    lora = {
        m: (rng.normal(0, 0.3, (rank, n_in)).astype(np.float32), rng.normal(0, 0.3, (out, rank)).astype(np.float32))
        for m, (out, n_in) in MODULES.items()
    }
    head = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, shape in HEAD.items()}
    return TrainReply(AdapterFactors(lora, head), 40 + node_id, info(node_id), {"train-loss": 1.0 + node_id / 100})


def _with(reply: TrainReply, lora: dict | None = None, head: dict | None = None, **changes: object) -> TrainReply:
    adapter = AdapterFactors(reply.adapter.lora if lora is None else lora, reply.adapter.head if head is None else head)
    return dataclasses.replace(reply, adapter=adapter, **changes)


def _map_factors(reply: TrainReply, fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> dict:
    first = sorted(reply.adapter.lora)[0]
    return {m: fn(a, b) if m == first else (a, b) for m, (a, b) in reply.adapter.lora.items()}


def _rank8(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([a, a]), np.concatenate([b, b], axis=1)


BAD_UPDATES: dict[str, Callable[[TrainReply], TrainReply]] = {
    "missing-key": lambda r: _with(r, lora=dict(sorted(r.adapter.lora.items())[1:])),
    "unexpected-key": lambda r: _with(r, head={**r.adapter.head, "base_model.model.pooler.weight": np.ones((5, 5))}),
    "wrong-rank": lambda r: _with(r, lora=_map_factors(r, _rank8)),
    "shape": lambda r: _with(r, lora=_map_factors(r, lambda a, b: (np.pad(a, ((0, 0), (0, 1))), b))),
    "dtype": lambda r: _with(r, lora=_map_factors(r, lambda a, b: (np.rint(a * 10).astype(np.int32), b))),
    "non-finite": lambda r: _with(r, lora=_map_factors(r, lambda a, b: (a, np.where(b > 0.2, np.nan, b)))),
    "norm": lambda r: _with(r, lora={m: (a, b * 1e4) for m, (a, b) in r.adapter.lora.items()}),
    "num-examples": lambda r: dataclasses.replace(r, num_examples=LIMITS.max_num_examples + 1),
    "too-large": lambda r: _with(r, head={**r.adapter.head, HEAD_WEIGHT: np.ones((600, 600), np.float32)}),
}
"""Every reason :mod:`common.validation` can give after the codec, with an update that earns it."""


class FakeGrid:
    """Answers each message as a node would (replies built by the codec); ``train`` says what each node sends.

    A node whose train content is an ``Error`` replies with it (its ClientApp failed); one whose content is
    ``None`` never answers its train message: like Flower's grid, the call then returns what arrived once
    ``timeout`` has passed.
    """

    def __init__(self, train: dict[int, RecordDict | Error | None], connected: Iterable[int] = RANKS) -> None:
        self.train = train
        self.connected = sorted(connected)
        self.timeouts: list[float | None] = []
        """The timeout of every send_and_receive call (a wait without one would be a bug)."""

    def get_node_ids(self) -> Iterable[int]:
        return self.connected

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        self.timeouts.append(timeout)
        replies = [reply for msg in sent if (reply := self._answer(msg)) is not None]
        if len(replies) < len(sent) and timeout is not None:
            time.sleep(timeout)
        return replies

    def _answer(self, msg: Message) -> Message | None:
        node_id = msg.metadata.dst_node_id
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return Message(records.encode_query_reply(info(node_id)), reply_to=msg)
        if kind == MessageType.EVALUATE:
            reply = EvaluateReply(30, info(node_id), {"eval-loss": 1.0, "eval-accuracy": 0.5})
            return Message(records.encode_evaluate_reply(reply), reply_to=msg)
        content = self.train[node_id]
        return None if content is None else Message(content, reply_to=msg)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the identity a ServerApp process has (Flower sets it when it starts a run)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def run_one_round(tmp_path: Path, bad: RecordDict | Error) -> LoRAStrategy:
    """Round 0 (ranks learned from evaluate replies) and round 1 through Flower's loop, with one bad update."""
    train: dict[int, RecordDict | Error | None] = {n: records.encode_train_reply(valid_reply(n)) for n in RANKS}
    train[BAD_NODE] = bad
    recorder = RunRecorder(CFG, tmp_path / "run", "reliability", tmp_path / "fedlora.db")
    strategy = LoRAStrategy(CFG, recorder, limits=LIMITS)
    grid = FakeGrid(train)
    strategy.evaluate_round_zero(grid)  # type: ignore[arg-type]
    strategy.start(grid, ArrayRecord(), num_rounds=CFG.num_rounds, timeout=CFG.reliability.round_timeout)  # type: ignore[arg-type]
    return strategy


def direct_aggregate(replies: list[TrainReply]) -> GlobalAdapter:
    """The oracle: the global adapter's own rule applied to the valid replies alone, in the strategy's order."""
    reference = GlobalAdapter.from_config(CFG)
    reference.aggregate(sorted(replies, key=lambda r: r.node.name), sorted(set(RANKS.values())))
    return reference


def assert_global_is_aggregate_of(strategy: LoRAStrategy, valid: list[TrainReply]) -> None:
    """Equal to the direct aggregate, and to a dense reference ΔW̄ = Σ p_i s_i B_i A_i (no truncation: R ≤ 64)."""
    got = strategy.engine.global_adapter
    want = direct_aggregate(valid)
    for key, value in want.to_arrays().items():
        np.testing.assert_allclose(got.to_arrays()[key], value, rtol=0, atol=1e-6, err_msg=key)
    weights = np.array([r.num_examples for r in valid], dtype=np.float64)
    p = weights / weights.sum()
    for module, (lora_A, lora_B) in got.lora.items():
        dense = sum(
            p_i * r.node.scaling * r.adapter.lora[module][1].astype(np.float64) @ r.adapter.lora[module][0]
            for p_i, r in zip(p, valid, strict=True)
        )  # (out, in)
        np.testing.assert_allclose(lora_B.astype(np.float64) @ lora_A, dense, rtol=1e-5, atol=1e-6, err_msg=module)
    for key in HEAD:
        expected = np.average(np.stack([r.adapter.head[key] for r in valid]), axis=0, weights=weights)
        np.testing.assert_allclose(got.head[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)


def stored_rejections(db: Path, server_round: int) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        query = "SELECT node_id, reason FROM rejected WHERE server_round = ? ORDER BY node_id"
        return [(str(n), str(r)) for n, r in conn.execute(query, (server_round,))]


@pytest.mark.parametrize("reason", sorted(BAD_UPDATES))
def test_bad_update_is_rejected_with_its_reason_and_left_out_of_the_aggregate(tmp_path: Path, reason: str) -> None:
    # Arrange
    bad = records.encode_train_reply(BAD_UPDATES[reason](valid_reply(BAD_NODE)))
    valid = [valid_reply(n) for n in sorted(RANKS) if n != BAD_NODE]
    # Act
    strategy = run_one_round(tmp_path, bad)
    # Assert: rejected with that reason (in memory and in the run store) ...
    assert [(n, reason_code(r)) for n, r in strategy.engine.outcome.rejected] == [(BAD_NODE, reason)]
    ((node, text),) = stored_rejections(tmp_path / "fedlora.db", 1)
    assert node == str(BAD_NODE) and reason_code(text) == reason
    # ... the round completed (recorded, not skipped, checkpointed) ...
    row = strategy.recorder.rows[-1]
    assert (row["round"], row["participants"], row["rejected"], row["skipped"]) == (1, 3, 1, "")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0001.ckpt").server_round == 1
    # ... and the global adapter is the aggregate of the valid updates alone.
    assert_global_is_aggregate_of(strategy, valid)


def test_malformed_record_is_rejected_by_the_codec(tmp_path: Path) -> None:
    content = records.encode_train_reply(valid_reply(BAD_NODE))
    del content[records.NODE]
    strategy = run_one_round(tmp_path, content)
    assert [(n, reason_code(r)) for n, r in strategy.engine.outcome.rejected] == [(BAD_NODE, "malformed")]
    assert_global_is_aggregate_of(strategy, [valid_reply(n) for n in sorted(RANKS) if n != BAD_NODE])


def test_a_failed_node_is_recorded_with_its_exception(tmp_path: Path) -> None:
    traceback = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n"
        '  File "client/faults.py", line 87, in fault_mod\n'
        "client.faults.InjectedFault: injected fault: node-007 told to raise in round 1\n\n"
        "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred.'>"
    )
    strategy = run_one_round(tmp_path, Error(code=1, reason=traceback))
    assert strategy.engine.outcome.rejected == [
        (BAD_NODE, "node-error: client.faults.InjectedFault: injected fault: node-007 told to raise in round 1")
    ]
    assert_global_is_aggregate_of(strategy, [valid_reply(n) for n in sorted(RANKS) if n != BAD_NODE])


def test_a_bad_update_does_not_persist_as_the_layout(tmp_path: Path) -> None:
    """The first round learns the layout from the majority, so the next round still accepts honest nodes."""
    bad = records.encode_train_reply(BAD_UPDATES["missing-key"](valid_reply(BAD_NODE)))
    strategy = run_one_round(tmp_path, bad)
    assert strategy.engine.layout is not None and set(strategy.engine.layout.modules) == set(MODULES)
    assert set(strategy.engine.layout.head) == set(HEAD)
