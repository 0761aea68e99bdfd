"""What every aggregation rule is: one object that aggregates, serves, and says what privacy and SecAgg need of it.

A rule works on one target module at a time, from the factors (:mod:`common.rules.factors` states the conventions),
and never builds an out × in matrix unless its docstring says so. The coordinator keeps the global update of each
module in factored form at a store rank with scaling 1 (ΔW̄ ≈ B_g·A_g); everything it needs from a rule is here:

- :meth:`Rule.aggregate`: the paper's rule, clients' factors → one ``(lora_A, lora_B)`` per ``(rank, scaling)``;
- :meth:`Rule.serve`: the global update at a node's rank and scaling (the rule applied to one factorisation);
- :meth:`Rule.aggregate_module`: one round's new global of a module (the previous global is there for rules that
  keep state across rounds, such as svd's ``keep-residual``);
- :attr:`Rule.linear`, :attr:`Rule.secure_parts`, :meth:`Rule.from_secure_means`: whether secure aggregation can
  compute the rule (it reveals only sums) and from which per-client summands;
- :attr:`Rule.freezes_lora_A`: whether nodes train lora_B only;
- the client-level DP hooks (:meth:`Rule.change` … :meth:`Rule.private_update`), through which
  :class:`common.rules.central_dp.CentralDP` wraps any rule, as Flower's ``DifferentialPrivacyServerSideFixedClipping``
  wraps a strategy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeAlias

import numpy as np
import torch

from common.diagnostics import served_diagnostics
from common.dp import add_gaussian_noise, gaussian_noise_std
from common.lora import ArrayLike, ClientFactors, TargetSpec, Tensor, seeded_lora_a
from common.rules.factors import FactorPair
from common.updates import AdapterFactors, TrainReply


class RuleSettings(Protocol):
    """What a rule reads from a run's config (:class:`common.config.RunConfig` has it)."""

    @property
    def rule(self) -> str: ...
    @property
    def keep_residual(self) -> bool: ...
    @property
    def robustness(self) -> Any: ...


Change: TypeAlias = tuple[Tensor, Tensor, float]
"""One module's change in a round as a rule's client triple ``(lora_A, lora_B, scaling)``, in float64 tensors."""

CLIP_RTOL = 1e-4
"""Relative slack when checking that a contribution is within C (float32 rounding of an already clipped update)."""


@dataclass(frozen=True)
class GaussianMechanism:
    """Noise N(0, (z·C/m)²) on a mean of m contributions each within C (DP-FedAvg, arXiv 1710.06963)."""

    noise_multiplier: float
    """z."""
    clip_norm: float
    """C, the bound on each contribution's norm."""
    num_clients: int
    """m, the public denominator of the mean (the nodes asked, not those that answered)."""
    generator: torch.Generator
    """Where the noise comes from (:func:`common.dp.make_generator`)."""

    @property
    def std(self) -> float:
        """σ = z·C/m."""
        return gaussian_noise_std(self.noise_multiplier, self.clip_norm, self.num_clients)

    def noisy(self, tensor: Tensor) -> Tensor:
        """``tensor`` + N(0, σ²) entrywise."""
        return add_gaussian_noise(tensor, self.std, self.generator)

    def uniform_weights(self, count: int, like: Tensor) -> Tensor:
        """The weights 1/m of ``count`` contributions (m ≥ count: a node that failed counts as a zero update)."""
        m = self.num_clients
        if isinstance(m, bool) or int(m) != m or m < count:
            raise ValueError(
                f"num_clients (the public denominator m) must be an integer >= the {count} contributions, got {m}"
            )
        return torch.full((count,), 1.0 / m, dtype=like.dtype, device=like.device)

    def check_within(self, norms: Sequence[float], what: str) -> None:
        """Refuse a contribution above C: the noise would not cover it (a necessary check; the caller clips)."""
        for i, norm in enumerate(norms):
            if norm > self.clip_norm * (1.0 + CLIP_RTOL):
                raise ValueError(
                    f"client {i}: ‖{what}‖ = {norm:.6g} exceeds clip_norm C = {self.clip_norm:.6g}; clip each "
                    "client's update before the DP aggregate, or the noise does not cover it"
                )


