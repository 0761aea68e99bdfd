"""The fedlora strategy: Flower's FedAvg round loop, with per-node ranks and factored aggregation.

Flower's loop (``Strategy.start``) is kept. The hooks change what travels: each sampled node gets the global
adapter re-projected to its own rank r_j; replies are decoded by the codec, validated, aggregated by the
configured rule from ``common.aggregation`` and recorded by :class:`server.recorder.RunRecorder`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common import records
from common.config import RunConfig
from common.updates import AdapterFactors, EvaluateReply, Instruction, NodeInfo, TrainReply
from common.validation import Layout, UpdateLimits
from server.global_adapter import GlobalAdapter
from server.recorder import RoundLog, RunRecorder
from server.replies import accept_train_replies, missing_replies, split_replies, update_limits
from server.sampling import sample_nodes, sample_size, wait_for_nodes


class LoRAStrategy(FedAvg):
    """Heterogeneous-rank federated LoRA on Flower's Message API."""

    def __init__(
        self, cfg: RunConfig, recorder: RunRecorder, round_offset: int = 0, limits: UpdateLimits | None = None
    ) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_nodes,
            min_evaluate_nodes=cfg.min_nodes,
            min_available_nodes=cfg.min_nodes,
        )
        self.cfg = cfg
        self.recorder = recorder
        self.round_offset = round_offset
        self.global_adapter = GlobalAdapter.from_config(cfg)
        self.nodes: dict[int, NodeInfo] = {}
        self.rng = random.Random(cfg.seed)
        self.pending = RoundLog(0)
        self.limits = limits or update_limits(cfg)
        """Bounds every update must respect (from the run config unless given)."""

    # --- round phases (Flower's hooks) -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the global adapter at its own rank."""
        server_round += self.round_offset
        self.pending = RoundLog(server_round)
        node_ids, self.pending.available = self._sample(grid, self.cfg.fraction_train)
        self.pending.started = time.time()
        messages = self._messages(grid, node_ids, server_round, MessageType.TRAIN)
        self.pending.sampled = [int(m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate the valid ones with the configured rule, keep the rest as rejections."""
        server_round += self.round_offset
        ok, failed = split_replies(replies)
        failed += missing_replies(self.pending.sampled, ok, failed, self.cfg.round_timeout)
        for node_id, reason in failed:
            log(WARNING, "node %d left out of round %d: %s", node_id, server_round, reason)
        self.pending.rejected.extend(failed)
        accepted, rejected, _ = accept_train_replies(ok, self.nodes, self.cfg, self.layout, self.limits)
        self.pending.rejected.extend(rejected)
        for node_id, reply in accepted.items():
            self._remember(node_id, reply.node, server_round)
            self.pending.bytes_up[node_id] = reply.adapter.nbytes
        if len(accepted) < self.cfg.min_nodes:
            self.pending.skipped = (
                f"only {len(accepted)} valid replies, fewer than min-nodes={self.cfg.min_nodes}; global adapter kept"
            )
            log(WARNING, "round %d skipped: %s", server_round, self.pending.skipped)
            return None, None
        ordered = [accepted[n] for n in sorted(accepted, key=lambda n: (accepted[n].node.name, n))]
        ranks = sorted({info.rank for info in self.nodes.values()})
        result = self.global_adapter.aggregate(
            ordered, ranks, num_sampled=len(self.pending.sampled), num_available=self.pending.available
        )
        self.pending.participants = sorted(accepted)
        self.pending.aggregation_seconds = result.seconds
        self.pending.diagnostics = result.diagnostics
        self.pending.metrics.update(_weighted(list(ordered), "train-loss"))
        node_epsilons = [r.metrics["epsilon"] for r in ordered if "epsilon" in r.metrics]
        self.pending.epsilon = result.epsilon if result.epsilon is not None else max(node_epsilons, default=None)
        return ArrayRecord(), MetricRecord(dict(self.pending.metrics.items()))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the global adapter at its rank for evaluation on its held-out split."""
        server_round += self.round_offset
        node_ids, _ = self._sample(grid, self.cfg.fraction_evaluate)
        return self._messages(grid, node_ids, server_round, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted eval loss/accuracy; then the round is complete and gets recorded and checkpointed."""
        server_round += self.round_offset
        ok, failed = split_replies(replies)
        evaluated: list[EvaluateReply] = []
        for node_id, msg in ok.items():
            try:
                reply = records.decode_evaluate_reply(msg.content)
            except records.RecordError as err:
                failed.append((node_id, f"malformed-evaluate-reply: {err}"))
                continue
            self._remember(node_id, reply.node, server_round)
            evaluated.append(reply)
        for node_id, reason in failed:
            log(WARNING, "evaluate reply from node %d ignored: %s", node_id, reason)
        metrics = {**_weighted(evaluated, "eval-loss"), **_weighted(evaluated, "eval-accuracy")}
        self.pending.metrics.update(metrics)
        if server_round == 0:
            self.pending.participants = sorted(ok)
        self.pending.round = server_round
        self.recorder.record_round(self.pending, self)
        return MetricRecord(dict(metrics.items())) if metrics else None

    def evaluate_round_zero(self, grid: Grid) -> None:
        """Federated evaluation of the untrained model (round 0) before Flower's loop starts."""
        self.pending = RoundLog(0)
        messages = self.configure_evaluate(-self.round_offset, ArrayRecord(), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
        self.aggregate_evaluate(-self.round_offset, replies)

    # --- state ----------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Global factors and head as arrays; node ranks, sampling RNG and rule as JSON metadata."""
        version, internal, gauss = self.rng.getstate()
        meta = {
            "rule": self.cfg.rule,
            "store-rank": self.global_adapter.store_rank,
            "nodes": {str(n): dataclasses.asdict(info) for n, info in self.nodes.items()},
            "rng": [version, list(internal), gauss],
            "aggregator": self.global_adapter.extra_state(),
        }
        return self.global_adapter.to_arrays(), meta

    def restore(self, server_round: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Continue after ``server_round`` from a checkpoint written by ``checkpoint_state``."""
        if meta.get("rule") != self.cfg.rule:
            raise ValueError(f"checkpoint was written by rule {meta.get('rule')!r}, this run uses {self.cfg.rule!r}")
        self.global_adapter.load_arrays(arrays)
        self.global_adapter.load_extra_state(meta.get("aggregator", {}))
        self.nodes = {int(n): NodeInfo(**info) for n, info in meta.get("nodes", {}).items()}
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.round_offset = server_round

    @property
    def layout(self) -> Layout | None:
        """What every update must match: the global adapter's modules and head (None before the first aggregate)."""
        if self.global_adapter.empty:
            return None
        return Layout.from_adapter(AdapterFactors(self.global_adapter.lora, self.global_adapter.head))

    # --- helpers ---------------------------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float) -> tuple[list[int], int]:
        """Seeded sample of the connected nodes (drawn in (name, id) order so that a restart draws the same nodes),
        and how many were connected."""
        nodes = wait_for_nodes(grid, self.cfg.min_nodes, self.cfg.round_timeout)
        size = sample_size(len(nodes), self.cfg.min_nodes, fraction)
        if size < len(nodes):  # names matter only when choosing a subset
            self._learn_ranks(grid, [n for n in nodes if n not in self.nodes])
        return sample_nodes(nodes, size, self.rng, key=self._sort_key), len(nodes)

    def _sort_key(self, node_id: int) -> tuple[str, int]:
        info = self.nodes.get(node_id)
        return (info.name if info else "", node_id)

    def _messages(self, grid: Grid, node_ids: list[int], server_round: int, message_type: str) -> list[Message]:
        """One message per node, carrying the global adapter at that node's rank."""
        if not self.global_adapter.empty:
            self._learn_ranks(grid, [n for n in node_ids if n not in self.nodes])
        messages = []
        for node_id in node_ids:
            info = self.nodes.get(node_id)
            if info is None and not self.global_adapter.empty:
                log(WARNING, "node %d left out of round %d: its rank is unknown", node_id, server_round)
                continue
            rank, scaling = (info.rank, info.scaling) if info else (0, 1.0)
            adapter = self.global_adapter.serve(rank, scaling) if info else None
            instruction = Instruction(server_round, rank, scaling, adapter, freeze_lora_A=self.cfg.rule == "ffa")
            content = records.encode_instruction(instruction)
            if message_type == MessageType.TRAIN:
                self.pending.bytes_down[node_id] = adapter.nbytes if adapter else 0
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        return messages

    def _learn_ranks(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes the coordinator has not met yet for their rank (once per node id)."""
        if not node_ids:
            return
        queries = [Message(records.encode_query(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        replies = grid.send_and_receive(queries, timeout=min(self.cfg.round_timeout, 120.0))
        ok, failed = split_replies(replies)
        for node_id, msg in ok.items():
            try:
                self._remember(node_id, records.decode_query_reply(msg.content), 0)
            except records.RecordError as err:
                log(WARNING, "node %d sent a malformed query reply: %s", node_id, err)
        for node_id, reason in failed:
            log(WARNING, "node %d did not tell its rank: %s", node_id, reason)

    def _remember(self, node_id: int, info: NodeInfo, server_round: int) -> None:
        known = self.nodes.get(node_id)
        if known is None or known.rank != info.rank:
            log(INFO, "node %d (%s) trains at rank %d (scaling %.4g)", node_id, info.name, info.rank, info.scaling)
        self.nodes[node_id] = info
        self.recorder.node_seen(node_id, info, server_round)


def _weighted(replies: list[TrainReply] | list[EvaluateReply], key: str) -> dict[str, float]:
    """Example-weighted mean of one metric over the replies that report it."""
    pairs = [(r.metrics[key], r.num_examples) for r in replies if key in r.metrics]
    total = sum(n for _, n in pairs)
    return {key: sum(v * n for v, n in pairs) / total} if total > 0 else {}
