"""Secure aggregation with Flower's SecAgg+ for the linear rules (``fedavg``, ``ffa``): the coordinator's side.

SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS, ePrint
2020/704), built on SecAgg (Bonawitz et al. 2017, CCS, ePrint 2017/281): nodes mask their quantised vectors with
pairwise and private masks whose seeds are Shamir-shared with their neighbours; the coordinator can remove the masks
only of the sum, even when some nodes drop out. Flower 1.42 has it only as a legacy workflow
(``SecAggPlusWorkflow`` over a ``LegacyContext`` and a legacy ``Strategy``). Everything else of a fedlora round stays
on the Message API through :class:`server.strategy.LoRAStrategy`; only the train phase runs through the workflow:

1. ``LoRAStrategy.configure_train`` samples nodes and builds each one's instruction (the global adapter at its
   rank); the round's padding rank R (the largest sampled rank) is added.
2. The workflow's four stages run (setup, share keys, collect masked vectors, unmask). In the third, each node
   trains and sends its zero-padded summands masked (:mod:`client.secure`).
3. :class:`SecureRound` receives the unmasked weighted means with each node's clear metadata, and
   :meth:`GlobalAdapter.load_means` installs them: the ``fedavg``/``ffa`` aggregate, up to quantisation.
4. ``LoRAStrategy.configure_evaluate``/``aggregate_evaluate`` evaluate, record and checkpoint the round as usual.

What the coordinator can no longer do: validate, reject or clip one update (it never sees one: a malformed or
poisoned update goes into the sum), or compute per-client diagnostics (only those of the new global are recorded).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from common.codec import records
from common.codec.secure_records import SecureReply, decode_fit_res, decode_means, with_pad_rank
from common.config import RunConfig
from common.rules.base import Rule
from common.secure_sum import means_from_sums
from common.updates import weighted_metric
from server.engine import GlobalEvaluation
from server.lifecycle import close_run, open_run
from server.secure_grid import RecordingGrid
from server.strategy import LoRAStrategy


class SecureRound(Strategy):
    """The legacy strategy the workflow calls for one round: it names the nodes and keeps what comes back."""

    def __init__(self, node_ids: list[int], grid: Grid) -> None:
        self.node_ids = node_ids
        self.grid = grid
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The sampled nodes (their instructions are the fedlora ones, set by :class:`LoRASecAggPlus`)."""
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), FitIns(parameters, {})) for n in self.node_ids]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the results (each FitRes holds the unmasked mean); the global adapter is updated by the caller."""
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Nothing: the global adapter lives in :class:`LoRAStrategy`."""
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Nothing: evaluation stays on the Message API."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Nothing: evaluation stays on the Message API."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No central evaluation."""
        return None


class LoRASecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow whose third stage carries each node's own fedlora instruction."""

    def __init__(self, instructions: Mapping[int, RecordDict], cfg: RunConfig) -> None:
        super().__init__(
            num_shares=_share_setting(cfg.secagg.num_shares),
            reconstruction_threshold=_share_setting(cfg.secagg.reconstruction_threshold),
            max_weight=cfg.secagg.max_weight,
            clipping_range=cfg.secagg.clipping_range,
            quantization_range=cfg.secagg.quantization_range,
            modulus_range=cfg.secagg.modulus_range,
            timeout=cfg.reliability.round_timeout,
        )
        self.instructions = instructions
        self.unmask_seconds = 0.0
        """Time the coordinator spent removing the masks (the aggregation proper)."""

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup, then swap the legacy FitIns for the per-node instructions (sent in the third stage)."""
        proceed = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.instructions[nid] for nid in state.nid_to_fitins}
        return bool(proceed)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's unmask stage, timed."""
        started = time.perf_counter()
        try:
            return bool(super().unmask_stage(grid, context, state))
        finally:
            self.unmask_seconds = time.perf_counter() - started


def _share_setting(value: float) -> int | float:
    """Flower reads a float as a fraction and an int as a count."""
    return int(value) if value > 1 else float(value)


def run_secure(grid: Grid, context: Context, cfg: RunConfig, evaluator: GlobalEvaluation | None = None) -> None:
    """The whole run with SecAgg+ train rounds: round 0 evaluation (or resume), the rounds, the exported adapter."""
    strategy, recorder = open_run(grid, context, cfg, evaluator)
    try:
        for server_round in range(1, cfg.num_rounds - strategy.engine.round_offset + 1):
            secure_train_round(grid, context, cfg, strategy, server_round)
            evaluate = strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
            replies = grid.send_and_receive(evaluate, timeout=cfg.reliability.round_timeout)
            strategy.aggregate_evaluate(server_round, replies)
    except BaseException as err:
        recorder.finish(None, 0, status="failed", reason=f"{type(err).__name__}: {err}")
        raise
    close_run(strategy, recorder, cfg)