@dataclass(frozen=True)
class SeededInit:
    """The nodes' shared lora_A init (a public seeded draw, :func:`common.lora.seeded_lora_a`)."""

    seed: int
    max_rank: int

    def lora_A(self, module: str, rank: int, in_features: int) -> np.ndarray:
        """Rows ``:rank`` of the module's (max_rank × in) draw."""
        return seeded_lora_a(self.seed, module, rank, in_features, self.max_rank)


class Rule(ABC):
    """An aggregation rule for heterogeneous-rank LoRA (subclasses cite their paper and state the formula)."""

    name: ClassVar[str]
    """The name a config uses (``rule = "svd"``)."""
    linear: ClassVar[bool] = False
    """The aggregate is a sum of per-client terms, so secure aggregation (which reveals only sums) can compute it."""
    secure_parts: ClassVar[tuple[str, ...]] = ()
    """The per-module summands a node feeds into secure aggregation (``A``, ``s·B``, ``rows``; empty if none)."""
    notes: tuple[str, ...] = ()
    """Lines about single nodes from the last :meth:`aggregate_adapter` (a robust rule's exclusions); empty unless a
    rule sets them."""
    freezes_lora_A: ClassVar[bool] = False
    """Nodes keep lora_A at the shared seeded init and train lora_B only."""
    supports_central_dp: ClassVar[bool] = True
    """:class:`common.rules.central_dp.CentralDP` can wrap the rule (its hooks release a uniform mean of changes)."""
    stores_product: ClassVar[bool] = True
    """The stored global means its product B·A only, whatever the factorisation, so the coordinator may re-factorise
    it (a server optimizer, :mod:`server.server_optimizer`); False for rules that average the factors themselves."""

    @classmethod
    def from_config(cls, cfg: RuleSettings) -> Rule:
        """The rule with the settings of a run (none, unless a rule overrides this)."""
        return cls()

    # --- aggregation ----------------------------------------------------------------------------------------------
    @abstractmethod
    def aggregate(
        self, clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
    ) -> list[FactorPair]:
        """Aggregate one module's client factors (weights normalised inside) into one pair per target."""

    def serve(self, lora_A: ArrayLike, lora_B: ArrayLike, rank: int, scaling: float) -> FactorPair:
        """The global update B·A (scaling 1) as this rule hands it to a node at ``rank`` and ``scaling``."""
        ((a, b),) = self.aggregate([(lora_A, lora_B, 1.0)], [1.0], [(rank, scaling)])
        return a, b

    def aggregate_module(
        self,
        clients: Sequence[ClientFactors],
        weights: Sequence[float],
        store_rank: int,
        previous: tuple[np.ndarray, np.ndarray] | None,
    ) -> FactorPair:
        """One round's new global of one module at ``store_rank``, scaling 1; ``previous`` is the global before it
        (None before the first aggregation), unused unless the rule keeps state across rounds."""
        ((a, b),) = self.aggregate(clients, weights, [(store_rank, 1.0)])
        return a, b

    def diagnostics(self, clients: Sequence[ClientFactors], weights: Sequence[float]) -> dict[str, float]:
        """Rule-specific diagnostics of one module's round (none unless a rule adds some)."""
        return {}

    # --- a whole adapter (every module and the head) ----------------------------------------------------------------
    def aggregate_adapter(
        self,
        previous: AdapterFactors | None,
        replies: Sequence[TrainReply],
        store_rank: int,
        *,
        weights: Sequence[float] | None = None,
        num_sampled: int | None = None,
        num_available: int | None = None,
    ) -> AdapterFactors | None:
        """One round's new global adapter from validated replies, weighted by ``weights`` (default: their example
        counts; the coordinator passes :func:`server.weighting.aggregation_weights`).

        Every module through :meth:`aggregate_module` (float32, at ``store_rank``, scaling 1); every head tensor by
        the weighted mean (the head is new, not a base weight, and federated with plain FedAvg).
        ``num_sampled`` and ``num_available`` matter only to wrappers that account for sampling (central DP).
        """
        weights = reply_weights(replies, weights)
        lora = {}
        for module in sorted(replies[0].adapter.lora):
            clients = [(*r.adapter.lora[module], r.node.scaling) for r in replies]
            before = previous.lora[module] if previous is not None else None
            a, b = self.aggregate_module(clients, weights, store_rank, before)
            lora[module] = (to_float32(a), to_float32(b))
        head = {
            key: np.average(np.stack([r.adapter.head[key] for r in replies]), axis=0, weights=weights).astype(
                np.float32
            )
            for key in replies[0].adapter.head
        }
        return AdapterFactors(lora, head)

    def adapter_diagnostics(
        self,
        released: AdapterFactors,
        replies: Sequence[TrainReply],
        ranks: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Per module: what the stored global keeps when served at each rank (:func:`served_diagnostics`) and the
        rule's own diagnostics of the replies' factors."""
        weights = reply_weights(replies, weights)
        out = served_diagnostics(released.lora, ranks)
        for module in sorted(replies[0].adapter.lora):
            clients = [(*r.adapter.lora[module], r.node.scaling) for r in replies]
            out.setdefault(module, {}).update(self.diagnostics(clients, weights))
        return out

    # --- secure aggregation ---------------------------------------------------------------------------------------
    def from_secure_means(self, means: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One module's (Ā, s·B̄) from the weighted means of its :attr:`secure_parts` (linear rules only)."""
        raise ValueError(
            f"rule {self.name!r} cannot be aggregated securely: secure aggregation reveals only a sum, and "
            f"{self.name!r} is not a sum of per-client terms"
        )

    # --- client-level DP (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963) ----------------------------------------
    def public_start(
        self, module: str, out_features: int, in_features: int, store_rank: int, init: SeededInit
    ) -> FactorPair:
        """What every node trains from before the first aggregation (float64): lora_B = 0, and lora_A zero unless the
        rule releases lora_A itself (then the shared seeded init)."""
        zeros_a = torch.zeros(store_rank, in_features, dtype=torch.float64)
        return zeros_a, torch.zeros(out_features, store_rank, dtype=torch.float64)

    @abstractmethod
    def change(self, new: FactorPair, served: FactorPair, scaling: float) -> Change:
        """A node's change in a round, as a client triple of this rule: what it sent minus what it was served."""

    @abstractmethod
    def released_sq_norm(self, change: Change) -> float:
        """‖·‖² of what this rule releases a mean of, for one module's change (the clipping norm's share)."""

    def clip_change(self, change: Change, factor: float) -> Change:
        """``change`` scaled by the clipping factor min(1, C/‖Δ‖) in what the rule releases.

        By default lora_B alone is scaled: then s·B·A scales by the factor (scaling both factors would square it),
        and a lora_A that is public (``ffa``'s shared init) is left as it is. A rule that releases both factors
        (``fedavg``) scales both.
        """
        lora_A, lora_B, scaling = change
        return lora_A, lora_B * factor, scaling

    @abstractmethod
    def private_update(
        self, previous: FactorPair, changes: Sequence[Change], mechanism: GaussianMechanism, store_rank: int
    ) -> FactorPair:
        """Previous global + the noisy mean of the clipped ``changes`` (noise on everything released), at
        ``store_rank``, scaling 1. Everything after the noise is post-processing."""


def reply_weights(replies: Sequence[TrainReply], weights: Sequence[float] | None) -> list[float]:
    """``weights`` as floats, one per reply (default: the replies' example counts)."""
    if weights is None:
        return [float(r.num_examples) for r in replies]
    if len(weights) != len(replies):
        raise ValueError(f"got {len(weights)} weights for {len(replies)} replies; need one weight per reply")
    return [float(w) for w in weights]


def to_float32(t: Tensor | np.ndarray) -> np.ndarray:
    """A tensor or array as a float32 numpy array on the CPU (how the global adapter is stored and sent)."""
    if isinstance(t, np.ndarray):
        return t.astype(np.float32)
    return t.detach().cpu().to(torch.float32).numpy()
