"""LoRA factors of one target module, and the products of ΔW computed in factored form.

A LoRA layer (Hu et al. 2021, arXiv 2106.09685; peft's ``tuners/lora/layer.py``) adds a low-rank update to a frozen
weight W0 (out × in)::

        x ──► W0 ───────────────┐
        │                       (+) ──► h = W0 x + s · B A x
        └──► A (r × in) ──► B (out × r) ──► · s

with ``s = lora_alpha / r`` (or ``lora_alpha / √r`` with rsLoRA, Kalajdzievski 2023, arXiv 2312.03732).
The quantity that matters is the product ΔW = s·B·A. Everything here works on the factors: an out × in matrix is never
built, so costs scale with (out + in)·r instead of out·in.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

Tensor: TypeAlias = torch.Tensor
ArrayLike: TypeAlias = torch.Tensor | np.ndarray
ClientFactors: TypeAlias = tuple[ArrayLike, ArrayLike, float]
"""``(lora_A, lora_B, scaling)`` of one client for one module."""
TargetSpec: TypeAlias = tuple[int, float]
"""``(rank, scaling)`` that one recipient wants its factors at."""


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """Return peft's scaling ``s = α / r`` (or ``α / √r`` with rsLoRA)."""
    if r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be positive, got lora_alpha={lora_alpha}")
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


def as_tensor(value: Any, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """Convert a numpy array or tensor to a floating torch tensor, naming ``name`` if it cannot be."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {value.dtype}")
        with warnings.catch_warnings():
            # Arrays decoded from received bytes are read-only; nothing here writes into its inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        tensor = value.detach()  # aggregation is not differentiated; a live graph would only hold memory
    else:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    return tensor if dtype is None else tensor.to(dtype)


@dataclass(frozen=True)
class LoRAFactors:
    """The LoRA update of one target module: ΔW = scaling · lora_B @ lora_A."""

    lora_A: Tensor
    """(r, in) down-projection."""
    lora_B: Tensor
    """(out, r) up-projection."""
    scaling: float
    """peft's ``scaling``: α / r, or α / √r with rsLoRA."""

    def __post_init__(self) -> None:
        if self.lora_A.ndim != 2 or self.lora_B.ndim != 2:
            raise ValueError(
                f"lora_A and lora_B must be 2-D, got shapes {tuple(self.lora_A.shape)} and {tuple(self.lora_B.shape)}"
            )
        if self.lora_A.shape[0] != self.lora_B.shape[1]:
            raise ValueError(
                f"rank mismatch: lora_A has {self.lora_A.shape[0]} rows but lora_B has {self.lora_B.shape[1]} columns"
            )
        if self.lora_A.shape[0] < 1:
            raise ValueError("LoRA rank r must be at least 1, got r=0")
        if not (math.isfinite(self.scaling) and self.scaling > 0):
            raise ValueError(f"scaling must be a positive finite number, got scaling={self.scaling}")

    @classmethod
    def from_arrays(cls, lora_A: ArrayLike, lora_B: ArrayLike, scaling: float, name: str = "client") -> LoRAFactors:
        """Build factors from numpy arrays or tensors (promoted to a common float dtype)."""
        a = as_tensor(lora_A, f"{name} lora_A")
        b = as_tensor(lora_B, f"{name} lora_B")
        dtype = torch.promote_types(a.dtype, b.dtype)
        return cls(a.to(dtype), b.to(dtype), float(scaling))

    @property
    def r(self) -> int:
        """Rank of the factorisation (rows of lora_A)."""
        return int(self.lora_A.shape[0])

    @property
    def out_features(self) -> int:
        """Rows of ΔW."""
        return int(self.lora_B.shape[0])

    @property
    def in_features(self) -> int:
        """Columns of ΔW."""
        return int(self.lora_A.shape[1])

    def delta(self) -> Tensor:
        """Materialise ΔW = s·B·A (out × in). Only for tests and small modules."""
        return self.scaling * (self.lora_B @ self.lora_A)


def frobenius_inner(x: LoRAFactors, y: LoRAFactors) -> Tensor:
    """⟨ΔW_x, ΔW_y⟩_F = s_x s_y · tr((B_xᵀ B_y)(A_y A_xᵀ)), in O((out + in)·r_x·r_y)."""
    gram_b = x.lora_B.T @ y.lora_B  # (r_x, r_y)
    gram_a = y.lora_A @ x.lora_A.T  # (r_y, r_x)
    return x.scaling * y.scaling * torch.sum(gram_b * gram_a.T)


def frobenius_norm_sq(x: LoRAFactors) -> Tensor:
    """‖s·B·A‖²_F = s²·tr((BᵀB)(AAᵀ)), never building the out × in product."""
    return frobenius_inner(x, x).clamp_min(0.0)


def weighted_sum_norm_sq(parts: Sequence[LoRAFactors], weights: Sequence[float]) -> Tensor:
    """‖Σ w_i ΔW_i‖²_F from the pairwise factored inner products."""
    total = torch.zeros((), dtype=torch.float64)
    for i, (x, w_x) in enumerate(zip(parts, weights, strict=True)):
        for j in range(i, len(parts)):
            term = w_x * weights[j] * frobenius_inner(x, parts[j]).to(torch.float64)
            total = total + (term if i == j else 2.0 * term)
    return total.clamp_min(0.0)


def seeded_lora_a(seed: int, module: str, rank: int, in_features: int, max_rank: int) -> np.ndarray:
    """The lora_A init every node shares: rows ``:rank`` of one seeded (max_rank × in) draw, so ranks share a prefix.

    Kaiming-uniform with a = √5 (peft's default for lora_A): bound = 1/√in. The generator is seeded by
    (seed, module name) so the draw does not depend on the order modules are visited. It is public: anyone with the
    run's seed can redraw it, which FFA-LoRA's frozen lora_A and central DP's starting point rely on.
    """
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    bound = 1.0 / math.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(max_rank, in_features)).astype(np.float32)[:rank]
