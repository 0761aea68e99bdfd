"""Differential-privacy math for LoRA updates: clipping in factored form and the Gaussian mechanism.

Client-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
arXiv 1710.06963), which is what the coordinator runs:

1. every client's contribution Δ_i (all of its modules together) is clipped to ‖Δ_i‖ ≤ C;
2. the coordinator averages with a fixed, public denominator m: Δ̄ = (1/m)·Σ Δ_i;
3. it adds N(0, σ²) to every entry with σ = z·C/m.

Adding or removing one client changes Σ Δ_i by at most C in L2 norm, so the mean by C/m; Gaussian noise of std
z × sensitivity is (α, α/(2z²))-RDP (Mironov 2017, "Rényi Differential Privacy", arXiv 1702.07476), and sampling
clients at rate q amplifies it (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", arXiv 1908.10530); :mod:`common.accounting` composes the rounds. Sample-level DP-SGD on the nodes
(Abadi et al. 2016, "Deep Learning with Differential Privacy", arXiv 1607.00133) lives in ``client/privacy.py``.

Each rule's DP aggregate is its :meth:`common.rules.base.Rule.private_update`, wrapped by
:class:`common.rules.central_dp.CentralDP`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import NamedTuple

import torch

from common.lora import LoRAFactors, Tensor


def _check_max_norm(max_norm: float) -> float:
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm (the clipping bound C) must be positive and finite, got max_norm={max_norm}")
    return float(max_norm)


def clip_scale(norm: float, max_norm: float) -> float:
    """The clipping factor min(1, C/‖Δ‖), which is 1 for a zero update (no division by zero)."""
    max_norm = _check_max_norm(max_norm)
    if not (math.isfinite(norm) and norm >= 0):
        raise ValueError(f"update norm must be finite and non-negative, got norm={norm}")
    return 1.0 if norm <= max_norm else max_norm / norm


def factors_norm(f: LoRAFactors) -> float:
    """‖s·B·A‖_F from the factors, in float64, never building the out × in product.

    Equals √(s²·tr((BᵀB)(AAᵀ))), but computed through QR (B = Q_B R_B, Aᵀ = Q_A R_A, so
    ‖BA‖_F = ‖R_B R_Aᵀ‖_F): the Gram form squares the condition number, and a clipping bound must hold even when
    B·A nearly cancels. Cost O((out + in)·r²).
    """
    _, r_b = torch.linalg.qr(f.lora_B.detach().to(torch.float64))  # (min(out, r), r)
    _, r_a = torch.linalg.qr(f.lora_A.detach().to(torch.float64).T)  # (min(in, r), r)
    return abs(f.scaling) * float(torch.linalg.matrix_norm(r_b @ r_a.T))


def tensor_norm(t: Tensor) -> float:
    """Frobenius (flattened L2) norm of a dense tensor, in float64."""
    return float(torch.linalg.vector_norm(t.detach().to(torch.float64)))


def clip_factors(f: LoRAFactors, max_norm: float) -> tuple[LoRAFactors, float]:
    """Clip ΔW = s·B·A to ‖ΔW‖_F ≤ C by scaling ``lora_B``; return the clipped factors and the original norm.

    ΔW ← ΔW · min(1, C/‖ΔW‖_F) (McMahan et al. 2018, arXiv 1710.06963, Algorithm 1), with the norm from
    :func:`factors_norm`. ``scaling`` is left alone so the recipient's s stays peft's α/r. Updates already within C
    are returned unchanged (the same object); an all-zero update has norm 0 and is returned as is (Flower's
    ``clip_inputs_inplace`` divides by the norm and fails on it).

    This clips one module. Client-level DP needs the whole update within C: use :func:`clip_update`.
    """
    norm = factors_norm(f)
    factor = clip_scale(norm, max_norm)
    if factor == 1.0:
        return f, norm
    return LoRAFactors(f.lora_A, f.lora_B * factor, f.scaling), norm


class ClippedUpdate(NamedTuple):
    """One client's update after joint clipping, and its norm before."""

    factors: dict[str, LoRAFactors]
    """Per-module LoRA factors with ``lora_B`` scaled by the common factor."""
    dense: dict[str, Tensor]
    """Dense tensors (e.g. the classifier head's delta, or ffa's s·B) scaled by the same factor."""
    norm: float
    """‖Δ‖ before clipping: √(Σ ‖s·B·A‖²_F + Σ ‖dense‖²)."""


