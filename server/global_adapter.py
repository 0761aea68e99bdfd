"""The coordinator's global adapter: aggregation of one round's replies and re-projection to each node's rank.

The global update of every module is kept in factored form at ``store_rank`` with scaling 1
(ΔW̄ ≈ B_g·A_g). Serving node j is the same rule applied to that single factorisation with target
(r_j, s_j): a truncated SVD for ``svd``, the leading slices for ``fedavg`` and ``ffa``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.aggregation import get_rule
from common.diagnostics import energy_kept, fedavg_error
from common.lora import lora_scaling
from common.updates import AdapterFactors, TrainReply


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

    def aggregate(self, replies: Sequence[TrainReply], diagnose_ranks: Sequence[int]) -> RoundAggregate:
        """Replace the global factors by the rule's aggregate of ``replies`` (weighted by num_examples)."""
        rule = get_rule(self.rule)
        weights = [float(r.num_examples) for r in replies]
        started = time.perf_counter()
        lora = {}
        for module in sorted(replies[0].adapter.lora):
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
        """JSON-safe state besides the arrays (e.g. a privacy accountant) for the checkpoint."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state``."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for a checkpoint."""
        return AdapterFactors(self.lora, self.head).to_state_dict()

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore from ``to_arrays``."""
        adapter = AdapterFactors.from_state_dict(arrays)
        self.lora, self.head = adapter.lora, adapter.head


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()
