"""Central (client-level) DP versions of the aggregation rules: uniform mean of clipped contributions + Gaussian noise.

Every rule here has the signature ``rule(clients, targets, *, noise_multiplier, clip_norm, generator,
num_clients=None) -> list[(lora_A, lora_B)]``, like :mod:`common.aggregation` minus the weights, and returns one pair
per ``(rank, scaling)`` target. Each rule checks that every client's contribution is within ``clip_norm`` (a
necessary condition; the caller clips a client's modules jointly with :func:`common.dp.clip_update` first) and adds
noise of std σ = z·C/m (:func:`common.dp.gaussian_noise_std`) to the one quantity it releases.

**Why uniform weights.** The mean is (1/m)·Σ_i Δ_i over the m sampled clients, m fixed and public (the number the
coordinator asked, not the number that answered: a client that fails contributes a zero update, which is within C).
One client's presence then moves the mean by at most C/m. With example weights p_i = n_i / Σ n the bound breaks:
one client with n_i ≫ the others has p_i → 1 and moves the mean by up to C, and p_i depends on the private n_i and
on who else took part, so no noise fixed in advance covers it. McMahan et al. 2018 (arXiv 1710.06963) bound it with
capped weights w_i = min(n_i / ŵ, 1) over a fixed denominator; we use the simplest case, w_i = 1.

**What is clipped** is exactly what the caller passes: absolute adapters (then C bounds the adapter's norm for good)
or, as in DP-FedAvg, the round's change (:func:`common.dp.factor_difference` for svd, B_i − B_start for ffa), in which
case the returned aggregate is the mean change and the caller adds it to the previous global (post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from common.aggregation import (
    FactoredSVD,
    FactorPair,
    check_clients,
    check_targets,
    pad_columns,
    pad_rows,
    shared_lora_a,
    split_balanced,
    stack_factors,
    zero_padded_mean_b,
)
from common.dp import add_gaussian_noise, factors_norm, gaussian_noise_std, tensor_norm
from common.lora import ClientFactors, LoRAFactors, TargetSpec, Tensor

CLIP_RTOL = 1e-4
"""Relative slack when checking that a contribution is within C (float32 rounding of an already clipped update)."""


class DPAggregationRule(Protocol):
    """Signature shared by the rules in :data:`DP_RULES`."""

    def __call__(
        self,
        clients: Sequence[ClientFactors],
        targets: Sequence[TargetSpec],
        *,
        noise_multiplier: float,
        clip_norm: float,
        generator: torch.Generator,
        num_clients: int | None = None,
    ) -> list[FactorPair]: ...


def _denominator(count: int, num_clients: int | None) -> int:
    """The public denominator m: ``num_clients``, at least the number of contributions, or that number by default."""
    m = count if num_clients is None else num_clients
    if isinstance(m, bool) or int(m) != m or m < count:
        raise ValueError(
            f"num_clients (the public denominator m) must be an integer >= the {count} contributions, got {m}"
        )
    return int(m)


def _uniform(factors: Sequence[LoRAFactors], num_clients: int | None) -> tuple[int, Tensor]:
    """The denominator m and the weights 1/m, in the factors' dtype."""
    m = _denominator(len(factors), num_clients)
    return m, torch.full((len(factors),), 1.0 / m, dtype=factors[0].lora_A.dtype, device=factors[0].lora_A.device)


def _check_within(norms: Sequence[float], clip_norm: float, what: str) -> None:
    for i, norm in enumerate(norms):
        if norm > clip_norm * (1.0 + CLIP_RTOL):
            raise ValueError(
                f"client {i}: ‖{what}‖ = {norm:.6g} exceeds clip_norm C = {clip_norm:.6g}; clip each client's update "
                "with common.dp.clip_update before the DP aggregate, or the noise does not cover it"
            )


def dp_mean(
    tensors: Sequence[Tensor],
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
    num_clients: int | None = None,
) -> Tensor:
    """Gaussian mechanism on the mean of dense tensors each within C: (1/m)·Σ t_i + N(0, (z·C/m)²).

    For the dense tensors that are federated with plain averaging (the classifier head's delta). Sensitivity of the
    mean to one client is C/m (McMahan et al. 2018, arXiv 1710.06963).
    """
    if len(tensors) == 0:
        raise ValueError("no client tensors to average")
    _check_within([tensor_norm(t) for t in tensors], clip_norm, "t")
    m = _denominator(len(tensors), num_clients)
    mean = torch.stack(list(tensors)).sum(0) / m
    return add_gaussian_noise(mean, gaussian_noise_std(noise_multiplier, clip_norm, m), generator)


def dp_mean_svd(
    clients: Sequence[ClientFactors],
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
    num_clients: int | None = None,
) -> FactoredSVD:
    """SVD of the noisy dense mean ΔW̃ = (1/m)·Σ s_i B_i A_i + N, N_jk ~ N(0, (z·C/m)²), for the svd rule.

    Why noise on the dense aggregate is right: with every ‖s_i B_i A_i‖_F ≤ C, adding or removing one client moves
    ΔW̄ by at most C/m in Frobenius norm, the L2 norm of the flattened matrix, so i.i.d. Gaussian noise of std z·C/m on
    every entry is the Gaussian mechanism with noise multiplier z (Mironov 2017, arXiv 1702.07476). Everything after
    (SVD, truncation to each client's rank, the balanced split) only touches the released ΔW̃: post-processing, free
    of privacy cost. Noise on the factors instead would not do: the map (B, A) ↦ B·A is not linear and a truncated
    SVD of the clean mean is not a bounded-sensitivity quantity.

    The noisy matrix has full rank, so unlike :func:`common.aggregation.factored_svd` this builds the out × in matrix
    and runs a dense SVD: O(out·in·min(out, in)). The result's U, S, V have min(out, in) columns, sorted descending,
    and :func:`common.aggregation.split_balanced` re-projects them as usual.
    """
    factors, _ = check_clients(clients, [1.0] * len(clients))
    _check_within([factors_norm(f) for f in factors], clip_norm, "s·B·A")
    m, p = _uniform(factors, num_clients)
    b_cat, a_cat = stack_factors(factors, p)  # (out, R), (R, in)
    noisy = add_gaussian_noise(b_cat @ a_cat, gaussian_noise_std(noise_multiplier, clip_norm, m), generator)
    if not bool(torch.isfinite(noisy).all()):
        raise ValueError("the noisy aggregate has non-finite entries; refusing to decompose it")
    u, s, vh = torch.linalg.svd(noisy, full_matrices=False)  # (out, k), (k,), (k, in)
    return FactoredSVD(U=u, S=s, V=vh.T)