def whole_update_norm(factors: Mapping[str, LoRAFactors], dense: Mapping[str, Tensor] | None = None) -> float:
    """L2 norm of a whole client update: √(Σ_modules ‖s·B·A‖²_F + Σ_tensors ‖t‖²)."""
    total = sum(factors_norm(f) ** 2 for f in factors.values())
    total += sum(tensor_norm(t) ** 2 for t in (dense or {}).values())
    return math.sqrt(total)


def clip_update(
    factors: Mapping[str, LoRAFactors], max_norm: float, dense: Mapping[str, Tensor] | None = None
) -> ClippedUpdate:
    """Clip a client's whole update (every module and dense tensor jointly) to L2 norm ≤ C with one common factor.

    The DP guarantee is about the client's whole contribution, so the bound must hold for the concatenation:
    clipping each of M modules to C separately lets the update reach C·√M, and noise calibrated to C would then give
    an effective noise multiplier of only z/√M. Non-LoRA tensors that are averaged (the classifier head, peft's
    ``modules_to_save``) are part of the update and go in ``dense``.
    """
    norm = whole_update_norm(factors, dense)
    factor = clip_scale(norm, max_norm)
    if factor == 1.0:
        return ClippedUpdate(dict(factors), dict(dense or {}), norm)
    clipped = {k: LoRAFactors(f.lora_A, f.lora_B * factor, f.scaling) for k, f in factors.items()}
    return ClippedUpdate(clipped, {k: t * factor for k, t in (dense or {}).items()}, norm)


def factor_difference(new: LoRAFactors, old: LoRAFactors) -> LoRAFactors:
    """ΔW_new − ΔW_old as one factorisation of rank r_new + r_old: [s_n·B_n | −s_o·B_o] · [A_n; A_o], scaling 1.

    DP-FedAvg clips the change a client made in a round, not its absolute adapter (whose norm grows over rounds);
    this gives that change in factored form, ready for :func:`clip_factors` / :func:`clip_update`.
    """
    if (new.out_features, new.in_features) != (old.out_features, old.in_features):
        raise ValueError(
            f"cannot subtract a {old.out_features}×{old.in_features} update from a "
            f"{new.out_features}×{new.in_features} one"
        )
    dtype = torch.promote_types(new.lora_A.dtype, old.lora_A.dtype)
    lora_B = torch.cat([new.scaling * new.lora_B, -old.scaling * old.lora_B], dim=1).to(dtype)  # (out, r_n + r_o)
    lora_A = torch.cat([new.lora_A, old.lora_A], dim=0).to(dtype)  # (r_n + r_o, in)
    return LoRAFactors(lora_A, lora_B, 1.0)


def gaussian_noise_std(noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """Std σ = z·C/m of the Gaussian noise for the mean of m updates each clipped to C (sensitivity C/m)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got noise_multiplier={noise_multiplier}")
    clip_norm = _check_max_norm(clip_norm)
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients (the denominator m) must be an integer >= 1, got num_clients={num_clients}")
    return noise_multiplier * clip_norm / int(num_clients)


def make_generator(seed: int | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS's CSPRNG (``secrets.randbits(63)``), or with ``seed`` for tests.

    The seed is unpredictable; the stream itself is torch's PRNG (Mersenne Twister on CPU, Philox on CUDA), which is
    not a CSPRNG, and floating-point sampling is not hardened against Mironov's 2012 attack on the Laplace
    mechanism's low-order bits. Opacus's ``secure_mode`` needs ``torchcsprng``, unmaintained for current torch.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got seed={seed!r}")
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def add_gaussian_noise(tensor: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """Return ``tensor + N(0, std²)`` entrywise as a new tensor (noise drawn in at least float32)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be finite and >= 0, got std={std}")
    if std == 0.0:
        return tensor.clone()
    noise_dtype = torch.promote_types(tensor.dtype, torch.float32)
    noise = torch.randn(tensor.shape, generator=generator, dtype=noise_dtype, device=tensor.device)
    return (tensor.to(noise_dtype) + std * noise).to(tensor.dtype)