def secure_train_round(grid: Grid, context: Context, cfg: RunConfig, strategy: LoRAStrategy, server_round: int) -> None:
    """One train phase through SecAgg+; the engine's round outcome is filled as the Message API path fills it."""
    engine = strategy.engine
    messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
    node_ids = [int(m.metadata.dst_node_id) for m in messages]
    pad_rank = max((engine.nodes[n].rank if n in engine.nodes else cfg.lora.max_rank for n in node_ids), default=1)
    instructions = {n: with_pad_rank(m.content, pad_rank) for n, m in zip(node_ids, messages, strict=True)}
    round_strategy = SecureRound(node_ids, grid)
    recording = RecordingGrid(grid)
    workflow = LoRASecAggPlus(instructions, cfg)
    workflow(recording, _legacy_context(context, cfg, round_strategy, engine.outcome.round))
    started = time.perf_counter()
    results = round_strategy.results or []
    replies: dict[int, SecureReply] = {}
    for proxy, fit_res in results:
        try:
            replies[int(proxy.node_id)] = decode_fit_res(fit_res, cfg.lora.max_rank)
        except records.RecordError as err:
            recording.errors[int(proxy.node_id)] = f"malformed SecAgg+ metadata: {err}"
    outcome = engine.outcome
    outcome.rejected.extend(
        (n, recording.errors.get(n, "dropped out of SecAgg+ (no reply within round-timeout)"))
        for n in node_ids
        if n not in replies
    )
    reason = _skip_reason(results, replies, cfg)
    means = None
    if reason is None:
        means, reason = _means(results[0][1].parameters, replies, engine.global_adapter.rule)
    if means is None:
        engine.skip(reason or "the secure aggregate cannot be used")
        strategy.flush_log()
        return
    try:
        engine.install_means(*means, {n: r.node for n, r in replies.items()}, workflow.unmask_seconds)
    except (ValueError, FloatingPointError) as err:
        engine.skip(f"the secure aggregate cannot be used: {err}")
        strategy.flush_log()
        return
    outcome.aggregation_seconds += time.perf_counter() - started
    outcome.bytes_up = {n: b for n, b in recording.masked_bytes.items() if n in replies}
    train_loss = weighted_metric(replies.values(), "train-loss")
    if train_loss is not None:
        outcome.metrics["train-loss"] = train_loss
    outcome.epsilon = max((r.metrics["epsilon"] for r in replies.values() if "epsilon" in r.metrics), default=None)
    strategy.flush_log()


def _skip_reason(
    results: list[tuple[ClientProxy, FitRes]], replies: Mapping[int, SecureReply], cfg: RunConfig
) -> str | None:
    """Why the round's sum cannot be used, or None."""
    if not results:
        return "secure aggregation did not complete (too few nodes answered at some stage)"
    if len(replies) < len(results):
        return "a node's clear metadata was malformed and the sum cannot be split"
    if len(replies) < cfg.reliability.min_nodes:
        return f"only {len(replies)} nodes in the secure sum, fewer than min-nodes={cfg.reliability.min_nodes}"
    if len({tuple(r.summand_keys) for r in replies.values()}) != 1:
        return "nodes disagree on the summand layout"
    return None


def _means(
    parameters: Parameters, replies: Mapping[int, SecureReply], rule: Rule
) -> tuple[tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]] | None, str | None]:
    """The unmasked means split per module and head, or None and why they cannot be used."""
    keys = next(iter(replies.values())).summand_keys
    try:
        return means_from_sums(keys, decode_means(parameters), rule), None
    except ValueError as err:
        return None, f"the secure aggregate cannot be used: {err}"


def _legacy_context(context: Context, cfg: RunConfig, strategy: SecureRound, server_round: int) -> LegacyContext:
    """A LegacyContext of its own (the workflow writes into its state), at ``server_round``."""
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    base = Context(context.run_id, context.node_id, context.node_config, state, context.run_config)
    return LegacyContext(
        base, ServerConfig(num_rounds=cfg.num_rounds, round_timeout=cfg.reliability.round_timeout), strategy
    )
