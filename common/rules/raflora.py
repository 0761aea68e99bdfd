"""``raflora``: rank-partitioned FlexLoRA, each rank partition averaged over the clients that hold it.

Wu, Hu, Min, Wang 2026, "Preventing Rank Collapse in Federated Low-Rank Adaptation with Client Heterogeneity",
arXiv 2602.13486. FlexLoRA (``svd``) averages whole products, Σ p_i s_i B_i A_i, so a direction beyond rank r is
averaged over every client while only the clients of rank > r contribute to it: its weight is Σ_{j: r_j > r} p_j < 1
every round, and the energy of the global update piles into the smallest shared rank ("rank collapse"). raFLoRA cuts
each local update into rank partitions and averages every partition over the clients that contribute to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from common.lora import ClientFactors, LoRAFactors, TargetSpec, Tensor
from common.rules.base import Change, GaussianMechanism, RuleSettings
from common.rules.factored_svd import factored_svd, split_balanced
from common.rules.factors import FactorPair, check_clients, check_targets
from common.rules.registry import central_dp_refusal
from common.rules.svd import SVD


def component_weights(ranks: Sequence[int], p: Tensor) -> list[Tensor]:
    """w_{i,c} = p_i / Σ_{j: r_j > c} p_j for every component c < r_i of every client i (0 where that sum is 0).

    With the distinct ranks r_(1) < … < r_(K), component c lies in partition k when r_(k−1) ≤ c < r_(k), and the
    clients with r_j > c are exactly those holding partition k: each partition's weights sum to 1.
    """
    top = max(ranks)
    holders = torch.zeros(top, dtype=p.dtype, device=p.device)  # Σ_{j: r_j > c} p_j for c = 0 … top − 1
    for rank, p_i in zip(ranks, p, strict=True):
        holders[:rank] += p_i
    safe = torch.where(holders > 0, holders, torch.ones_like(holders))
    return [
        torch.where(holders[:rank] > 0, p_i / safe[:rank], torch.zeros_like(safe[:rank]))
        for rank, p_i in zip(ranks, p, strict=True)
    ]


def stack_partitioned(factors: Sequence[LoRAFactors], p: Tensor) -> tuple[Tensor, Tensor]:
    """B_cat = [U_1 diag(w_1 ∘ σ_1) | …] and A_cat = [V_1ᵀ; …], so that B_cat @ A_cat is raFLoRA's ΔW̄.

    Each client's components come from the SVD of its own product s_i B_i A_i (:func:`factored_svd` of the factors).
    """
    weights = component_weights([f.r for f in factors], p)
    columns, rows = [], []
    for f, w in zip(factors, weights, strict=True):
        own = factored_svd(f.scaling * f.lora_B, f.lora_A)  # U (out × k), S, V (in × k), k = min(r_i, out, in)
        k = own.U.shape[1]
        columns.append(own.U * (w[:k] * own.S[:k]))
        rows.append(own.V.T)
    return torch.cat(columns, dim=1), torch.cat(rows, dim=0)


def raflora_reproject(
    clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
) -> list[FactorPair]:
    """raFLoRA's aggregate, each target served its best rank-r_j approximation (as FlexLoRA serves).

    ΔW̄ = Σ_i Σ_{c < r_i} w_{i,c} σ_{i,c} u_{i,c} v_{i,c}ᵀ, w_{i,c} = p_i / Σ_{j: r_j > c} p_j, where
    s_i B_i A_i = Σ_c σ_{i,c} u_{i,c} v_{i,c}ᵀ is client i's update in its own singular components.
    """
    checked = check_targets(targets)
    factors, p = check_clients(clients, weights)
    svd = factored_svd(*stack_partitioned(factors, p), rank=max((rank for rank, _ in checked), default=0))
    return [split_balanced(svd, rank, scaling) for rank, scaling in checked]


class RaFLoRA(SVD):
    """raFLoRA (arXiv 2602.13486): ΔW̄ = Σ_k Σ_{i: r_i ≥ r_(k)} (p_i / Σ_{j: r_j ≥ r_(k)} p_j) · P_k(s_i B_i A_i).

    P_k(X) is the part of X in rank partition k, its singular components r_(k−1) … r_(k) − 1, for the distinct
    client ranks r_(1) < … < r_(K) of the round (r_(0) = 0). Node j is then served the best rank-r_j approximation
    of ΔW̄, as in FlexLoRA.

    Two choices the formula leaves open, and the ones taken:

    - *The components of a local update* are its own singular components (SVD of s_i B_i A_i from the factors), not
      the columns of B_i as sent: a node's factorisation is its own choice (B Q, Q⁻¹ A is the same update), and
      the column order means nothing before the first aggregation. For a node that trains from what it was served
      (U Σ^½, Σ^½ Vᵀ) the two readings start out equal.
    - *Clients with weight 0* (no examples) hold no partition.

    With equal ranks there is one partition and every weight is p_i: the rule is FlexLoRA's plain average,
    ``svd`` with ``keep-residual = false``. It does not compose with ``keep-residual``: keep-residual completes each
    node's term with the global's own components beyond its rank, so every completed term holds every partition and
    raFLoRA's weights fall back to p_i; the two are alternative answers to the same missing mass (the README's "How
    aggregation works"). For the same reason it does not take central DP, which averages each node's change from
    what it was served, with noise calibrated to a uniform 1/m (re-weighting a partition by 1/m_k would need noise
    for the smallest partition's count).

    Cost per module: one thin SVD per client, O((out + in)·r_i² + r_i³), then FlexLoRA's stacked factored SVD,
    O((out + in)·R² + R³) for R = Σ r_i; memory O((out + in)·R). No out × in matrix.
    """

    name: ClassVar[str] = "raflora"
    supports_central_dp: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(keep_residual=False)

    @classmethod
    def from_config(cls, cfg: RuleSettings) -> RaFLoRA:
        """No settings (``keep-residual`` is svd's)."""
        return cls()

    def aggregate(
        self, clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
    ) -> list[FactorPair]:
        """:func:`raflora_reproject`."""
        return raflora_reproject(clients, weights, targets)

    def private_update(
        self, previous: FactorPair, changes: Sequence[Change], mechanism: GaussianMechanism, store_rank: int
    ) -> FactorPair:
        """Refused: see the class docstring (:func:`common.rules.registry.central_dp_refusal`)."""
        raise ValueError(central_dp_refusal(self.name))

    def diagnostics(self, clients: Sequence[ClientFactors], weights: Sequence[float]) -> dict[str, float]:
        """``raflora_top_weight``: the largest partition weight of the round, max_{i,c} w_{i,c} (1 when one client
        alone holds a partition: how far raFLoRA leans on the few high-rank nodes)."""
        factors, p = check_clients(clients, weights)
        return {"raflora_top_weight": float(max(float(w.max()) for w in component_weights([f.r for f in factors], p)))}
