"""Per-module aggregation diagnostics, computed from the factors.

- ``energy_kept``: for each target rank r, the fraction of ‖ΔW̄‖²_F that the best rank-r approximation keeps,
  Σ_{k≤r} σ_k² / Σ_k σ_k² (Eckart–Young).
- :func:`served_diagnostics`: the same for the stored global G = B_g·A_g that nodes are served (keep-residual
  included), its effective rank, and ``min_rank_energy``, the rank-collapse measure of raFLoRA (Wu et al. 2026,
  arXiv 2602.13486): Σ_{k≤r_min} σ_k(G)² / Σ_k σ_k(G)² for r_min the smallest node rank. Close to 1 round after
  round: the directions only the higher-rank nodes can hold are being averaged away. :func:`rank_warning` turns them
  into one line for the log.
- ``product_norm``: ‖X·Y‖_F as ‖R_X R_Yᵀ‖_F from the QR factors of X and Yᵀ, not from the Gram form
  tr((XᵀX)(YYᵀ)): that sum cancels when the product is small against its factors, which left a floor near √eps
  (in float32 a true fedavg error of 3e-5 read as 2.4e-4). Rules add their own diagnostics
  (:meth:`common.rules.base.Rule.diagnostics`, e.g. fedavg's aggregation error).
"""

from __future__ import annotations

import math
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


EFFECTIVE_RANK_RTOL = 1e-3
"""A singular value counts towards the effective rank when it is above this share of the largest."""


def served_diagnostics(
    lora: Mapping[str, tuple[ArrayLike, ArrayLike]], ranks: Sequence[int]
) -> dict[str, dict[str, float]]:
    """Per module of a stored global G = B·A (scaling 1), what serving it keeps, from one factored SVD:

    ``energy_kept_r<r>`` for every rank in ``ranks`` (the share of ‖G‖²_F a node at rank r receives),
    ``min_rank_energy`` (the same at the smallest rank: raFLoRA's rank-collapse measure) and ``effective_rank``
    (singular values above :data:`EFFECTIVE_RANK_RTOL` of the largest). What can be reported without any client's
    update (central DP, secure aggregation); none of the rank keys without ranks.
    """
    out: dict[str, dict[str, float]] = {}
    for module, (a, b) in lora.items():
        spectrum = aggregate_svd([(a, b, 1.0)], [1.0], rank=0).S.to(torch.float64)
        energy = spectrum**2
        total = float(energy.sum())
        cumulative = torch.cumsum(energy, 0)
        values = {"effective_rank": float(int((spectrum > EFFECTIVE_RANK_RTOL * spectrum.max()).sum()))}
        for r in ranks:
            values[f"energy_kept_r{r}"] = float(cumulative[min(r, len(energy)) - 1]) / total if total > 0 else 1.0
        if ranks:
            values["min_rank_energy"] = values[f"energy_kept_r{min(ranks)}"]
        out[module] = values
    return out


def rank_warning(diagnostics: Mapping[str, Mapping[str, float]], ranks: Sequence[int], share: float) -> str:
    """One line when the stored global fails a node, else "".

    ``collapse``: a module's effective rank is below the smallest node rank (the global has collapsed into fewer
    directions than any node can hold); ``thin``: served at the smallest rank, a module keeps less than ``share`` of
    the global's energy (that node receives a poor copy). The worst module is named.
    """
    if not ranks or not diagnostics:
        return ""
    r_min = min(ranks)
    lowest = min(diagnostics, key=lambda m: (diagnostics[m].get("effective_rank", math.inf), m))
    effective = diagnostics[lowest].get("effective_rank", math.inf)
    if effective < r_min:
        return (
            f"collapse: the global's effective rank in {lowest} is {effective:.0f}, below the smallest node rank "
            f"{r_min}"
        )
    key = f"energy_kept_r{r_min}"
    thinnest = min(diagnostics, key=lambda m: (diagnostics[m].get(key, math.inf), m))
    kept = diagnostics[thinnest].get(key, math.inf)
    if kept < share:
        return f"thin: served at rank {r_min}, {thinnest} keeps {kept:.1%} of the global's energy (< {share:.1%})"
    return ""


def product_norm(b: Tensor, a: Tensor) -> float:
    """‖b @ a‖_F for b (out × k) and a (k × in) without forming out × in: b = Q_b R_b, aᵀ = Q_a R_a → ‖R_b R_aᵀ‖_F."""
    r_b = torch.linalg.qr(b, mode="r").R  # (min(out, k), k)
    r_a = torch.linalg.qr(a.T, mode="r").R  # (min(in, k), k)
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))
