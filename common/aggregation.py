"""Aggregation rules for heterogeneous-rank LoRA, as pure functions over factors.

Every rule has the signature ``rule(clients, weights, targets) -> list[(lora_A, lora_B)]``:

- ``clients``: one ``(lora_A, lora_B, scaling)`` per client for one target module, numpy arrays or torch tensors,
  ``lora_A`` (r_i × in), ``lora_B`` (out × r_i), ``scaling`` s_i = α_i / r_i (or α_i / √r_i with rsLoRA);
- ``weights``: non-negative floats, normally the clients' example counts n_i (normalised inside to p_i);
- ``targets``: one ``(rank, scaling)`` per recipient; the rule returns one ``(lora_A, lora_B)`` per target, in order,
  as torch tensors of shape (rank × in) and (out × rank) such that ``scaling · B @ A`` is that recipient's share.

A target rank above what the aggregate can hold (min(out, in, Σ r_i) for ``svd``; the largest client rank for the
zero-padding rules) is served at the largest meaningful rank and zero-padded, so the recipient keeps its shapes.

Rules are selected by name through :data:`RULES`. Only :data:`LINEAR_RULES` are sums of per-client terms, which is
what secure aggregation can compute.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch

from common.lora import ArrayLike, ClientFactors, LoRAFactors, TargetSpec, Tensor

FactorPair: TypeAlias = tuple[Tensor, Tensor]
AggregationRule: TypeAlias = Callable[
    [Sequence[ClientFactors], Sequence[float], Sequence[TargetSpec]], list[FactorPair]
]


@dataclass(frozen=True)
class FactoredSVD:
    """ΔW̄ = U · diag(S) · Vᵀ with orthonormal columns in U (out × k) and V (in × k), S sorted descending.

    ``S`` may be longer than k: it then holds the whole spectrum while U and V keep the leading k vectors.
    """

    U: Tensor
    S: Tensor
    V: Tensor


def check_clients(clients: Sequence[ClientFactors], weights: Sequence[float]) -> tuple[list[LoRAFactors], Tensor]:
    """Validate one module's client factors and weights; return factors in one dtype and weights p_i summing to 1.

    Raises ``ValueError`` naming the client and the problem: mismatched in/out dimensions, A/B rank mismatch,
    non-finite entries, non-positive scaling, negative or all-zero weights.
    """
    if len(clients) == 0:
        raise ValueError("no clients to aggregate: the list of client factors is empty")
    if len(weights) != len(clients):
        raise ValueError(f"got {len(weights)} weights for {len(clients)} clients; need one weight per client")
    factors: list[LoRAFactors] = []
    for i, entry in enumerate(clients):
        if len(entry) != 3:
            raise ValueError(f"client {i}: expected (lora_A, lora_B, scaling), got a tuple of {len(entry)} items")
        lora_A, lora_B, scaling = entry
        try:
            f = LoRAFactors.from_arrays(lora_A, lora_B, _as_float(scaling, "scaling"), name=f"client {i}")
        except ValueError as err:
            message = str(err)
            raise ValueError(message if message.startswith(f"client {i} ") else f"client {i}: {message}") from None
        for name, t in (("lora_A", f.lora_A), ("lora_B", f.lora_B)):
            # One sum is 7x cheaper than an elementwise mask; a sum of finite entries can still overflow, so a
            # non-finite sum is confirmed entry by entry.
            if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"client {i}: {name} contains non-finite values (NaN or Inf)")
        if factors and (f.out_features, f.in_features) != (factors[0].out_features, factors[0].in_features):
            raise ValueError(
                f"client {i}: ΔW is {f.out_features}×{f.in_features} but client 0's is "
                f"{factors[0].out_features}×{factors[0].in_features}; all clients must share out and in dimensions"
            )
        factors.append(f)
    dtype = factors[0].lora_A.dtype
    for f in factors[1:]:
        dtype = torch.promote_types(dtype, f.lora_A.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    factors = [LoRAFactors(f.lora_A.to(dtype), f.lora_B.to(dtype), f.scaling) for f in factors]
    return factors, normalise_weights(weights, dtype, factors[0].lora_A.device)


def _as_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def normalise_weights(weights: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Return p_i = w_i / Σ w; reject negative, non-finite or all-zero weights."""
    w = torch.tensor([_as_float(x, f"weights[{i}]") for i, x in enumerate(weights)], dtype=torch.float64)
    for i, x in enumerate(w.tolist()):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"weights must be finite and non-negative, got weights[{i}]={x}")
    largest = float(w.max())
    if largest <= 0:
        raise ValueError(f"weights must not all be zero, got {list(weights)}")
    w = w / largest  # so that the sum cannot overflow
    return (w / w.sum()).to(dtype=dtype, device=device)


