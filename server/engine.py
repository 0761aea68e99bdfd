"""The one round engine: sample → serve → validate → aggregate → a :class:`RoundOutcome` (no Flower here).

Every way fedlora runs a round drives the same engine, phase by phase: Flower's round loop
(:class:`server.strategy.LoRAStrategy`, whose hooks only move messages), the SecAgg+ workflow (:mod:`server.secure`,
which replaces the train phase's aggregation by :meth:`RoundEngine.install_means`) and the in-process rounds of
:mod:`simulations.inprocess`. The engine holds the round state (global adapter, known nodes, sampling RNG) and says
what to send; the caller sends it and hands back decoded replies. What the caller should log accumulates in
:attr:`RoundEngine.journal` (``(logging level, line)``), so the engine needs no logger of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.config import RunConfig
from common.diagnostics import rank_warning
from common.updates import (
    AdapterFactors,
    EvaluateReply,
    Instruction,
    NodeInfo,
    TrainReply,
    pooled_perplexity,
    weighted_metric,
)
from common.validation import Layout, UpdateLimits
from server.accept import Rejection, accept_updates, missing_replies, update_limits
from server.global_adapter import GlobalAdapter
from server.sampling import sample_nodes, sample_size
from server.weighting import aggregation_weights


class GlobalEvaluation(Protocol):
    """Evaluates the adapter a user would export on the run's fixed held-out set (``client.global_eval``)."""

    @property
    def description(self) -> dict[str, Any]:
        """What the fixed set is (its source, and the positions of its examples there), for the run folder."""
        ...

    @property
    def base_model(self) -> str:
        """The base model as a folder stock ``from_pretrained`` loads (what the exported adapter names)."""
        ...

    def __call__(self, adapter: AdapterFactors | None, rank: int) -> dict[str, float]:
        """``global-*`` metrics of the exported adapter at ``rank`` (None: the untrained model)."""
        ...


@dataclass
class RoundOutcome:
    """Everything one round did: who was asked and answered, what travelled, the aggregate's diagnostics, metrics."""

    round: int
    started: float = field(default_factory=time.time)
    sampled: list[int] = field(default_factory=list)
    """The nodes sent a train message."""
    available: int = 0
    """How many nodes were connected when the round sampled."""
    participants: list[int] = field(default_factory=list)
    """The nodes whose update went into the aggregate (round 0: those that evaluated)."""
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    aggregation_seconds: float = 0.0
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    """``train-loss``, ``eval-loss``, ``eval-accuracy``: example-weighted means over the nodes that report them;
    ``eval-perplexity``: pooled over their held-out tokens (causal LM); ``global-*``: the coordinator's evaluation."""
    rejected: list[Rejection] = field(default_factory=list)
    skipped: str | None = None
    """Why the round left the global adapter as it was (None when it aggregated)."""
    epsilon: float | None = None
    global_eval_seconds: float = 0.0
    """Time the coordinator spent evaluating the exported adapter on the fixed held-out set."""
    nodes_seen: list[tuple[int, NodeInfo, int]] = field(default_factory=list)
    warning: str = ""
    """What the stored global fails at (:func:`common.diagnostics.rank_warning`), or ""."""
    """``(node id, info, round)`` of every node heard from, in order, for the run store."""


def make_instruction(
    server_round: int, info: NodeInfo | None, adapter: AdapterFactors | None, freeze_lora_A: bool
) -> Instruction:
    """What a node gets: the global adapter at its rank (rank 0 and scaling 1 when neither is known yet)."""
    rank, scaling = (info.rank, info.scaling) if info is not None else (0, 1.0)
    return Instruction(server_round, rank, scaling, adapter, freeze_lora_A=freeze_lora_A)


