"""``fedavg``: FedAvg of the factors themselves, zero-padded to the largest rank (FedIT with HetLoRA padding).

A baseline: averaging B and A separately is inexact (mean(B)·mean(A) ≠ mean(B·A)), but linear, so it composes with
secure aggregation with trainable lora_A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from common.diagnostics import product_norm
from common.dp import tensor_norm
from common.lora import ClientFactors, TargetSpec
from common.rules.base import Change, GaussianMechanism, Rule, SeededInit
from common.rules.factored_svd import stack_factors
from common.rules.factors import (
    FactorPair,
    check_clients,
    check_targets,
    pad_columns,
    pad_rows,
    zero_padded_mean_b,
)


def fedavg_zero_pad(
    clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
) -> list[FactorPair]:
    """FedIT-style FedAvg of the factors, with HetLoRA zero padding for mixed ranks (a baseline; inexact).

    Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT), arXiv 2305.05644;
    zero padding for heterogeneous ranks as in Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of
    On-Device Foundation Models" (HetLoRA), arXiv 2401.06432. With B_i, A_i zero-padded to r_max:
    sB̄ = Σ p_i s_i B_i, Ā = Σ p_i A_i, aggregate sB̄·Ā ≠ Σ p_i s_i B_i A_i in general. Target j gets the leading
    slices A_j = Ā[:r_j], B_j = sB̄[:, :r_j] / s_j.
    """
    checked = check_targets(targets)
    factors, p = check_clients(clients, weights)
    r_max = max(f.r for f in factors)
    sb_mean = zero_padded_mean_b(factors, p)  # (out, r_max)
    a_mean = torch.stack([p[i] * pad_rows(f.lora_A, r_max) for i, f in enumerate(factors)]).sum(0)  # (r_max, in)
    return [(pad_rows(a_mean, rank), pad_columns(sb_mean, rank) / scaling) for rank, scaling in checked]


def fedavg_error(clients: Sequence[ClientFactors], weights: Sequence[float]) -> float:
    """‖ΔW̄ − sB̄·Ā‖_F / ‖ΔW̄‖_F for the zero-padded FedAvg of factors (0.0 when ΔW̄ = 0).

    From the stacked factors [B_cat | −sB̄] and [A_cat; Ā] in float64, with :func:`common.diagnostics.product_norm`.
    """
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


class FedAvg(Rule):
    """FedIT/HetLoRA (arXiv 2305.05644, 2401.06432): sB̄ = Σ p_i s_i pad(B_i), Ā = Σ p_i pad(A_i); node j gets
    A_j = Ā[:r_j], B_j = sB̄[:, :r_j] / s_j."""

    name: ClassVar[str] = "fedavg"
    linear: ClassVar[bool] = True
    secure_parts: ClassVar[tuple[str, ...]] = ("A", "s·B")
    stores_product: ClassVar[bool] = False

    def aggregate(
        self, clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
    ) -> list[FactorPair]:
        """:func:`fedavg_zero_pad`."""
        return fedavg_zero_pad(clients, weights, targets)

    def diagnostics(self, clients: Sequence[ClientFactors], weights: Sequence[float]) -> dict[str, float]:
        """``fedavg_error``: ‖ΔW̄ − sB̄·Ā‖_F / ‖ΔW̄‖_F, what averaging the factors separately costs."""
        return {"fedavg_error": fedavg_error(clients, weights)}

    def from_secure_means(self, means: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The means of pad(A_i) and pad(s_i·B_i) are the rule's Ā and sB̄."""
        return means["A"], means["s·B"]

    # --- client-level DP --------------------------------------------------------------------------------------------
    def public_start(
        self, module: str, out_features: int, in_features: int, store_rank: int, init: SeededInit
    ) -> FactorPair:
        """lora_B = 0 and lora_A = the shared seeded init: the rule releases lora_A, so its change counts."""
        lora_A = torch.as_tensor(init.lora_A(module, store_rank, in_features), dtype=torch.float64)
        return lora_A, torch.zeros(out_features, store_rank, dtype=torch.float64)

    def change(self, new: FactorPair, served: FactorPair, scaling: float) -> Change:
        """(A_new − A_served, B_new − B_served, s)."""
        return new[0] - served[0], new[1] - served[1], scaling

    def released_sq_norm(self, change: Change) -> float:
        """‖s·ΔB‖²_F + ‖ΔA‖²_F: both means are released."""
        lora_A, lora_B, scaling = change
        return tensor_norm(scaling * lora_B) ** 2 + tensor_norm(lora_A) ** 2

    def clip_change(self, change: Change, factor: float) -> Change:
        """Both factors scaled by the clipping factor."""
        lora_A, lora_B, scaling = change
        return lora_A * factor, lora_B * factor, scaling

    def private_update(
        self, previous: FactorPair, changes: Sequence[Change], mechanism: GaussianMechanism, store_rank: int
    ) -> FactorPair:
        """Previous + (noisy sB̄ of the changes, noisy Ā of the changes), N(0, (z·C/m)²) on every entry of both.

        The clipped vector is the pair: √(‖s_i ΔB_i‖²_F + ‖ΔA_i‖²_F) ≤ C, so each mean has sensitivity ≤ C/m
        jointly. Note that with absolute factors peft's Kaiming-uniform init alone has ‖A‖_F ≈ √(r/3); changes keep
        C meaningful.
        """
        factors, _ = check_clients(changes, [1.0] * len(changes))
        norms = [(f.scaling**2 * tensor_norm(f.lora_B) ** 2 + tensor_norm(f.lora_A) ** 2) ** 0.5 for f in factors]
        mechanism.check_within(norms, "(s·B, A)")
        p = mechanism.uniform_weights(len(factors), factors[0].lora_A)
        r_max = max(f.r for f in factors)
        sb_noisy = mechanism.noisy(zero_padded_mean_b(factors, p))  # (out, r_max)
        a_mean = torch.stack([p[i] * pad_rows(f.lora_A, r_max) for i, f in enumerate(factors)]).sum(0)  # (r_max, in)
        a_noisy = mechanism.noisy(a_mean)
        d_a, d_sb = pad_rows(a_noisy, store_rank), pad_columns(sb_noisy, store_rank)
        a_prev, b_prev = previous
        return a_prev + d_a, b_prev + d_sb
