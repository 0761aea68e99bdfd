"""The coordinator's global adapter: aggregation of one round's replies and re-projection to each node's rank.

The global update of every module is kept in factored form at ``store_rank`` with scaling 1
(ΔW̄ ≈ B_g·A_g). Serving node j is the same rule applied to that single factorisation with target
(r_j, s_j): a truncated SVD for ``svd``, the leading slices for ``fedavg`` and ``ffa``.

With central DP (:mod:`server.central_dp`) the aggregate is DP-FedAvg over the clients' round changes, with uniform
weights, and ε is reported with every aggregate. Under secure aggregation (:mod:`server.secure`) the coordinator
only ever sees the weighted means, and :meth:`GlobalAdapter.load_means` installs them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.aggregation import get_rule
from common.config import RunConfig
from common.diagnostics import energy_kept, fedavg_error
from common.lora import lora_scaling
from common.updates import AdapterFactors, TrainReply
from server.central_dp import CentralDP


@dataclass
class RoundAggregate:
    """What one aggregation produced besides the new global factors."""

    seconds: float
    diagnostics: dict[str, dict[str, float]]
    epsilon: float | None = None
    """Cumulative ε of central DP after this aggregation (None without central DP)."""


@dataclass
class GlobalAdapter:
    """Global LoRA factors (scaling 1) and head, plus the rule that aggregates and serves them."""

    rule: str
    store_rank: int
    lora: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    head: dict[str, np.ndarray] = field(default_factory=dict)
    central_dp: CentralDP | None = None
    """Client-level DP (clip, noise, account) when the run has ``dp = "central"``."""
    keep_residual: bool = False
    """``svd``: add back to each node's term what serving it at its rank cut from the global (``keep-residual``)."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> GlobalAdapter:
        """The global adapter a run needs: ``rule``, ``max-rank`` and, under ``dp = "central"``, its DP state."""
        central_dp = CentralDP.from_config(cfg) if cfg.dp == "central" else None
        return cls(cfg.rule, cfg.max_rank, central_dp=central_dp, keep_residual=cfg.keep_residual)

    @property
    def empty(self) -> bool:
        """True before the first successful aggregation."""
        return not self.lora

    def serve(self, rank: int, scaling: float) -> AdapterFactors | None:
        """This global adapter at ``rank``, split for ``scaling`` (None before the first aggregation)."""
        if self.empty:
            return None
        rule = get_rule(self.rule)
        lora = {}
        for module, (lora_A, lora_B) in self.lora.items():
            ((a, b),) = rule([(lora_A, lora_B, 1.0)], [1.0], [(rank, scaling)])
            lora[module] = (_f32(a), _f32(b))
        return AdapterFactors(lora, dict(self.head))

    def aggregate(
        self,
        replies: Sequence[TrainReply],
        diagnose_ranks: Sequence[int],
        *,
        num_sampled: int | None = None,
        num_available: int | None = None,
    ) -> RoundAggregate:
        """Replace the global factors by the rule's aggregate of ``replies`` (weighted by num_examples).

        Under central DP: the noisy uniform mean of the clipped changes over ``num_sampled`` nodes (default: the
        replies), accounted at q = ``num_sampled`` / ``num_available`` (default 1).
        """
        if self.central_dp is not None:
            return self._aggregate_private(self.central_dp, replies, diagnose_ranks, num_sampled, num_available)
        rule = get_rule(self.rule)
        weights = [float(r.num_examples) for r in replies]
        started = time.perf_counter()
        lora = {}
        keeps_residual = self.keep_residual and self.rule == "svd" and not self.empty
        served = self._served(replies) if keeps_residual else None
        for module in sorted(replies[0].adapter.lora):
            if served is not None:
                a, b = self._aggregate_keeping_residual(module, replies, weights, served)
            else:
                clients = [(*r.adapter.lora[module], r.node.scaling) for r in replies]
                ((a, b),) = rule(clients, weights, [(self.store_rank, 1.0)])
            lora[module] = (_f32(a), _f32(b))
        head = {
            key: np.average(np.stack([r.adapter.head[key] for r in replies]), axis=0, weights=weights).astype(
                np.float32
            )
            for key in replies[0].adapter.head
        }
        seconds = time.perf_counter() - started
        diagnostics = self._diagnostics(replies, weights, diagnose_ranks)
        self.lora, self.head = lora, head
        return RoundAggregate(seconds, diagnostics)

    def _served(self, replies: Sequence[TrainReply]) -> dict[tuple[int, float], AdapterFactors]:
        """What each replying node was served this round, by (rank, scaling), re-served from the global."""
        served = {}
        for reply in replies:
            key = (reply.node.rank, reply.node.scaling)
            if key not in served:
                sent = self.serve(*key)
                assert sent is not None, "only called once the global adapter holds an aggregate"
                served[key] = sent
        return served

    def _aggregate_keeping_residual(
        self,
        module: str,
        replies: Sequence[TrainReply],
        weights: Sequence[float],
        served: dict[tuple[int, float], AdapterFactors],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FlexLoRA's average with each node's term completed by what its rank could not hold.

        Plain ``svd`` (Bai et al. 2024, arXiv 2402.11505) averages the products, ΔW̄ = Σ p_i s_i B_i A_i. A node at
        rank r_i was served T_i = the rank-r_i truncation of the global G, so even a node that changed nothing sends
        back T_i, and every round the directions of G beyond the low ranks lose the low-rank nodes' share of the
        weight. Here each term is completed by the residual the coordinator withheld when serving it:
        ΔW̄ = Σ p_i (s_i B_i A_i + G − T_i) = G + Σ p_i (s_i B_i A_i − T_i), which equals plain ``svd`` when every
        node holds G at its rank. The result is truncated at ``store_rank`` by the same factored SVD, from factors
        only (T_i is re-served from G: the coordinator keeps no copy of what it sent).
        """
        total = float(sum(weights))
        a_g, b_g = self.lora[module]
        terms: list[tuple[Any, Any, float]] = [(a_g, b_g, 1.0)]
        term_weights = [1.0]
        for reply, weight in zip(replies, weights, strict=True):
            a_s, b_s = served[(reply.node.rank, reply.node.scaling)].lora[module]
            terms += [(*reply.adapter.lora[module], reply.node.scaling), (a_s, -b_s, reply.node.scaling)]
            term_weights += [weight / total, weight / total]
        ((a, b),) = get_rule("svd")(terms, term_weights, [(self.store_rank, 1.0)])
        return a, b * sum(term_weights)  # the rule normalises the weights to sum to 1 (here they sum to 3)

    def _aggregate_private(
        self,
        dp: CentralDP,
        replies: Sequence[TrainReply],
        ranks: Sequence[int],
        num_sampled: int | None,
        num_available: int | None,
    ) -> RoundAggregate:
        """Central DP aggregate; diagnostics only of the released (noisy) global, never of a client's update."""
        started = time.perf_counter()
        m = num_sampled or len(replies)
        released = dp.aggregate(self.rule, (self.lora, self.head), replies, self.store_rank, m, num_available)
        if released is not None:
            lora, head = released
            self._commit({m: (_f32(a), _f32(b)) for m, (a, b) in lora.items()}, {k: _f32(v) for k, v in head.items()})
        seconds = time.perf_counter() - started
        return RoundAggregate(seconds, self.global_diagnostics(ranks), epsilon=dp.epsilon)

    def global_diagnostics(self, ranks: Sequence[int]) -> dict[str, dict[str, float]]:
        """Energy kept at each rank by the global adapter itself: what can be reported without any client's update."""
        return {
            module: {
                f"energy_kept_r{r}": k for r, k in zip(ranks, energy_kept([(a, b, 1.0)], [1.0], ranks), strict=True)
            }
            for module, (a, b) in self.lora.items()
        }

    def load_means(self, lora: dict[str, tuple[np.ndarray, np.ndarray]], head: dict[str, np.ndarray]) -> None:
        """Install weighted means computed elsewhere (SecAgg+): per module (Ā, s·B̄) zero-padded to the largest rank.

        For ``fedavg`` these are the rule's two means; for ``ffa`` Ā is the shared frozen lora_A. The rule applied
        to that one factorisation at (``store_rank``, 1) gives what :meth:`aggregate` would have stored.
        """
        rule = get_rule(self.rule)
        stored = {}
        for module, (a_mean, sb_mean) in lora.items():
            ((a, b),) = rule([(a_mean, sb_mean, 1.0)], [1.0], [(self.store_rank, 1.0)])
            stored[module] = (_f32(a), _f32(b))
        self._commit(stored, {k: np.asarray(v, dtype=np.float32) for k, v in head.items()})

    def _commit(self, lora: dict[str, tuple[np.ndarray, np.ndarray]], head: dict[str, np.ndarray]) -> None:
        """Replace the global adapter, refusing non-finite values (the previous one is kept)."""
        arrays = [x for pair in lora.values() for x in pair] + list(head.values())
        if not all(np.isfinite(x).all() for x in arrays):
            raise FloatingPointError("the aggregate has non-finite entries; the global adapter is kept")
        self.lora, self.head = lora, head

    def _diagnostics(
        self, replies: Sequence[TrainReply], weights: Sequence[float], ranks: Sequence[int]
    ) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for module in sorted(replies[0].adapter.lora):
            clients = [(*r.adapter.lora[module], r.node.scaling) for r in replies]
            kept = energy_kept(clients, weights, ranks)
            row = {f"energy_kept_r{r}": k for r, k in zip(ranks, kept, strict=True)}
            if self.rule == "fedavg":
                row["fedavg_error"] = fedavg_error(clients, weights)
            out[module] = row
        return out

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
        """Flat arrays for a checkpoint."""
        return AdapterFactors(self.lora, self.head).to_state_dict()

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore from ``to_arrays``."""
        adapter = AdapterFactors.from_state_dict(arrays)
        self.lora, self.head = adapter.lora, adapter.head


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()
