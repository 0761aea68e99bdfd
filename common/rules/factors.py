"""Checks and shapes shared by the aggregation rules: client factors, weights, targets, zero padding.

Every rule aggregates one target module at a time from:

- ``clients``: one ``(lora_A, lora_B, scaling)`` per client, numpy arrays or torch tensors, ``lora_A`` (r_i × in),
  ``lora_B`` (out × r_i), ``scaling`` s_i = α_i / r_i (or α_i / √r_i with rsLoRA);
- ``weights``: non-negative floats, normally the clients' example counts n_i (normalised inside to p_i);
- ``targets``: one ``(rank, scaling)`` per recipient; a rule returns one ``(lora_A, lora_B)`` per target, in order,
  as torch tensors of shape (rank × in) and (out × rank) such that ``scaling · B @ A`` is that recipient's share.

A target rank above what the aggregate can hold is served at the largest meaningful rank and zero-padded, so the
recipient keeps its shapes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeAlias

import torch

from common.lora import ClientFactors, LoRAFactors, TargetSpec, Tensor

FactorPair: TypeAlias = tuple[Tensor, Tensor]
"""``(lora_A, lora_B)`` of one module."""


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