def _is_whole_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) and float(value).is_integer()


def check_targets(targets: Sequence[TargetSpec]) -> list[tuple[int, float]]:
    """Validate ``(rank, scaling)`` targets: integer rank ≥ 1 and a positive finite scaling."""
    checked = []
    for j, entry in enumerate(targets):
        if len(entry) != 2:
            raise ValueError(f"target {j}: expected (rank, scaling), got a tuple of {len(entry)} items")
        rank, scaling = entry
        if not _is_whole_number(rank) or rank < 1:
            raise ValueError(f"target {j}: rank must be an integer >= 1, got rank={rank!r}")
        value = _as_float(scaling, f"target {j}: scaling")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"target {j}: scaling must be positive and finite, got scaling={scaling!r}")
        checked.append((int(rank), value))
    return checked


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


def pad_columns(t: Tensor, width: int) -> Tensor:
    """The first ``width`` columns of ``t``, zero-padded when it has fewer."""
    return t[:, :width] if t.shape[1] >= width else torch.nn.functional.pad(t, (0, width - t.shape[1]))


def pad_rows(t: Tensor, height: int) -> Tensor:
    """The first ``height`` rows of ``t``, zero-padded when it has fewer."""
    return t[:height] if t.shape[0] >= height else torch.nn.functional.pad(t, (0, 0, 0, height - t.shape[0]))


def zero_padded_mean_b(factors: Sequence[LoRAFactors], p: Tensor) -> Tensor:
    """Σ p_i s_i B_i with every B_i zero-padded to the largest client rank (out × r_max)."""
    r_max = max(f.r for f in factors)
    return torch.stack([p[i] * f.scaling * pad_columns(f.lora_B, r_max) for i, f in enumerate(factors)]).sum(0)


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


def shared_lora_a(factors: Sequence[LoRAFactors], rtol: float = 1e-5) -> Tensor:
    """Return the longest lora_A after checking every client's lora_A is a leading slice of it (FFA-LoRA's frozen A)."""
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
    a_shared = shared_lora_a(factors)  # (r_max, in)
    sb_mean = zero_padded_mean_b(factors, p)  # (out, r_max)
    return [(pad_rows(a_shared, rank), pad_columns(sb_mean, rank) / scaling) for rank, scaling in checked]


RULES: dict[str, AggregationRule] = {"svd": svd_reproject, "fedavg": fedavg_zero_pad, "ffa": ffa}
"""Aggregation rules by the name a config uses."""

LINEAR_RULES: frozenset[str] = frozenset({"fedavg", "ffa"})
"""Rules that are sums of per-client terms, so secure aggregation (which only reveals sums) can compute them."""


def get_rule(name: str) -> AggregationRule:
    """Look up a rule by name, with an error that lists the known names."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of {sorted(RULES)}") from None


def to_numpy_pair(pair: FactorPair) -> tuple[ArrayLike, ArrayLike]:
    """Detach a ``(lora_A, lora_B)`` pair to numpy on the CPU."""
    return pair[0].detach().cpu().numpy(), pair[1].detach().cpu().numpy()
