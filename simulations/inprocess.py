"""Federated rounds in one process: the coordinator's round engine and the nodes' real functions, no transport.

This is what a Flower run does, minus messages and processes: the same :class:`server.engine.RoundEngine` samples
the nodes, serves each the global adapter at its own rank, validates the replies of ``train_fn``
(:func:`client.node.train_node`) and aggregates them with the run's rule, and every node evaluates the new global
adapter with ``evaluate_fn``. Node ids are partition ids. Round 0 evaluates the untrained model.

It serves the experiments that need something a Flower run does not offer: a bf16 transport of the factors, timing
the same work without Flower, and rounds of a model too slow to start a process per message on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from client.node import node_info
from client.node_settings import NodeSettings
from common.config import RunConfig
from common.updates import AdapterFactors, EvaluateReply, Instruction, TrainReply, weighted_metric
from server.engine import GlobalEvaluation, RoundEngine

TrainFn = Callable[[RunConfig, NodeSettings, Instruction], TrainReply]
EvaluateFn = Callable[[RunConfig, NodeSettings, Instruction], EvaluateReply]
Transport = Callable[[AdapterFactors], AdapterFactors]


@dataclass
class RoundResult:
    """One round: every node's evaluation reply, and what travelled."""

    round: int
    evaluations: list[EvaluateReply]
    train_metrics: list[dict[str, float]] = field(default_factory=list)
    bytes_up_per_node: list[int] = field(default_factory=list)
    aggregation_seconds: float = 0.0
    seconds: float = 0.0
    skipped: str | None = None
    global_metrics: dict[str, float] = field(default_factory=dict)
    """``global-*`` metrics of the exported adapter on the run's fixed held-out set (empty without an evaluator)."""

    def weighted(self, key: str) -> float:
        """Example-weighted mean of an evaluation metric over nodes (NaN when none reports it)."""
        value = weighted_metric(self.evaluations, key)
        return math.nan if value is None else value


def float32_transport(adapter: AdapterFactors) -> AdapterFactors:
    """Factors as they are (float32)."""
    return adapter


def bf16_transport(adapter: AdapterFactors) -> AdapterFactors:
    """Factors rounded to bfloat16 and back, as a bf16 wire format would deliver them (half the bytes)."""

    def cast(array: np.ndarray) -> np.ndarray:
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.bfloat16).to(torch.float32).numpy()

    lora = {m: (cast(a), cast(b)) for m, (a, b) in adapter.lora.items()}
    return AdapterFactors(lora, {k: cast(v) for k, v in adapter.head.items()})


def wire_bytes(adapter: AdapterFactors, bytes_per_value: int = 4) -> int:
    """Bytes of the factors and head at ``bytes_per_value`` bytes per number."""
    return sum(int(v.size) * bytes_per_value for v in adapter.to_state_dict().values())


def _sent(ins: Instruction, transport: Transport) -> Instruction:
    return ins if ins.adapter is None else dataclasses.replace(ins, adapter=transport(ins.adapter))


def evaluate_sampled(
    engine: RoundEngine, nodes: Sequence[NodeSettings], evaluate_fn: EvaluateFn, rnd: int, *, evaluate: bool = True
) -> list[EvaluateReply]:
    """The round's federated evaluation: ``fraction-evaluate`` of the nodes, drawn by the engine's seeded sampler as
    the Flower strategy draws them (also when ``evaluate`` is False, so that later samples stay in step with a Flower
    run), evaluate the global adapter at their own rank (as the coordinator holds it, not as a transport would
    deliver it); the engine records the round's eval metrics."""
    by_id = {node.partition_id: node for node in nodes}
    sampled = engine.sample(sorted(by_id), engine.cfg.reliability.fraction_evaluate)
    if not evaluate:
        return []
    instructions = engine.instructions(sampled, rnd, train=False)
    replies = {node_id: evaluate_fn(engine.cfg, by_id[node_id], ins) for node_id, ins in instructions.items()}
    engine.aggregate_evaluate(rnd, replies, replies)
    return list(replies.values())


def run_rounds(
    cfg: RunConfig,
    nodes: Sequence[NodeSettings],
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn,
    transport: Transport = float32_transport,
    on_round: Callable[[RoundResult], None] | None = None,
    evaluate_every_round: bool = True,
    evaluator: GlobalEvaluation | None = None,
) -> list[RoundResult]:
    """Round 0 (evaluation only), then ``cfg.num_rounds`` rounds of sample → train → aggregate → evaluate.

    With ``evaluate_every_round`` False only round 0 and the last round are evaluated (the others report no
    evaluations), which saves time where evaluation is expensive (a causal LM on a CPU). With an ``evaluator`` the
    exported adapter is evaluated on the run's fixed held-out set whenever the nodes evaluate.
    """
    engine = RoundEngine(cfg, evaluator=evaluator)
    by_id = {node.partition_id: node for node in nodes}
    for node in nodes:
        engine.remember(node.partition_id, node_info(cfg, node), 0)
    started = time.perf_counter()
    engine.begin(0)
    results = [RoundResult(0, evaluate_sampled(engine, nodes, evaluate_fn, 0), global_metrics=engine.evaluate_global())]
    results[0].seconds = time.perf_counter() - started
    if on_round is not None:
        on_round(results[0])
    for rnd in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        outcome = engine.begin(rnd)
        outcome.available = len(nodes)
        sampled = engine.sample(sorted(by_id), cfg.reliability.fraction_train)
        replies = {}
        for node_id, ins in engine.instructions(sampled, rnd, train=True).items():
            reply = train_fn(cfg, by_id[node_id], _sent(ins, transport))
            replies[node_id] = dataclasses.replace(reply, adapter=transport(reply.adapter))
        engine.aggregate_train(replies, [])
        evaluate = evaluate_every_round or rnd == cfg.num_rounds
        result = RoundResult(
            rnd,
            evaluate_sampled(engine, nodes, evaluate_fn, rnd, evaluate=evaluate),
            [r.metrics for r in replies.values()],
            [r.adapter.nbytes for r in replies.values()],
            outcome.aggregation_seconds,
            skipped=outcome.skipped,
            global_metrics=engine.evaluate_global() if evaluate else {},
        )
        result.seconds = time.perf_counter() - started
        results.append(result)
        if on_round is not None:
            on_round(result)
    return results


def simulated_nodes(cfg: RunConfig, num_nodes: int, names: Sequence[str] = ()) -> list[NodeSettings]:
    """The node settings a simulation gives its nodes (partition i of ``num_nodes``, rank from node-ranks)."""
    return [
        NodeSettings.from_node_config(
            cfg,
            {"partition-id": i, "num-partitions": num_nodes, "node-name": names[i] if names else f"partition-{i}"},
        )
        for i in range(num_nodes)
    ]
