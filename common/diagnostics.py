"""Per-module aggregation diagnostics, computed from the factors.

- ``energy_kept``: for each target rank r, the fraction of ‖ΔW̄‖²_F that the best rank-r approximation keeps,
  Σ_{k≤r} σ_k² / Σ_k σ_k² (Eckart–Young).
- ``min_rank_energy``: the rank-collapse measure of raFLoRA (Wu et al. 2026, arXiv 2602.13486), the share of the
  global update's energy in the minimum shared rank, Σ_{k≤r_min} σ_k(G)² / Σ_k σ_k(G)² for the global G = B_g·A_g
  after the round and r_min the smallest node rank. Close to 1 round after round: the directions only the higher-rank
  nodes can hold are being averaged away.
- ``product_norm``: ‖X·Y‖_F as ‖R_X R_Yᵀ‖_F from the QR factors of X and Yᵀ, not from the Gram form
  tr((XᵀX)(YYᵀ)): that sum cancels when the product is small against its factors, which left a floor near √eps
  (in float32 a true fedavg error of 3e-5 read as 2.4e-4). Rules add their own diagnostics
  (:meth:`common.rules.base.Rule.diagnostics`, e.g. fedavg's aggregation error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from common.lora import ArrayLike, ClientFactors, Tensor
from common.rules.factored_svd import aggregate_svd


def energy_kept(clients: Sequence[ClientFactors], weights: Sequence[float], ranks: Sequence[int]) -> list[float]:
    """Fraction of ‖ΔW̄‖²_F kept by the best rank-r approximation, one value per rank (1.0 when ΔW̄ = 0)."""
    for j, r in enumerate(ranks):
        if r < 1:
            raise ValueError(f"ranks[{j}] must be >= 1, got {r}")
    energy = aggregate_svd(clients, weights, rank=0).S.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return [1.0 for _ in ranks]
    cumulative = torch.cumsum(energy, 0)
    return [float(cumulative[min(r, len(energy)) - 1]) / total for r in ranks]


def global_min_rank_energy(
    lora: Mapping[str, tuple[ArrayLike, ArrayLike]], ranks: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Per module of a global adapter (factors at scaling 1): ``min_rank_energy`` at r_min = min(``ranks``).

    Computed from the global alone, so every rule and every privacy setting reports it; none without ranks.
    """
    if not ranks:
        return {}
    r_min = min(ranks)
    return {
        module: {"min_rank_energy": energy_kept([(a, b, 1.0)], [1.0], [r_min])[0]} for module, (a, b) in lora.items()
    }


def product_norm(b: Tensor, a: Tensor) -> float:
    """‖b @ a‖_F for b (out × k) and a (k × in) without forming out × in: b = Q_b R_b, aᵀ = Q_a R_a → ‖R_b R_aᵀ‖_F."""
    r_b = torch.linalg.qr(b, mode="r").R  # (min(out, k), k)
    r_a = torch.linalg.qr(a.T, mode="r").R  # (min(in, k), k)
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def global_energy_kept(
    lora: Mapping[str, tuple[ArrayLike, ArrayLike]], ranks: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Per module of a global adapter (factors at scaling 1): ``energy_kept_r<r>`` for every rank in ``ranks``.

    What can be reported about a round without any client's update (central DP, secure aggregation).
    """
    return {
        module: {f"energy_kept_r{r}": k for r, k in zip(ranks, energy_kept([(a, b, 1.0)], [1.0], ranks), strict=True)}
        for module, (a, b) in lora.items()
    }
