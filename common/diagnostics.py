"""Per-module aggregation diagnostics, computed from the factors.

- ``energy_kept``: for each target rank r, the fraction of ‖ΔW̄‖²_F that the best rank-r approximation keeps,
  Σ_{k≤r} σ_k² / Σ_k σ_k² (Eckart–Young). Energy piling into the smallest shared ranks round after round is the
  "rank collapse" of raFLoRA (arXiv 2602.13486).
- ``fedavg_error``: the relative error of averaging A and B separately, ‖ΔW̄ − sB̄·Ā‖_F / ‖ΔW̄‖_F, from the stacked
  factors [B_cat | −sB̄] and [A_cat; Ā] in float64. The norm of a product X·Y is taken as ‖R_X R_Yᵀ‖_F from the QR
  factors of X and Yᵀ, not from the Gram form tr((XᵀX)(YYᵀ)): that sum cancels when the error is small, which left a
  floor near √eps (in float32 a true error of 3e-5 read as 2.4e-4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.aggregation import aggregate_svd, check_clients, fedavg_zero_pad, stack_factors
from common.lora import ClientFactors, Tensor


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


def product_norm(b: Tensor, a: Tensor) -> float:
    """‖b @ a‖_F for b (out × k) and a (k × in) without forming out × in: b = Q_b R_b, aᵀ = Q_a R_a → ‖R_b R_aᵀ‖_F."""
    r_b = torch.linalg.qr(b, mode="r").R  # (min(out, k), k)
    r_a = torch.linalg.qr(a.T, mode="r").R  # (min(in, k), k)
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def fedavg_error(clients: Sequence[ClientFactors], weights: Sequence[float]) -> float:
    """‖ΔW̄ − sB̄·Ā‖_F / ‖ΔW̄‖_F for the zero-padded FedAvg of factors (0.0 when ΔW̄ = 0)."""
    factors, _ = check_clients(clients, weights)
    wide = [(f.lora_A.double(), f.lora_B.double(), f.scaling) for f in factors]
    factors, p = check_clients(wide, weights)  # p in float64 too, as fedavg_zero_pad computes it below
    r_max = max(f.r for f in factors)
    ((a_mean, sb_mean),) = fedavg_zero_pad(wide, weights, [(r_max, 1.0)])
    b_cat, a_cat = stack_factors(factors, p)  # (out, R), (R, in)
    reference = product_norm(b_cat, a_cat)
    if reference == 0.0:
        return 0.0
    difference = product_norm(torch.cat([b_cat, -sb_mean], dim=1), torch.cat([a_cat, a_mean]))
    return difference / reference
