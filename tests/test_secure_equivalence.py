"""SecAgg+ end to end in one process: Flower's real workflow and mod, our codec, vs the plain aggregate.

Three nodes at ranks 2, 4, 8 with unequal example counts reply through ``client.secure.secure_train_mod`` (Flower's
``secaggplus_mod`` inside) to ``server.secure.LoRASecAggPlus`` (Flower's ``SecAggPlusWorkflow``) over an in-process
grid. The global adapter built from the unmasked sum must equal ``GlobalAdapter.aggregate`` of the same replies
within SecAgg+'s quantisation error, which is bounded per entry of a weighted mean by m·(2c/Q)/Σ w_i
(m nodes, clipping range c, Q levels, w_i = n_i / max-weight, stochastic rounding off by < 1 level per node).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.secure import secure_train_mod
from common.codec import records
from common.codec.secure_records import decode_fit_res, decode_means, with_pad_rank
from common.config import RunConfig
from common.lora import lora_scaling
from common.rules.registry import get_rule
from common.secure_sum import means_from_sums
from common.updates import AdapterFactors, Instruction, NodeInfo, TrainReply
from server.global_adapter import GlobalAdapter
from server.secure import LoRASecAggPlus, SecureRound, _legacy_context

RANKS = {11: 2, 22: 4, 33: 8}
EXAMPLES = {11: 50, 22: 120, 33: 200}
MODULES = {"layer.0.query": (12, 10), "layer.0.value": (12, 10)}  # (out, in)


class InProcessGrid(Grid):
    """Delivers each message to its node's ClientApp in this process; an exception becomes an error reply."""

    def __init__(self, apps: dict[int, ClientApp], run_config: dict[str, object]) -> None:
        self.apps = apps
        self.contexts = {n: Context(1, n, {}, RecordDict(), run_config) for n in apps}  # type: ignore[arg-type]
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for sent in messages:
            msg = copy.deepcopy(sent)  # a real grid serialises: nodes must not share (or mutate) one content object
            msg.metadata.__dict__.update(_message_id=uuid.uuid4().hex, _src_node_id=0)
            node = msg.metadata.dst_node_id
            try:
                replies.append(self.apps[node](msg, self.contexts[node]))
            except Exception as err:  # what the SuperNode does with a raising ClientApp
                replies.append(Message(Error(2, f"{type(err)}:<'{err}'>"), reply_to=msg))
        return replies


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Messages read the run id of the current process."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def make_reply(node_id: int, rule: str, rng: np.random.Generator, alpha: float = 16.0) -> TrainReply:
    rank = RANKS[node_id]
    lora = {}
    for module, (out_f, in_f) in MODULES.items():
        shared = np.random.default_rng(len(module)).uniform(-0.3, 0.3, size=(8, in_f)).astype(np.float32)
        lora_A = shared[:rank] if rule == "ffa" else rng.normal(0, 0.3, size=(rank, in_f)).astype(np.float32)
        lora[module] = (lora_A, rng.normal(0, 0.05, size=(out_f, rank)).astype(np.float32))
    head = {"classifier.weight": rng.normal(0, 0.1, size=(3, 12)).astype(np.float32)}
    info = NodeInfo(rank, lora_scaling(alpha, rank), f"node-{node_id}")
    return TrainReply(AdapterFactors(lora, head), EXAMPLES[node_id], info, {"train-loss": 1.0 + node_id / 100})


def node_app(reply: TrainReply, fail: bool = False) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secure_train_mod])
    def train(msg: Message, context: Context) -> Message:
        if fail:
            raise RuntimeError("node declines to train: privacy budget exhausted")
        records.decode_instruction(msg.content)
        return Message(records.encode_train_reply(reply), reply_to=msg)

    return app


def secure_aggregate(
    replies: dict[int, TrainReply], cfg: RunConfig, failing: frozenset[int] = frozenset()
) -> tuple[GlobalAdapter, list[int]]:
    """Run SecAgg+ over the in-process grid; return the global adapter built from the sum and who was in it."""
    grid = InProcessGrid({n: node_app(r, n in failing) for n, r in replies.items()}, cfg.to_mapping())
    pad_rank = max(RANKS.values())
    instructions = {
        n: with_pad_rank(records.encode_instruction(Instruction(1, r.node.rank, r.node.scaling, None)), pad_rank)
        for n, r in replies.items()
    }
    round_strategy = SecureRound(sorted(replies), grid)
    base = Context(1, 0, {}, RecordDict(), cfg.to_mapping())  # type: ignore[arg-type]
    LoRASecAggPlus(instructions, cfg)(grid, _legacy_context(base, cfg, round_strategy, 1))
    assert round_strategy.results, "SecAgg+ did not complete"
    clear = [decode_fit_res(fit_res) for _, fit_res in round_strategy.results]
    lora, head = means_from_sums(
        clear[0].summand_keys, decode_means(round_strategy.results[0][1].parameters), get_rule(cfg.rule)
    )
    adapter = GlobalAdapter(get_rule(cfg.rule), 16)
    adapter.load_means(lora, head)
    return adapter, sorted(int(p.node_id) for p, _ in round_strategy.results)


