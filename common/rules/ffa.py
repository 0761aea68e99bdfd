"""``ffa``: FFA-LoRA, lora_A frozen at a shared seeded init and only lora_B trained and averaged (exact, linear)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from common.dp import tensor_norm
from common.lora import ClientFactors, LoRAFactors, TargetSpec, Tensor
from common.rules.base import Change, GaussianMechanism, Rule
from common.rules.factors import (
    FactorPair,
    check_clients,
    check_targets,
    pad_columns,
    pad_rows,
    zero_padded_mean_b,
)

ROW_PRESENT = 1e-3
"""Under secure aggregation a row of the frozen A is read back only when nodes holding it carry more than this share
of the weight."""


def frozen_lora_a(factors: Sequence[LoRAFactors], rtol: float = 1e-5) -> Tensor:
    """The longest lora_A, after checking every client's lora_A is a leading slice of it (FFA-LoRA's frozen A)."""
    longest = max(factors, key=lambda f: f.r).lora_A
    scale = float(longest.abs().max()) if longest.numel() else 0.0
    for i, f in enumerate(factors):
        gap = float((f.lora_A - longest[: f.r]).abs().max())
        if gap > rtol * max(scale, 1e-12):
            raise ValueError(
                f"client {i}: lora_A differs from the shared frozen lora_A by up to {gap:.3g}; "
                "the ffa rule needs every client to keep the same seeded lora_A (train lora_B only)"
            )
    return longest


def ffa(clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]) -> list[FactorPair]:
    """FFA-LoRA: lora_A is frozen at a shared seeded init, only lora_B trains and is averaged (exact, linear).

    Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", arXiv 2403.12313. With one shared A,
    Σ p_i s_i B_i A = (Σ p_i s_i B_i) A, so averaging s·B is exact. Mixed ranks use leading slices of one shared A
    and zero-padded B. Target j gets A_j = A[:r_j], B_j = sB̄[:, :r_j] / s_j.
    """
    checked = check_targets(targets)
    factors, p = check_clients(clients, weights)
    a_shared = frozen_lora_a(factors)  # (r_max, in)
    sb_mean = zero_padded_mean_b(factors, p)  # (out, r_max)
    return [(pad_rows(a_shared, rank), pad_columns(sb_mean, rank) / scaling) for rank, scaling in checked]


class FFA(Rule):
    """FFA-LoRA (arXiv 2403.12313): ΔW̄ = (Σ p_i s_i pad(B_i))·A with A the frozen shared init; node j gets
    A_j = A[:r_j], B_j = sB̄[:, :r_j] / s_j."""

    name: ClassVar[str] = "ffa"
    linear: ClassVar[bool] = True
    secure_parts: ClassVar[tuple[str, ...]] = ("A", "rows", "s·B")
    freezes_lora_A: ClassVar[bool] = True
    stores_product: ClassVar[bool] = False

    def aggregate(
        self, clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
    ) -> list[FactorPair]:
        """:func:`ffa`."""
        return ffa(clients, weights, targets)

    def from_secure_means(self, means: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """sB̄, and A back from the mean of pad(A_i): mean(pad(A_i))[k] = A[k]·mean(1[k < r_i]) (the ``rows`` part)."""
        coverage = means["rows"]  # (R,): Σ_{i: r_i > k} p_i
        present = coverage > ROW_PRESENT  # rows no surviving node has are 0 up to quantisation
        a_mean = np.where(present[:, None], means["A"] / np.where(present, coverage, 1.0)[:, None], 0.0)
        return a_mean, means["s·B"]

    # --- client-level DP --------------------------------------------------------------------------------------------
    def change(self, new: FactorPair, served: FactorPair, scaling: float) -> Change:
        """(A_new, B_new − B_served, s): lora_A is the frozen public init, only s·B changes."""
        return new[0], new[1] - served[1], scaling

    def released_sq_norm(self, change: Change) -> float:
        """‖s·ΔB‖²_F: only s·B̄ is data-dependent."""
        _, lora_B, scaling = change
        return tensor_norm(scaling * lora_B) ** 2

    def private_update(
        self, previous: FactorPair, changes: Sequence[Change], mechanism: GaussianMechanism, store_rank: int
    ) -> FactorPair:
        """(A, B_prev + noisy mean s·ΔB): noise N(0, (z·C/m)²) on each entry of s·B̄ only.

        Norm bound used: each client's s_i·ΔB_i is clipped in Frobenius norm to C (zero padding keeps the norm), not
        ΔW_i. The frozen A is a public seeded init, so the only data-dependent release is s·B̄ = (1/m)·Σ pad(s_i ΔB_i),
        whose sensitivity is then C/m; ΔW̄ = (s·B̄ + N)·A is post-processing. Clipping ΔW_i = s_i ΔB_i A instead
        would not bound s_i ΔB_i (by ‖ΔW_i‖_F / σ_min(A), unbounded when A is ill-conditioned). The implied bound
        on the product is ‖ΔW_i‖_F ≤ C·‖A‖₂, so choose C relative to the spectral norm of the shared A.
        """
        factors, _ = check_clients(changes, [1.0] * len(changes))
        a_shared = frozen_lora_a(factors)  # (r_max, in)
        mechanism.check_within([f.scaling * tensor_norm(f.lora_B) for f in factors], "s·B")
        p = mechanism.uniform_weights(len(factors), factors[0].lora_A)
        sb_noisy = mechanism.noisy(zero_padded_mean_b(factors, p))  # (out, r_max)
        _, b_prev = previous
        return pad_rows(a_shared, store_rank), b_prev + pad_columns(sb_noisy, store_rank)
