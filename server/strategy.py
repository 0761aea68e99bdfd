"""The fedlora strategy: Flower's FedAvg round loop, whose hooks move messages for the round engine.

Flower's loop (``Strategy.start``) is kept. Each hook turns what :class:`server.engine.RoundEngine` decides into
Messages (one per node: the global adapter at that node's rank) and decodes the replies for it; the engine samples,
validates and aggregates, and the recorder writes the round it returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common.codec import records
from common.config import RunConfig
from common.validation import UpdateLimits
from server.engine import GlobalEvaluation, RoundEngine
from server.recorder import RunRecorder
from server.replies import decode_evaluate_replies, decode_query_replies, decode_train_replies, split_replies
from server.sampling import wait_for_nodes

QUERY_TIMEOUT_S = 120.0
"""Longest wait for nodes to tell their rank."""


class LoRAStrategy(FedAvg):
    """Heterogeneous-rank federated LoRA on Flower's Message API."""

    def __init__(
        self,
        cfg: RunConfig,
        recorder: RunRecorder,
        limits: UpdateLimits | None = None,
        evaluator: GlobalEvaluation | None = None,
    ) -> None:
        reliability = cfg.reliability
        super().__init__(
            fraction_train=reliability.fraction_train,
            fraction_evaluate=reliability.fraction_evaluate,
            min_train_nodes=reliability.min_nodes,
            min_evaluate_nodes=reliability.min_nodes,
            min_available_nodes=reliability.min_nodes,
        )
        self.cfg = cfg
        self.recorder = recorder
        self.engine = RoundEngine(cfg, limits, evaluator)

    # --- round phases (Flower's hooks) -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the global adapter at its own rank."""
        server_round += self.engine.round_offset
        outcome = self.engine.begin(server_round)
        node_ids, outcome.available = self._sample(grid, self.cfg.reliability.fraction_train)
        outcome.started = time.time()
        return self._messages(grid, node_ids, server_round, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies; the engine validates them and aggregates the valid ones."""
        ok, failed = split_replies(replies)
        decoded, malformed = decode_train_replies(ok, self.cfg.lora.max_rank)
        aggregated = self.engine.aggregate_train(decoded, [*failed, *malformed])
        self.flush_log()
        if not aggregated:
            return None, None
        return ArrayRecord(), MetricRecord(dict(self.engine.outcome.metrics.items()))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the global adapter at its rank for evaluation on its held-out split."""
        server_round += self.engine.round_offset
        node_ids, _ = self._sample(grid, self.cfg.reliability.fraction_evaluate)
        return self._messages(grid, node_ids, server_round, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted eval loss/accuracy; then the round is complete and gets recorded and checkpointed."""
        server_round += self.engine.round_offset
        ok, failed = split_replies(replies)
        decoded, malformed = decode_evaluate_replies(ok, self.cfg.lora.max_rank)
        for node_id, reason in [*failed, *malformed]:
            log(WARNING, "evaluate reply from node %d ignored: %s", node_id, reason)
        metrics = self.engine.aggregate_evaluate(server_round, decoded, ok)
        metrics.update(self.engine.evaluate_global())
        self.flush_log()
        self.recorder.record_round(self.engine.outcome, self.engine.checkpoint_state())
        return MetricRecord(dict(metrics.items())) if metrics else None

    def evaluate_round_zero(self, grid: Grid) -> None:
        """Federated evaluation of the untrained model (round 0) before Flower's loop starts."""
        self.engine.begin(0)
        messages = self.configure_evaluate(-self.engine.round_offset, ArrayRecord(), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=self.cfg.reliability.round_timeout)
        self.aggregate_evaluate(-self.engine.round_offset, replies)

    # --- helpers ---------------------------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float) -> tuple[list[int], int]:
        """Seeded sample of the connected nodes, and how many were connected (names learned first when sampling a
        subset, so that a restart, which gives the nodes new ids, draws the same nodes)."""
        reliability = self.cfg.reliability
        nodes = wait_for_nodes(grid, reliability.min_nodes, reliability.round_timeout)
        if self.engine.needs_names(nodes, fraction):
            self._learn_ranks(grid, self.engine.unknown(nodes))
        return self.engine.sample(nodes, fraction), len(nodes)

    def _messages(self, grid: Grid, node_ids: list[int], server_round: int, message_type: str) -> list[Message]:
        """One message per node, carrying the global adapter at that node's rank."""
        if not self.engine.global_adapter.empty:
            self._learn_ranks(grid, self.engine.unknown(node_ids))
        instructions = self.engine.instructions(node_ids, server_round, train=message_type == MessageType.TRAIN)
        self.flush_log()
        return [
            Message(content=records.encode_instruction(ins), message_type=message_type, dst_node_id=node_id)
            for node_id, ins in instructions.items()
        ]

    def _learn_ranks(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes the coordinator has not met yet for their rank (once per node id)."""
        if not node_ids:
            return
        queries = [Message(records.encode_query(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        timeout = min(self.cfg.reliability.round_timeout, QUERY_TIMEOUT_S)
        ok, failed = split_replies(grid.send_and_receive(queries, timeout=timeout))
        decoded, malformed = decode_query_replies(ok, self.cfg.lora.max_rank)
        for node_id, info in decoded.items():
            self.engine.remember(node_id, info, 0)
        for node_id, reason in [*failed, *malformed]:
            log(WARNING, "node %d did not tell its rank: %s", node_id, reason)
        self.flush_log()

    def flush_log(self) -> None:
        """Log what the engine journalled, through Flower's logger (the one a ServerApp's output reaches)."""
        for level, line in self.engine.drain():
            log(level, "%s", line)