class RoundEngine:
    """The coordinator's round logic over plain types: sampling, serving, validation, aggregation, state."""

    def __init__(
        self, cfg: RunConfig, limits: UpdateLimits | None = None, evaluator: GlobalEvaluation | None = None
    ) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        """Evaluates the exported adapter on the run's fixed held-out set after every round (None: no such set)."""
        self.global_adapter = GlobalAdapter.from_config(cfg)
        self.nodes: dict[int, NodeInfo] = {}
        """Every node met so far: its rank, scaling, name and device."""
        self.registered: dict[int, int] = {}
        """The first example count accepted from each node (``weighting = "examples-capped"`` caps later claims)."""
        self.rng = random.Random(cfg.seed)
        self.limits = limits or update_limits(cfg)
        """Bounds every update must respect (from the run config unless given)."""
        self.round_offset = 0
        """Rounds done before this process took over (a resumed run)."""
        self.outcome = RoundOutcome(0)
        """The round in progress."""
        self.journal: list[tuple[int, str]] = []
        """``(logging level, line)`` for the caller to log; :meth:`drain` empties it."""

    # --- sampling ----------------------------------------------------------------------------------------------------
    def begin(self, server_round: int) -> RoundOutcome:
        """Start recording round ``server_round`` (its train phase, or round 0's evaluation)."""
        self.outcome = RoundOutcome(server_round)
        return self.outcome

    def unknown(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes whose rank the coordinator has not learned yet."""
        return [n for n in node_ids if n not in self.nodes]

    def needs_names(self, connected: Sequence[int], fraction: float) -> bool:
        """Whether sampling draws a subset (then it needs every node's name, so a restart draws the same nodes)."""
        return sample_size(len(connected), self.cfg.reliability.min_nodes, fraction) < len(connected)

    def sample(self, connected: Sequence[int], fraction: float) -> list[int]:
        """A seeded sample of the connected nodes, drawn in (name, id) order."""
        size = sample_size(len(connected), self.cfg.reliability.min_nodes, fraction)
        return sample_nodes(list(connected), size, self.rng, key=self._sort_key)

    def _sort_key(self, node_id: int) -> tuple[str, int]:
        info = self.nodes.get(node_id)
        return (info.name if info else "", node_id)

    # --- serving -----------------------------------------------------------------------------------------------------
    def instructions(self, node_ids: Sequence[int], server_round: int, *, train: bool) -> dict[int, Instruction]:
        """Per node, the global adapter at its own rank; a node whose rank is still unknown once the global adapter
        exists is left out (and journalled). Train instructions count as bytes down and as the round's sample."""
        out: dict[int, Instruction] = {}
        for node_id in node_ids:
            info = self.nodes.get(node_id)
            if info is None and not self.global_adapter.empty:
                self.journal.append(
                    (logging.WARNING, f"node {node_id} left out of round {server_round}: its rank is unknown")
                )
                continue
            adapter = self.global_adapter.serve(info.rank, info.scaling) if info is not None else None
            out[node_id] = make_instruction(server_round, info, adapter, self.global_adapter.rule.freezes_lora_A)
            if train:
                self.outcome.bytes_down[node_id] = adapter.nbytes if adapter else 0
        if train:
            self.outcome.sampled = list(out)
        return out

    def remember(self, node_id: int, info: NodeInfo, server_round: int) -> bool:
        """Learn (or refresh) what a node said about itself; False (journalled) when it is refused.

        A node's rank and scaling are fixed the first time the coordinator learns them and stay so for the run: a
        node cannot raise its own weight in the aggregate, nor make the coordinator allocate for a rank it chose.
        A rank above ``max-rank`` is never learned. Name and device may change.
        """
        known = self.nodes.get(node_id)
        max_rank = self.limits.max_rank
        if info.rank > max_rank or (known is not None and (known.rank, known.scaling) != (info.rank, info.scaling)):
            fixed = f"it trains at rank {known.rank} (scaling {known.scaling:.4g})" if known else f"max-rank {max_rank}"
            line = f"node {node_id} declares rank {info.rank} (scaling {info.scaling:.4g}), refused: {fixed}"
            self.journal.append((logging.WARNING, line))
            return False
        if known is None:
            self.journal.append(
                (logging.INFO, f"node {node_id} ({info.name}) trains at rank {info.rank} (scaling {info.scaling:.4g})")
            )
        self.nodes[node_id] = info
        self.outcome.nodes_seen.append((node_id, info, server_round))
        return True

    # --- aggregation -------------------------------------------------------------------------------------------------
    def aggregate_train(self, replies: Mapping[int, TrainReply], failed: Sequence[Rejection]) -> bool:
        """Validate the decoded replies, aggregate the valid ones; False when the round is skipped.

        ``failed`` are the nodes whose reply was an error or could not be decoded; a sampled node in neither is
        recorded as ``no-reply``.
        """
        outcome, reliability = self.outcome, self.cfg.reliability
        answered = set(replies) | {n for n, _ in failed}
        rejected = [*failed, *missing_replies(outcome.sampled, answered, reliability.round_timeout)]
        for node_id, reason in rejected:
            self.journal.append((logging.WARNING, f"node {node_id} left out of round {outcome.round}: {reason}"))
        accepted, invalid, _ = accept_updates(replies, self.nodes, self.layout, self.limits)
        for node_id, reason in invalid:
            self.journal.append((logging.WARNING, f"update from node {node_id} rejected: {reason}"))
        outcome.rejected.extend([*rejected, *invalid])
        for node_id, reply in accepted.items():
            self.remember(node_id, reply.node, outcome.round)
            outcome.bytes_up[node_id] = reply.adapter.nbytes
        if len(accepted) < reliability.min_nodes:
            return self.skip(f"only {len(accepted)} valid replies, fewer than min-nodes={reliability.min_nodes}")
        order = sorted(accepted, key=lambda n: (accepted[n].node.name, n))
        ordered = [accepted[n] for n in order]
        robustness = self.cfg.robustness
        weights, notes = aggregation_weights(
            {n: accepted[n].num_examples for n in order}, robustness.weighting, robustness.weight_cap, self.registered
        )
        self.journal.extend((logging.WARNING, line) for line in notes)
        result = self.global_adapter.aggregate(
            ordered,
            self.ranks,
            weights=[weights[n] for n in order],
            num_sampled=len(outcome.sampled),
            num_available=outcome.available,
        )
        if result.note:
            self.journal.append((logging.WARNING, result.note))
        self.journal.extend((logging.WARNING, f"round {outcome.round}: {line}") for line in result.notes)
        outcome.participants = sorted(accepted)
        outcome.aggregation_seconds = result.seconds
        outcome.diagnostics = result.diagnostics
        self._warn_about_the_global()
        self._record_metric("train-loss", ordered)
        node_epsilons = [r.metrics["epsilon"] for r in ordered if "epsilon" in r.metrics]
        outcome.epsilon = result.epsilon if result.epsilon is not None else max(node_epsilons, default=None)
        return True

    def skip(self, reason: str) -> bool:
        """Record that the round keeps the global adapter, and why; returns False."""
        self.outcome.skipped = f"{reason}; global adapter kept"
        self.journal.append((logging.WARNING, f"round {self.outcome.round} skipped: {self.outcome.skipped}"))
        return False

    def install_means(
        self,
        lora: dict[str, tuple[np.ndarray, np.ndarray]],
        head: dict[str, np.ndarray],
        participants: Mapping[int, NodeInfo],
        seconds: float,
    ) -> None:
        """The SecAgg+ train phase's end: the unmasked weighted means become the global adapter."""
        self.global_adapter.load_means(lora, head)
        for node_id, info in participants.items():
            self.remember(node_id, info, self.outcome.round)
        self.outcome.participants = sorted(participants)
        self.outcome.aggregation_seconds = seconds
        self.outcome.diagnostics = self.global_adapter.global_diagnostics(self.ranks)
        self._warn_about_the_global()

    def _warn_about_the_global(self) -> None:
        """Record (and journal) a rank warning for the round's global, if it has one."""
        share = self.cfg.robustness.collapse_warning_share
        self.outcome.warning = rank_warning(self.outcome.diagnostics, self.ranks, share)
        if self.outcome.warning:
            self.journal.append((logging.WARNING, f"round {self.outcome.round}: rank warning: {self.outcome.warning}"))

    def aggregate_evaluate(
        self, server_round: int, replies: Mapping[int, EvaluateReply], answered: Iterable[int]
    ) -> dict[str, float]:
        """The example-weighted eval loss and accuracy; the round is then complete (``answered``: every node whose
        reply came back, decoded or not, the participants of round 0)."""
        counted = [reply for node_id, reply in replies.items() if self.remember(node_id, reply.node, server_round)]
        metrics = {}
        for key in ("eval-loss", "eval-accuracy"):
            metrics.update(self._record_metric(key, counted))
        perplexity = pooled_perplexity(counted)
        if perplexity is not None:
            metrics["eval-perplexity"] = self.outcome.metrics["eval-perplexity"] = perplexity
        if server_round == 0:
            self.outcome.participants = sorted(answered)
        self.outcome.round = server_round
        return metrics

    def evaluate_global(self) -> dict[str, float]:
        """The adapter a user would export now (the largest node rank) on the fixed held-out set, as ``global-*``
        metrics of the round; none without an evaluator."""
        if self.evaluator is None:
            return {}
        started = time.perf_counter()
        rank = self.export_rank
        lora = self.cfg.lora
        metrics = self.evaluator(self.global_adapter.export(rank, lora.lora_alpha, lora.use_rslora), rank)
        self.outcome.metrics.update(metrics)
        self.outcome.global_eval_seconds = time.perf_counter() - started
        return metrics

    @property
    def export_rank(self) -> int:
        """The rank the adapter is exported at: the largest rank a node trains at."""
        return max(self.ranks, default=1)

    def _record_metric(self, key: str, replies: Iterable[TrainReply] | Iterable[EvaluateReply]) -> dict[str, float]:
        value = weighted_metric(replies, key)
        if value is None:
            return {}
        self.outcome.metrics[key] = value
        return {key: value}

    @property
    def ranks(self) -> list[int]:
        """Every rank the coordinator knows a node at (the ranks diagnostics report)."""
        return sorted({info.rank for info in self.nodes.values()})

    @property
    def layout(self) -> Layout | None:
        """What every update must match: the global adapter's modules and head (None before the first aggregate)."""
        adapter = self.global_adapter.adapter
        return None if adapter is None else Layout.from_adapter(adapter)

    def drain(self) -> list[tuple[int, str]]:
        """The journal so far, emptied."""
        lines, self.journal = self.journal, []
        return lines

    # --- state -------------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Global factors and head as arrays; node ranks, sampling RNG and rule as JSON metadata."""
        version, internal, gauss = self.rng.getstate()
        meta = {
            "rule": self.cfg.rule,
            "store-rank": self.global_adapter.store_rank,
            "nodes": {str(n): dataclasses.asdict(info) for n, info in self.nodes.items()},
            "registered-examples": {str(n): count for n, count in self.registered.items()},
            "rng": [version, list(internal), gauss],
            "aggregator": self.global_adapter.extra_state(),
        }
        return self.global_adapter.to_arrays(), meta

    def restore(self, server_round: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Continue after ``server_round`` from a checkpoint written by :meth:`checkpoint_state`."""
        if meta.get("rule") != self.cfg.rule:
            raise ValueError(f"checkpoint was written by rule {meta.get('rule')!r}, this run uses {self.cfg.rule!r}")
        self.global_adapter.load_arrays(arrays)
        self.global_adapter.load_extra_state(meta.get("aggregator", {}))
        self.nodes = {int(n): NodeInfo(**info) for n, info in meta.get("nodes", {}).items()}
        self.registered = {int(n): int(count) for n, count in meta.get("registered-examples", {}).items()}
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.round_offset = server_round
