"""Properties of the per-module diagnostics against a dense numpy float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.diagnostics import energy_kept, rank_warning, served_diagnostics
from common.rules.factored_svd import svd_reproject
from common.rules.fedavg import fedavg_error

Array = np.ndarray
PROPERTY = settings(max_examples=30, deadline=None)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def as_numpy(x: object) -> Array:
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def dense_mean(clients: list, weights: list[float]) -> Array:
    """ΔW̄ = Σ p_i s_i B_i A_i, materialised in float64."""
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return sum(p_i * s * (as_numpy(b) @ as_numpy(a)) for p_i, (a, b, s) in zip(p, clients, strict=True))


def fedavg_product(clients: list, weights: list[float]) -> Array:
    """sB̄·Ā with both factors averaged by ``np.average`` after zero-padding to the largest rank."""
    r_max = max(as_numpy(a).shape[0] for a, _, _ in clients)
    padded_a = [
        np.vstack([as_numpy(a), np.zeros((r_max - as_numpy(a).shape[0], as_numpy(a).shape[1]))]) for a, _, _ in clients
    ]
    padded_sb = [
        s * np.hstack([as_numpy(b), np.zeros((as_numpy(b).shape[0], r_max - as_numpy(b).shape[1]))])
        for _, b, s in clients
    ]
    return np.average(padded_sb, axis=0, weights=weights) @ np.average(padded_a, axis=0, weights=weights)


@st.composite
def rounds(draw: st.DrawFn, dtype: type = np.float64) -> tuple[list, list[float]]:
    """1–12 clients of mixed ranks and α/r or α/√r scalings, random positive weights, numpy or torch."""
    out_f, in_f, n = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    clients = []
    for _ in range(n):
        r = draw(st.integers(1, 8))
        scaling = draw(st.sampled_from([8.0, 16.0])) / (math.sqrt(r) if draw(st.booleans()) else r)
        lora_A = rng.standard_normal((r, in_f)).astype(dtype)
        lora_B = (rng.standard_normal((out_f, r)) * 10 ** rng.uniform(-1, 1)).astype(dtype)
        clients.append(
            (torch.from_numpy(lora_A), lora_B, scaling) if draw(st.booleans()) else (lora_A, lora_B, scaling)
        )
    return clients, draw(st.lists(st.floats(0.01, 1000.0), min_size=n, max_size=n))


@PROPERTY
@given(rounds(), st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_energy_kept_equals_dense_spectrum(rnd: tuple[list, list[float]], ranks: list[int]) -> None:
    # Arrange
    clients, weights = rnd
    energy = np.linalg.svd(dense_mean(clients, weights), compute_uv=False) ** 2
    expected = [float(np.sum(energy[:r]) / np.sum(energy)) for r in ranks]
    # Act
    kept = energy_kept(clients, weights, ranks)
    # Assert
    assert kept == pytest.approx(expected, abs=1e-10)


@PROPERTY
@given(rounds(), st.integers(1, 12))
def test_energy_kept_is_monotone_and_reaches_one(rnd: tuple[list, list[float]], top: int) -> None:
    # Arrange
    clients, weights = rnd
    out_f, in_f = as_numpy(clients[0][1]).shape[0], as_numpy(clients[0][0]).shape[1]
    full_rank = min(out_f, in_f, sum(as_numpy(a).shape[0] for a, _, _ in clients))
    ranks = sorted({*range(1, top + 1), full_rank, full_rank + 5})
    # Act
    kept = energy_kept(clients, weights, ranks)
    # Assert
    assert all(0.0 <= x <= 1.0 + 1e-12 for x in kept)
    assert all(a <= b + 1e-12 for a, b in zip(kept, kept[1:], strict=False))
    assert [x for r, x in zip(ranks, kept, strict=True) if r >= full_rank] == pytest.approx(
        [1.0] * sum(r >= full_rank for r in ranks), abs=1e-12
    )


@PROPERTY
@given(rounds(), st.integers(1, 12))
def test_energy_lost_is_the_svd_rules_relative_error(rnd: tuple[list, list[float]], rank: int) -> None:
    """1 − energy_kept(r) = ‖ΔW̄ − ΔW_r‖²_F / ‖ΔW̄‖²_F for the rank-r share ``svd_reproject`` hands out."""
    # Arrange
    clients, weights = rnd
    dw = dense_mean(clients, weights)
    ((lora_A, lora_B),) = svd_reproject(clients, weights, [(rank, 2.0)])
    lost = np.linalg.norm(dw - 2.0 * as_numpy(lora_B) @ as_numpy(lora_A)) ** 2 / np.linalg.norm(dw) ** 2
    # Act
    (kept,) = energy_kept(clients, weights, [rank])
    # Assert
    assert 1.0 - kept == pytest.approx(lost, abs=1e-9)


@PROPERTY
@given(rounds())
def test_fedavg_error_equals_dense_reference(rnd: tuple[list, list[float]]) -> None:
    # Arrange
    clients, weights = rnd
    dw = dense_mean(clients, weights)
    expected = np.linalg.norm(dw - fedavg_product(clients, weights)) / np.linalg.norm(dw)
    # Act
    error = fedavg_error(clients, weights)
    # Assert
    assert error == pytest.approx(expected, rel=1e-8, abs=1e-12)


@PROPERTY
@given(rounds(dtype=np.float32), st.sampled_from([1e-2, 1e-3, 1e-4]))
def test_fedavg_error_is_accurate_for_float32_inputs_near_agreement(
    rnd: tuple[list, list[float]], spread: float
) -> None:
    """Clients that nearly agree: the error is small and must not drown in float32 cancellation (it once did)."""
    # Arrange
    base, weights = rnd
    lora_A, lora_B, scaling = base[0]
    rng = np.random.default_rng(len(base))
    clients = [
        (
            (as_numpy(lora_A) * (1 + spread * rng.standard_normal(as_numpy(lora_A).shape))).astype(np.float32),
            (as_numpy(lora_B) * (1 + spread * rng.standard_normal(as_numpy(lora_B).shape))).astype(np.float32),
            scaling,
        )
        for _ in base
    ]
    dw = dense_mean(clients, weights)
    expected = np.linalg.norm(dw - fedavg_product(clients, weights)) / np.linalg.norm(dw)
    # Act
    error = fedavg_error(clients, weights)
    # Assert
    assert error == pytest.approx(expected, rel=1e-6, abs=1e-12)


@PROPERTY
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 8), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_fedavg_error_is_zero_for_equal_updates(out_f: int, in_f: int, r: int, n: int, seed: int) -> None:
    # Arrange
    rng = np.random.default_rng(seed)
    lora_A, lora_B = rng.standard_normal((r, in_f)), rng.standard_normal((out_f, r))
    clients = [(lora_A, lora_B * 2.0 / s, float(s)) for s in 10 ** rng.uniform(-1, 1, size=n)]
    # Act
    error = fedavg_error(clients, list(rng.uniform(0.1, 10.0, size=n)))
    # Assert
    assert error <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagnostics_of_all_zero_updates(dtype: torch.dtype) -> None:
    """A fresh LoRA has B = 0: nothing is lost and nothing divides by zero."""
    # Arrange
    clients = [(torch.randn(r, 7, dtype=dtype), torch.zeros(5, r, dtype=dtype), 16.0 / r) for r in (2, 4)]
    # Act
    kept = energy_kept(clients, [1.0, 1.0], [1, 4, 9])
    error = fedavg_error(clients, [1.0, 1.0])
    # Assert
    assert kept == [1.0, 1.0, 1.0]
    assert error == 0.0


@pytest.mark.parametrize("ranks", [[0], [2, -1]])
def test_energy_kept_refuses_ranks_below_one(ranks: list[int]) -> None:
    clients = [(np.ones((2, 3)), np.ones((4, 2)), 1.0)]
    with pytest.raises(ValueError, match=r"ranks\[\d\] must be >= 1, got -?\d"):
        energy_kept(clients, [1.0], ranks)


def test_diagnostics_validate_clients_like_the_rules() -> None:
    clients = [(np.ones((2, 3)), np.ones((4, 2)), 1.0), (np.ones((2, 3)), np.full((4, 2), np.nan), 1.0)]
    with pytest.raises(ValueError, match=r"client 1: lora_B contains non-finite values"):
        fedavg_error(clients, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights must not all be zero"):
        energy_kept(clients[:1], [0.0], [1])


# --- what the stored global keeps when served, and the rank warning ------------------------------------------------


def global_of_rank(rank: int, seed: int = 0, out: int = 12, n_in: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rank, n_in)), rng.normal(size=(out, rank))


def test_served_diagnostics_are_the_dense_spectrum_of_the_stored_global() -> None:
    a, b = global_of_rank(6)
    spectrum = np.linalg.svd(b @ a, compute_uv=False) ** 2
    values = served_diagnostics({"q": (a, b)}, [2, 4])["q"]
    assert values["energy_kept_r2"] == pytest.approx(spectrum[:2].sum() / spectrum.sum())
    assert values["energy_kept_r4"] == pytest.approx(spectrum[:4].sum() / spectrum.sum())
    assert values["min_rank_energy"] == values["energy_kept_r2"]
    assert values["effective_rank"] == 6


def test_a_global_collapsed_below_the_smallest_rank_warns_and_a_healthy_one_does_not() -> None:
    collapsed = served_diagnostics({"q": global_of_rank(1), "v": global_of_rank(8, seed=1)}, [2, 8])
    healthy = served_diagnostics({"q": global_of_rank(8), "v": global_of_rank(8, seed=1)}, [2, 8])
    assert rank_warning(collapsed, [2, 8], 0.05) == (
        "collapse: the global's effective rank in q is 1, below the smallest node rank 2"
    )
    assert rank_warning(healthy, [2, 8], 0.05) == ""
    thin = rank_warning(healthy, [2, 8], 0.9)
    assert thin.startswith("thin: served at rank 2, ") and "of the global's energy (< 90.0%)" in thin
    assert rank_warning({}, [2], 0.05) == "" and rank_warning(healthy, [], 0.05) == ""