def dp_svd_reproject(
    clients: Sequence[ClientFactors],
    targets: Sequence[TargetSpec],
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
    num_clients: int | None = None,
) -> list[FactorPair]:
    """FlexLoRA (Bai et al. 2024, arXiv 2402.11505) with client-level DP: each target gets the best rank-r_j
    approximation of the noisy mean :func:`dp_mean_svd`, split as B = U Σ^½ / √s_j, A = Σ^½ Vᵀ / √s_j."""
    checked = check_targets(targets)
    svd = dp_mean_svd(
        clients, noise_multiplier=noise_multiplier, clip_norm=clip_norm, generator=generator, num_clients=num_clients
    )
    return [split_balanced(svd, rank, scaling) for rank, scaling in checked]


def dp_ffa(
    clients: Sequence[ClientFactors],
    targets: Sequence[TargetSpec],
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
    num_clients: int | None = None,
) -> list[FactorPair]:
    """FFA-LoRA (Sun et al. 2024, arXiv 2403.12313) with client-level DP: noise on the mean s·B̄ only.

    Norm bound used: each client's **s_i·B_i is clipped in Frobenius norm to C** (zero padding keeps the norm), not
    ΔW_i. The frozen A is a public seeded init, so the only data-dependent release is
    s·B̄ = (1/m)·Σ pad(s_i B_i), whose sensitivity is then C/m; noise N(0, (z·C/m)²) goes on each of its entries and
    ΔW̄ = (s·B̄ + N)·A is post-processing. Clipping ΔW_i = s_i B_i A to C instead would not bound s_i B_i (by
    ‖ΔW_i‖_F / σ_min(A), unbounded when A is ill-conditioned). The implied bound on the product is
    ‖ΔW_i‖_F ≤ C·‖A‖₂, so choose C relative to the spectral norm of the shared A.
    """
    checked = check_targets(targets)
    factors, _ = check_clients(clients, [1.0] * len(clients))
    a_shared = shared_lora_a(factors)  # (r_max, in)
    _check_within([f.scaling * tensor_norm(f.lora_B) for f in factors], clip_norm, "s·B")
    m, p = _uniform(factors, num_clients)
    sb_mean = zero_padded_mean_b(factors, p)  # (out, r_max)
    sb_noisy = add_gaussian_noise(sb_mean, gaussian_noise_std(noise_multiplier, clip_norm, m), generator)
    return [(pad_rows(a_shared, rank), pad_columns(sb_noisy, rank) / scaling) for rank, scaling in checked]


def dp_fedavg(
    clients: Sequence[ClientFactors],
    targets: Sequence[TargetSpec],
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
    num_clients: int | None = None,
) -> list[FactorPair]:
    """FedIT/HetLoRA zero-padded FedAvg (arXiv 2305.05644, 2401.06432) with client-level DP on s·B̄ and Ā.

    Both means are released, so the clipped vector is the pair: √(‖s_i B_i‖²_F + ‖A_i‖²_F) ≤ C (pass s_i·B_i and A_i
    as two dense tensors to :func:`common.dp.clip_update`). Each mean then has sensitivity ≤ C/m jointly, and
    N(0, (z·C/m)²) goes on every entry of both. Note that A_i here is the absolute factor unless the caller passes
    deltas: peft's Kaiming-uniform init alone has ‖A‖_F ≈ √(r/3), so C must exceed that or A is shrunk every round.
    """
    checked = check_targets(targets)
    factors, _ = check_clients(clients, [1.0] * len(clients))
    norms = [(f.scaling**2 * tensor_norm(f.lora_B) ** 2 + tensor_norm(f.lora_A) ** 2) ** 0.5 for f in factors]
    _check_within(norms, clip_norm, "(s·B, A)")
    m, p = _uniform(factors, num_clients)
    std = gaussian_noise_std(noise_multiplier, clip_norm, m)
    r_max = max(f.r for f in factors)
    sb_noisy = add_gaussian_noise(zero_padded_mean_b(factors, p), std, generator)  # (out, r_max)
    a_mean = torch.stack([p[i] * pad_rows(f.lora_A, r_max) for i, f in enumerate(factors)]).sum(0)  # (r_max, in)
    a_noisy = add_gaussian_noise(a_mean, std, generator)
    return [(pad_rows(a_noisy, rank), pad_columns(sb_noisy, rank) / scaling) for rank, scaling in checked]


DP_RULES: dict[str, DPAggregationRule] = {"svd": dp_svd_reproject, "fedavg": dp_fedavg, "ffa": dp_ffa}
"""Central-DP aggregation rules by the name a config uses (the same names as :data:`common.aggregation.RULES`)."""
