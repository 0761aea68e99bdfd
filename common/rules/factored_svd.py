"""The SVD of a sum of low-rank products from the factors alone, and the truncated, balanced split of it.

Σ_i B_i A_i with B_cat = [B_1 | …] (out × R) and A_cat = [A_1; …] (R × in): QR both, SVD the small R × R core, and
never form the out × in product. Cost O((out + in)·R² + R³), memory O((out + in)·R). FlexLoRA's rule (``svd``),
the diagnostics and central DP's re-projection all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.lora import ClientFactors, LoRAFactors, TargetSpec, Tensor
from common.rules.factors import FactorPair, check_clients, check_targets


@dataclass(frozen=True)
class FactoredSVD:
    """ΔW̄ = U · diag(S) · Vᵀ with orthonormal columns in U (out × k) and V (in × k), S sorted descending.

    ``S`` may be longer than k: it then holds the whole spectrum while U and V keep the leading k vectors.
    """

    U: Tensor
    S: Tensor
    V: Tensor


def stack_factors(factors: Sequence[LoRAFactors], p: Tensor) -> tuple[Tensor, Tensor]:
    """Stack B_cat = [p_1 s_1 B_1 | …] (out × R) and A_cat = [A_1; …] (R × in) so that ΔW̄ = B_cat @ A_cat."""
    b_cat = torch.cat([p[i] * f.scaling * f.lora_B for i, f in enumerate(factors)], dim=1)  # (out, R)
    a_cat = torch.cat([f.lora_A for f in factors], dim=0)  # (R, in)
    return b_cat, a_cat


def factored_svd(b_cat: Tensor, a_cat: Tensor, rank: int | None = None) -> FactoredSVD:
    """SVD of B_cat @ A_cat from the factors: QR both, SVD the small core, never forming out × in.

    B_cat = Q_B R_B, A_catᵀ = Q_A R_A, R_B R_Aᵀ = U_c Σ V_cᵀ, so B_cat A_cat = (Q_B U_c) Σ (Q_A V_c)ᵀ.
    Cost O((out + in)·R² + R³), memory O((out + in)·R).

    ``S`` always holds the whole spectrum (min(out, in, R) values); ``U`` and ``V`` hold only the leading ``rank``
    singular vectors (all of them when ``rank`` is None). The Householder reflectors from ``geqrf`` are applied to
    just those columns with ``ormqr``: Q_B and Q_A (out × R and in × R) are never formed, nor multiplied by all R
    columns of the core's vectors when the largest target rank is much smaller than R.
    Raises ``ValueError`` if ΔW̄ overflows the dtype of the factors.
    """
    out_features, total_rank = b_cat.shape
    in_features = a_cat.shape[1]
    k_b, k_a = min(out_features, total_rank), min(in_features, total_rank)
    h_b, tau_b = torch.geqrf(b_cat)  # reflectors below the diagonal, R_B on and above: (out, R)
    h_a, tau_a = torch.geqrf(a_cat.T)  # (in, R)
    core = h_b[:k_b].triu() @ h_a[:k_a].triu().T  # R_B R_Aᵀ: (k_b, k_a)
    if not bool(torch.isfinite(core).all()):
        raise ValueError(
            f"the aggregate ΔW̄ overflows {core.dtype}: the client factors are too large to multiply in this dtype; "
            "send them in a wider dtype"
        )
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)  # (k_b, k), (k,), (k, k_a)
    k = s.shape[0] if rank is None else max(0, min(rank, s.shape[0]))
    # Q·[X; 0] is the thin Q_B·X: pad the core's vectors with zero rows up to the full height.
    u = torch.ormqr(h_b, tau_b, torch.nn.functional.pad(u_c[:, :k], (0, 0, 0, out_features - k_b)))  # (out, k)
    v = torch.ormqr(h_a, tau_a, torch.nn.functional.pad(vh_c[:k].T, (0, 0, 0, in_features - k_a)))  # (in, k)
    return FactoredSVD(U=u, S=s, V=v)


def aggregate_svd(clients: Sequence[ClientFactors], weights: Sequence[float], rank: int | None = None) -> FactoredSVD:
    """The SVD of the exact weighted average ΔW̄ = Σ p_i s_i B_i A_i, in factored form.

    ``rank`` limits how many singular vectors are formed (see :func:`factored_svd`); the spectrum is always whole.
    """
    factors, p = check_clients(clients, weights)
    return factored_svd(*stack_factors(factors, p), rank=rank)


def split_balanced(svd: FactoredSVD, rank: int, scaling: float) -> FactorPair:
    """Best rank-``rank`` approximation split as B = U Σ^½ / √s, A = Σ^½ Vᵀ / √s, so s·B·A = U_r Σ_r V_rᵀ.

    Ranks beyond the spectrum are zero-padded.
    """
    k = min(rank, int(svd.S.shape[0]))
    if k > svd.U.shape[1]:
        raise ValueError(f"rank {rank} needs {k} singular vectors but this decomposition only kept {svd.U.shape[1]}")
    root = torch.sqrt(svd.S[:k].clamp_min(0.0) / scaling)  # (k,)
    lora_B = svd.U[:, :k] * root  # (out, k)
    lora_A = root[:, None] * svd.V[:, :k].T  # (k, in)
    if k < rank:
        lora_B = torch.nn.functional.pad(lora_B, (0, rank - k))
        lora_A = torch.nn.functional.pad(lora_A, (0, 0, 0, rank - k))
    return lora_A, lora_B


def svd_reproject(
    clients: Sequence[ClientFactors], weights: Sequence[float], targets: Sequence[TargetSpec]
) -> list[FactorPair]:
    """FlexLoRA: average the products, then give each target its best rank-r_j approximation.

    Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
    arXiv 2402.11505. ΔW̄ = Σ p_i s_i B_i A_i with p_i = n_i / Σ n; target j gets the truncated SVD
    ΔW̄_j = U_{r_j} Σ_{r_j} V_{r_j}ᵀ (optimal in Frobenius and spectral norm, Eckart–Young) split as
    B_j = U Σ^½ / √s_j, A_j = Σ^½ Vᵀ / √s_j. Unlike FlexLoRA's reference code, the SVD is computed from the
    stacked factors (see :func:`factored_svd`), so no out × in matrix is ever allocated; one decomposition
    serves every target rank.
    """
    checked = check_targets(targets)
    svd = aggregate_svd(clients, weights, rank=max((rank for rank, _ in checked), default=0))
    return [split_balanced(svd, rank, scaling) for rank, scaling in checked]
