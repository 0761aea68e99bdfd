"""The coordinator's global adapter: its factors, and the rule (or central DP around it) that updates and serves them.

The global update of every module is kept in factored form at ``store_rank`` with scaling 1 (ΔW̄ ≈ B_g·A_g, float32)
with the head. Serving node j is the rule applied to that one factorisation with target (r_j, s_j)
(:meth:`common.rules.base.Rule.serve`). A round's aggregate comes from the rule itself, or from
:class:`common.rules.central_dp.CentralDP` wrapping it when the run has ``dp = "central"``; under secure aggregation
the coordinator only ever sees weighted means, and :meth:`GlobalAdapter.load_means` installs them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import RunConfig
from common.diagnostics import served_diagnostics
from common.lora import lora_scaling
from common.rules.base import Rule, to_float32
from common.rules.central_dp import CentralDP
from common.rules.registry import rule_for
from common.updates import AdapterFactors, TrainReply
from server.norm_bound import bounded_replies
from server.server_optimizer import VELOCITY_PREFIX, ServerOptimizer


@dataclass
class RoundAggregate:
    """What one aggregation produced besides the new global factors."""

    seconds: float
    """Time spent aggregating (not counting the diagnostics)."""
    diagnostics: dict[str, dict[str, float]]
    """Per module: energy kept at each rank, and the rule's own diagnostics."""
    epsilon: float | None = None
    """Cumulative ε of central DP after this aggregation (None without central DP)."""
    note: str = ""
    """Why the aggregate was not applied, when it was not (e.g. central DP's budget is spent)."""
    notes: list[str] = field(default_factory=list)
    """What the aggregation did to single nodes: bounded changes, nodes a robust rule left out."""


