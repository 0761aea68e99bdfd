"""Per-module aggregation diagnostics, computed from the factors.

- ``energy_kept``: for each target rank r, the fraction of ‖ΔW̄‖²_F that the best rank-r approximation keeps,
  Σ_{k≤r} σ_k² / Σ_k σ_k² (Eckart–Young). Energy piling into the smallest shared ranks round after round is the
  "rank collapse" of raFLoRA (arXiv 2602.13486).
- ``fedavg_error``: the relative error of averaging A and B separately, ‖ΔW̄ − sB̄·Ā‖_F / ‖ΔW̄‖_F, from the Gram
  matrices of the stacked factors [B_cat | −sB̄] and [A_cat; Ā].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.aggregation import aggregate_svd, check_clients, fedavg_zero_pad, stack_factors
from common.lora import ClientFactors, LoRAFactors, frobenius_norm_sq


def energy_kept(clients: Sequence[ClientFactors], weights: Sequence[float], ranks: Sequence[int]) -> list[float]:
    """Fraction of ‖ΔW̄‖²_F kept by the best rank-r approximation, one value per rank (1.0 when ΔW̄ = 0)."""
    for j, r in enumerate(ranks):
        if r < 1:
            raise ValueError(f"ranks[{j}] must be >= 1, got {r}")
    energy = aggregate_svd(clients, weights).S.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return [1.0 for _ in ranks]
    cumulative = torch.cumsum(energy, 0)
    return [float(cumulative[min(r, len(energy)) - 1]) / total for r in ranks]


def fedavg_error(clients: Sequence[ClientFactors], weights: Sequence[float]) -> float:
    """‖ΔW̄ − sB̄·Ā‖_F / ‖ΔW̄‖_F for the zero-padded FedAvg of factors (0.0 when ΔW̄ = 0)."""
    factors, p = check_clients(clients, weights)
    r_max = max(f.r for f in factors)
    ((a_mean, sb_mean),) = fedavg_zero_pad(clients, weights, [(r_max, 1.0)])
    b_cat, a_cat = stack_factors(factors, p)
    exact = LoRAFactors(a_cat, b_cat, 1.0)
    difference = LoRAFactors(torch.cat([a_cat, a_mean]), torch.cat([b_cat, -sb_mean], dim=1), 1.0)
    reference = float(frobenius_norm_sq(exact))
    if reference == 0.0:
        return 0.0
    return float(torch.sqrt(frobenius_norm_sq(difference) / reference))