def quantisation_bound(cfg: RunConfig, examples: list[int]) -> float:
    weights = [n / cfg.secagg.max_weight for n in examples]
    return len(examples) * (2 * cfg.secagg.clipping_range / cfg.secagg.quantization_range) / sum(weights)


def assert_adapters_close(actual: GlobalAdapter, expected: GlobalAdapter, atol: float) -> None:
    assert sorted(actual.lora) == sorted(expected.lora)
    for module, (a, b) in expected.lora.items():
        np.testing.assert_allclose(actual.lora[module][0], a, atol=atol, rtol=0, err_msg=f"{module} lora_A")
        np.testing.assert_allclose(actual.lora[module][1], b, atol=atol, rtol=0, err_msg=f"{module} lora_B")
    for key, value in expected.head.items():
        np.testing.assert_allclose(actual.head[key], value, atol=atol, rtol=0, err_msg=key)


@pytest.mark.parametrize("rule", ["fedavg", "ffa"])
def test_secure_aggregate_equals_the_plain_aggregate_within_quantisation(rule: str) -> None:
    # Arrange
    cfg = RunConfig.from_mapping({"rule": rule, "secure-aggregation": True, "secagg-max-weight": 400.0})
    rng = np.random.default_rng(7)
    replies = {n: make_reply(n, rule, rng) for n in RANKS}
    plain = GlobalAdapter(get_rule(rule), 16)
    plain.aggregate(list(replies.values()), sorted(RANKS.values()))
    # Act
    secure, members = secure_aggregate(replies, cfg)
    # Assert
    assert members == sorted(RANKS)
    bound = quantisation_bound(cfg, list(EXAMPLES.values()))
    atol = bound * (3.0 if rule == "ffa" else 1.0)  # ffa divides A's rows by the weight share that holds them (≥ 1/3)
    assert bound < 1e-4
    assert_adapters_close(secure, plain, atol)


def test_a_node_that_fails_drops_out_and_the_others_are_summed() -> None:
    cfg = RunConfig.from_mapping({"rule": "fedavg", "secure-aggregation": True, "secagg-max-weight": 400.0})
    rng = np.random.default_rng(8)
    replies = {n: make_reply(n, "fedavg", rng) for n in RANKS}
    plain = GlobalAdapter(get_rule("fedavg"), 16)
    plain.aggregate([replies[11], replies[33]], [2, 8])

    secure, members = secure_aggregate(replies, cfg, failing=frozenset({22}))

    assert members == [11, 33]
    assert_adapters_close(secure, plain, quantisation_bound(cfg, [EXAMPLES[11], EXAMPLES[33]]))


def test_an_entry_beyond_the_clipping_range_is_refused_by_the_node() -> None:
    from client.secure import check_clipping_range

    cfg = RunConfig.from_mapping(
        {"rule": "fedavg", "secure-aggregation": True, "secagg-max-weight": 100.0, "secagg-clipping-range": 1.0}
    )
    with pytest.raises(ValueError, match="exceeds secagg-clipping-range 1"):
        check_clipping_range([np.array([0.5, -3.0])], 50, cfg)
    with pytest.raises(ValueError, match="exceeds secagg-max-weight"):
        check_clipping_range([np.array([0.5])], 500, cfg)


def test_svd_with_secure_aggregation_is_refused_at_config_time_saying_why() -> None:
    with pytest.raises(ValueError, match="only reveals the sum of the updates, while 'svd' needs each client's"):
        RunConfig.from_mapping({"secure-aggregation": True, "rule": "svd"})
    with pytest.raises(ValueError, match="central DP clips each client's update on the coordinator"):
        RunConfig.from_mapping({"secure-aggregation": True, "rule": "fedavg", "dp": "central", "noise-multiplier": 1})


def test_svd_with_secure_aggregation_fails_fast_on_the_command_line(tmp_path: Path) -> None:
    from conftest import run_fedlora

    done = run_fedlora("simulate", "--out", str(tmp_path / "run"), "--set", "secure-aggregation=true", timeout=120)

    assert done.returncode == 2
    assert "secure aggregation cannot be combined with rule 'svd': it only reveals the sum" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started