@dataclass
class GlobalAdapter:
    """Global LoRA factors (scaling 1) and head, plus the rule that aggregates and serves them."""

    rule: Rule
    store_rank: int
    lora: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    head: dict[str, np.ndarray] = field(default_factory=dict)
    central_dp: CentralDP | None = None
    """Client-level DP around the rule (clip, noise, account) when the run has ``dp = "central"``."""
    norm_bound: tuple[str, float] = ("off", 1.0)
    """``norm-bound`` and ``norm-bound-value``: each node's change is bounded before aggregation
    (:func:`server.norm_bound.bounded_replies`)."""
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    """``server-learning-rate`` and ``server-momentum`` on each round's aggregate (:mod:`server.server_optimizer`)."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> GlobalAdapter:
        """The global adapter a run needs: its rule, ``max-rank`` and, under ``dp = "central"``, its DP state."""
        rule = rule_for(cfg)
        central_dp = CentralDP.from_config(cfg) if cfg.privacy.dp == "central" else None
        bound = (cfg.robustness.norm_bound, cfg.robustness.norm_bound_value)
        optimizer = ServerOptimizer(cfg.training.server_learning_rate, cfg.training.server_momentum)
        return cls(rule, cfg.lora.max_rank, central_dp=central_dp, norm_bound=bound, optimizer=optimizer)

    @property
    def empty(self) -> bool:
        """True before the first successful aggregation."""
        return not self.lora

    @property
    def adapter(self) -> AdapterFactors | None:
        """The stored factors and head (None before the first aggregation)."""
        return None if self.empty else AdapterFactors(self.lora, self.head)

    def serve(self, rank: int, scaling: float) -> AdapterFactors | None:
        """This global adapter at ``rank``, split for ``scaling`` (None before the first aggregation)."""
        if self.empty:
            return None
        lora = {}
        for module, (lora_A, lora_B) in self.lora.items():
            a, b = self.rule.serve(lora_A, lora_B, rank, scaling)
            lora[module] = (to_float32(a), to_float32(b))
        return AdapterFactors(lora, dict(self.head))

    def aggregate(
        self,
        replies: Sequence[TrainReply],
        diagnose_ranks: Sequence[int],
        *,
        weights: Sequence[float] | None = None,
        num_sampled: int | None = None,
        num_available: int | None = None,
    ) -> RoundAggregate:
        """Replace the global factors by the round's aggregate of ``replies`` (the rule's, or central DP's around it).

        Under central DP: the noisy uniform mean of the clipped changes over ``num_sampled`` nodes (default: the
        replies), accounted at q = ``num_sampled`` / ``num_available`` (default 1); its diagnostics describe only
        the released global, never one client's update.
        """
        aggregator = self.central_dp or self.rule
        started = time.perf_counter()
        notes: list[str] = []
        if self.norm_bound[0] != "off":
            served = [self.serve(r.node.rank, r.node.scaling) for r in replies]
            replies, notes = bounded_replies(replies, served, self.head or None, *self.norm_bound)
        sampling = {"num_sampled": num_sampled, "num_available": num_available}
        released = aggregator.aggregate_adapter(self.adapter, replies, self.store_rank, weights=weights, **sampling)
        notes += list(self.rule.notes)
        if released is not None:
            released = self._commit(released)
        seconds = time.perf_counter() - started
        if self.central_dp is not None:
            note = "" if released is not None else self.central_dp.last_refusal
            diagnostics = self.global_diagnostics(diagnose_ranks)
            return RoundAggregate(seconds, diagnostics, epsilon=self.central_dp.epsilon, note=note, notes=notes)
        assert released is not None, "a rule without central DP always releases its aggregate"
        diagnostics = self.rule.adapter_diagnostics(released, replies, diagnose_ranks, weights)
        return RoundAggregate(seconds, diagnostics, notes=notes)

    def global_diagnostics(self, ranks: Sequence[int]) -> dict[str, dict[str, float]]:
        """What the stored global keeps when served at each rank (:func:`common.diagnostics.served_diagnostics`):
        what can be reported without any client's update."""
        return served_diagnostics(self.lora, ranks)

    def load_means(self, lora: dict[str, tuple[np.ndarray, np.ndarray]], head: dict[str, np.ndarray]) -> None:
        """Install weighted means computed elsewhere (SecAgg+): per module (Ā, s·B̄) zero-padded to the largest rank.

        For ``fedavg`` these are the rule's two means; for ``ffa`` Ā is the shared frozen lora_A. The rule applied
        to that one factorisation at (``store_rank``, 1) gives what :meth:`aggregate` would have stored.
        """
        stored = {}
        for module, (a_mean, sb_mean) in lora.items():
            a, b = self.rule.serve(a_mean, sb_mean, self.store_rank, 1.0)
            stored[module] = (to_float32(a), to_float32(b))
        self._commit(AdapterFactors(stored, {k: np.asarray(v, dtype=np.float32) for k, v in head.items()}))

    def _commit(self, aggregate: AdapterFactors) -> AdapterFactors:
        """Store the server optimizer's step on ``aggregate`` (the aggregate itself by default) and return it,
        refusing non-finite values (the previous global adapter and momentum are then kept)."""
        _check_finite(aggregate)
        saved = dict(self.optimizer.velocity), dict(self.optimizer.head_velocity)
        try:
            stored = self.optimizer.step(self.adapter, aggregate, self.store_rank)
            _check_finite(stored)
        except (FloatingPointError, ValueError):
            self.optimizer.velocity, self.optimizer.head_velocity = saved
            raise
        self.lora, self.head = stored.lora, stored.head
        return stored

    def export(self, rank: int, lora_alpha: float, use_rslora: bool) -> AdapterFactors | None:
        """The global adapter at ``rank`` with peft's scaling for that rank (what a PEFT folder stores)."""
        return self.serve(rank, lora_scaling(lora_alpha, rank, use_rslora))

    def extra_state(self) -> dict[str, Any]:
        """JSON-safe state besides the arrays for the checkpoint: the central-DP accountant, if any."""
        return {} if self.central_dp is None else {"central-dp": self.central_dp.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state``; a checkpoint's accountant needs a run with central DP, and vice versa."""
        saved = state.get("central-dp")
        if (saved is None) != (self.central_dp is None):
            raise ValueError(
                "checkpoint and run disagree about central DP: "
                f"checkpoint {'has' if saved is not None else 'has no'} accountant, run has "
                f"dp={'central' if self.central_dp is not None else 'off or local'}; resume with the run's own config"
            )
        if self.central_dp is not None and saved is not None:
            self.central_dp.load_state(saved)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for a checkpoint (with the server optimizer's momentum, if any)."""
        return AdapterFactors(self.lora, self.head).to_state_dict() | self.optimizer.to_arrays()

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore from ``to_arrays``."""
        self.optimizer.load_arrays(arrays)
        adapter = AdapterFactors.from_state_dict({k: v for k, v in arrays.items() if not k.startswith(VELOCITY_PREFIX)})
        self.lora, self.head = adapter.lora, adapter.head


def _check_finite(adapter: AdapterFactors) -> None:
    """Raise ``FloatingPointError`` if any array of ``adapter`` has a NaN or an infinity."""
    arrays = [x for pair in adapter.lora.values() for x in pair] + list(adapter.head.values())
    if not all(np.isfinite(x).all() for x in arrays):
        raise FloatingPointError("the aggregate has non-finite entries; the global adapter is kept")
