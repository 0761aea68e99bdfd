"""``svd``: FlexLoRA's average of the products, re-projected to every rank by a truncated SVD from the factors.

Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
arXiv 2402.11505: ΔW̄ = Σ p_i s_i B_i A_i, and node j gets the best rank-r_j approximation of ΔW̄ (Eckart–Young).
Here the SVD comes from the stacked factors (:func:`factored_svd`): no out × in matrix is ever allocated, and one
decomposition serves every target rank. With ``keep-residual`` (:meth:`SVD.aggregate_module`) each node's term is
completed by what serving it at its rank cut from the global update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from common.dp import factor_difference, factors_norm
from common.lora import ClientFactors, LoRAFactors, TargetSpec
from common.rules.base import Change, GaussianMechanism, Rule, RuleSettings
from common.rules.factored_svd import factored_svd, split_balanced, stack_factors, svd_reproject
from common.rules.factors import FactorPair, check_clients


def withheld(previous: tuple[Any, Any], ranks: Sequence[int], p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G − Σ p_i T_i as (out × k, k × in) factors, for G = B_g·A_g and T_i its best rank-r_i approximation.

    With G = U Σ Vᵀ: Σ p_i T_i = U diag(c_k σ_k) Vᵀ, c_k = Σ_{i: r_i > k} p_i, so the difference is
    U diag((1 − c_k) σ_k) Vᵀ (Σ p_i = 1). In ``p``'s dtype.
    """
    a_g, b_g = (torch.as_tensor(np.asarray(x), dtype=p.dtype) for x in previous)
    g = factored_svd(b_g, a_g)
    k = g.U.shape[1]
    held = torch.zeros(k, dtype=p.dtype)
    for rank, p_i in zip(ranks, p, strict=True):
        held[: min(rank, k)] += p_i
    return g.U * ((1 - held) * g.S[:k]), g.V.T


class SVD(Rule):
    """FlexLoRA (arXiv 2402.11505): ΔW̄ = Σ p_i s_i B_i A_i, node j served U_{r_j} Σ_{r_j} V_{r_j}ᵀ.

    Served as B_j = U Σ^½ / √s_j, A_j = Σ^½ Vᵀ / √s_j. Not linear (it needs each client's factors), so it does not
    compose with secure aggregation. Cost per module O((out + in)·R² + R³) for R = Σ r_i, memory O((out + in)·R).
    """

    name: ClassVar[str] = "svd"

    def __init__(self, keep_residual: bool = True) -> None:
        self.keep_residual = keep_residual
        """Complete each node's term with what serving it at its rank cut (``keep-residual``; see
        :meth:`aggregate_module`); False is FlexLoRA's plain average of products."""

    @classmethod
    def from_config(cls, cfg: RuleSettings) -> SVD:
        """``keep-residual`` from the run config."""
        return cls(keep_residual=cfg.keep_residual)

    def aggregate(
        self, clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
    ) -> list[FactorPair]:
        """:func:`svd_reproject`."""
        return svd_reproject(clients, weights, targets)

    def aggregate_module(
        self,
        clients: Sequence[ClientFactors],
        weights: Sequence[float],
        store_rank: int,
        previous: tuple[np.ndarray, np.ndarray] | None,
    ) -> FactorPair:
        """FlexLoRA's average, with each node's term completed by what its rank could not hold (``keep-residual``).

        Plain FlexLoRA averages the products, ΔW̄ = Σ p_i s_i B_i A_i. A node at rank r_i was served T_i = the
        rank-r_i truncation of the global G, so even a node that changed nothing sends back T_i, and every round the
        directions of G beyond the low ranks lose the low-rank nodes' share of the weight. With ``keep_residual``
        each term is completed by the residual withheld when serving it:
        ΔW̄ = Σ p_i (s_i B_i A_i + G − T_i) = G + Σ p_i (s_i B_i A_i − T_i), which equals plain FlexLoRA when every
        node holds G at its rank. Every T_i is a truncation of the same G = U Σ Vᵀ, so the withheld part is one term
        of G's rank, G − Σ p_i T_i = U diag((1 − c_k) σ_k) Vᵀ with c_k = Σ_{i: r_i > k} p_i (:func:`withheld`), and
        the result is FlexLoRA's stacked SVD with that one term more: O((out + in)·(R + r_G)² + …), one SVD of G,
        from factors only, truncated at ``store_rank``.
        """
        if not self.keep_residual or previous is None:
            return super().aggregate_module(clients, weights, store_rank, previous)
        factors, p = check_clients(clients, weights)
        b_res, a_res = withheld(previous, [f.r for f in factors], p)
        b_cat, a_cat = stack_factors(factors, p)
        svd = factored_svd(torch.cat([b_res, b_cat], dim=1), torch.cat([a_res, a_cat], dim=0), rank=store_rank)
        return split_balanced(svd, store_rank, 1.0)

    # --- client-level DP --------------------------------------------------------------------------------------------
    def change(self, new: FactorPair, served: FactorPair, scaling: float) -> Change:
        """ΔW_new − ΔW_served as one factorisation (:func:`common.dp.factor_difference`), scaling 1."""
        diff = factor_difference(LoRAFactors(*new, scaling), LoRAFactors(*served, scaling))
        return diff.lora_A, diff.lora_B, 1.0

    def released_sq_norm(self, change: Change) -> float:
        """‖s·B·A‖²_F of the change, from the factors (:func:`common.dp.factors_norm`)."""
        return factors_norm(LoRAFactors(*change)) ** 2

    def private_update(
        self, previous: FactorPair, changes: Sequence[Change], mechanism: GaussianMechanism, store_rank: int
    ) -> FactorPair:
        """G + the SVD of the noisy dense mean ΔW̃ = (1/m)·Σ s_i B_i A_i + N, N_jk ~ N(0, (z·C/m)²), at ``store_rank``.

        Why noise on the dense aggregate is right: with every ‖s_i B_i A_i‖_F ≤ C, adding or removing one client
        moves ΔW̄ by at most C/m in Frobenius norm, the L2 norm of the flattened matrix, so i.i.d. Gaussian noise of
        std z·C/m on every entry is the Gaussian mechanism with multiplier z (Mironov 2017, arXiv 1702.07476).
        Everything after (SVD, adding G, truncation, the balanced split) only touches the released ΔW̃:
        post-processing. Noise on the factors instead would not do: (B, A) ↦ B·A is not linear, and a truncated SVD
        of the clean mean is not a bounded-sensitivity quantity. The noisy matrix has full rank, so this builds the
        out × in matrix and runs a dense SVD: O(out·in·min(out, in)), the one place a rule does.
        """
        factors, _ = check_clients(changes, [1.0] * len(changes))
        mechanism.check_within([factors_norm(f) for f in factors], "s·B·A")
        b_cat, a_cat = stack_factors(factors, mechanism.uniform_weights(len(factors), factors[0].lora_A))
        noisy = mechanism.noisy(b_cat @ a_cat)  # (out, in)
        if not bool(torch.isfinite(noisy).all()):
            raise ValueError("the noisy aggregate has non-finite entries; refusing to decompose it")
        u, s, vh = torch.linalg.svd(noisy, full_matrices=False)  # (out, k), (k,), (k, in)
        a_prev, b_prev = previous
        b_all = torch.cat([b_prev, u * s], dim=1)  # (out, store_rank + k)
        a_all = torch.cat([a_prev, vh], dim=0)  # (store_rank + k, in)
        return split_balanced(factored_svd(b_all, a_all, rank=store_rank), store_rank, 1.0)
