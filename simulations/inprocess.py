"""Federated rounds in one process: the coordinator's real aggregation code, the nodes' real functions, no transport.

This is what a Flower run does, minus messages and processes: each round every node gets the global adapter at
its own rank (``GlobalAdapter.serve``), trains with ``train_fn`` (``client.node.train_node`` or
``client.causal_lm.train_causal_node``), the replies are aggregated by ``GlobalAdapter.aggregate`` with the run's
rule, and every node evaluates the new global adapter with ``evaluate_fn``. Round 0 evaluates the untrained model.

It serves the experiments that need something a Flower run does not offer: the LLM preset (the ClientApp serves
sequence classification only), a bf16 transport of the factors, and timing the same work without Flower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from client.node import NodeSettings, node_info
from common.config import RunConfig
from common.updates import AdapterFactors, EvaluateReply, Instruction, TrainReply
from server.global_adapter import GlobalAdapter

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

    def weighted(self, key: str) -> float:
        """Example-weighted mean of an evaluation metric over nodes."""
        pairs = [(r.metrics[key], r.num_examples) for r in self.evaluations if key in r.metrics]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else float("nan")


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


def evaluate_all(
    cfg: RunConfig, nodes: Sequence[NodeSettings], evaluate_fn: EvaluateFn, global_adapter: GlobalAdapter, rnd: int
) -> list[EvaluateReply]:
    """Every node evaluates the global adapter at its own rank."""
    replies = []
    for node in nodes:
        info = node_info(cfg, node)
        adapter = global_adapter.serve(info.rank, info.scaling)
        known = adapter is not None
        ins = Instruction(rnd, info.rank if known else 0, info.scaling if known else 1.0, adapter)
        replies.append(evaluate_fn(cfg, node, ins))
    return replies


def run_rounds(
    cfg: RunConfig,
    nodes: Sequence[NodeSettings],
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn,
    transport: Transport = float32_transport,
    on_round: Callable[[RoundResult], None] | None = None,
    evaluate_every_round: bool = True,
) -> list[RoundResult]:
    """Round 0 (evaluation only), then ``cfg.num_rounds`` rounds of train → aggregate → evaluate.

    With ``evaluate_every_round`` False only round 0 and the last round are evaluated (the others report no
    evaluations), which saves time where evaluation is expensive (a causal LM on a CPU).
    """
    global_adapter = GlobalAdapter.from_config(cfg)
    ranks = sorted({node.rank for node in nodes})
    started = time.perf_counter()
    results = [RoundResult(0, evaluate_all(cfg, nodes, evaluate_fn, global_adapter, 0))]
    results[0].seconds = time.perf_counter() - started
    if on_round is not None:
        on_round(results[0])
    for rnd in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        replies = []
        for node in nodes:
            info = node_info(cfg, node)
            served = global_adapter.serve(info.rank, info.scaling)
            down = transport(served) if served is not None else None
            known = down is not None
            ins = Instruction(rnd, info.rank if known else 0, info.scaling if known else 1.0, down, cfg.rule == "ffa")
            reply = train_fn(cfg, node, ins)
            replies.append(TrainReply(transport(reply.adapter), reply.num_examples, reply.node, reply.metrics))
        aggregate = global_adapter.aggregate(replies, ranks)
        evaluate = evaluate_every_round or rnd == cfg.num_rounds
        result = RoundResult(
            rnd,
            evaluate_all(cfg, nodes, evaluate_fn, global_adapter, rnd) if evaluate else [],
            [r.metrics for r in replies],
            [r.adapter.nbytes for r in replies],
            aggregate.seconds,
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
