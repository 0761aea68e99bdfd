"""Properties of the aggregation rules, each checked against an independent dense float64 reference.

The reference materialises ΔW̄ = Σ p_i s_i B_i A_i (out × in) in numpy float64 and takes a dense SVD of it (LAPACK's,
through ``torch.linalg.svd``; see :class:`Truncations`): exactly what the rules avoid, so it shares no code with them.
Shapes stay small (the properties do not depend on size) except for one explicit non-square 384 × 1536 case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.rules.factored_svd import svd_reproject
from common.rules.fedavg import fedavg_zero_pad
from common.rules.ffa import ffa

Array = np.ndarray
PROPERTY = settings(max_examples=30, deadline=None)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --- the independent reference -------------------------------------------------------------------------------------


def as_numpy(x: object) -> Array:
    """float64 numpy copy of a numpy array or tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def dense_mean(clients: list[tuple[object, object, float]], weights: list[float]) -> Array:
    """ΔW̄ = Σ p_i s_i B_i A_i, materialised in float64."""
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return sum(p_i * s * (as_numpy(b) @ as_numpy(a)) for p_i, (a, b, s) in zip(p, clients, strict=True))


class Truncations:
    """Best rank-r approximations of ``dw`` from one dense float64 SVD."""

    def __init__(self, dw: Array) -> None:
        # LAPACK through torch, which the module fixture holds to one thread: numpy's OpenBLAS cannot be, and on a
        # busy machine its threads stalled the 384 × 1536 case for 9 s (0.4 s here, on the faster tall orientation).
        wide = dw.shape[0] < dw.shape[1]
        u, spectrum, vt = (
            t.numpy() for t in torch.linalg.svd(torch.from_numpy(dw.T if wide else dw), full_matrices=False)
        )
        self.u, self.spectrum, self.vt = (vt.T, spectrum, u.T) if wide else (u, spectrum, vt)

    def __call__(self, rank: int) -> Array:
        k = min(rank, len(self.spectrum))
        return (self.u[:, :k] * self.spectrum[:k]) @ self.vt[:k]


def truncation_is_unique(spectrum: Array, rank: int, rel_gap: float) -> bool:
    """True when the rank-``rank`` truncation is well defined: σ_r and σ_{r+1} are apart (or σ_{r+1} ≈ 0)."""
    if rank >= len(spectrum) or spectrum[0] == 0.0:
        return True
    return bool(spectrum[rank] <= 1e-9 * spectrum[0] or spectrum[rank - 1] - spectrum[rank] > rel_gap * spectrum[0])


def product(pair: tuple[torch.Tensor, torch.Tensor], scaling: float) -> Array:
    """s·B·A of a returned ``(lora_A, lora_B)`` pair, in float64."""
    lora_A, lora_B = pair
    return scaling * (as_numpy(lora_B) @ as_numpy(lora_A))


def rel_error(x: Array, reference: Array) -> float:
    scale = np.linalg.norm(reference)
    return float(np.linalg.norm(x - reference) / scale) if scale > 0 else float(np.linalg.norm(x))


# --- random rounds ---------------------------------------------------------------------------------------------------


@dataclass
class Round:
    """One module's inputs: clients ``(lora_A, lora_B, scaling)``, weights, and ``(rank, scaling)`` targets."""

    out_features: int
    in_features: int
    clients: list[tuple[object, object, float]]
    weights: list[float]
    targets: list[tuple[int, float]]


def peft_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def make_factors(rng: np.random.Generator, out_f: int, in_f: int, r: int, dtype: type, kind: str) -> tuple:
    """Kaiming-like A and a trained-looking B of a random magnitude, as numpy or torch."""
    lora_A = (rng.standard_normal((r, in_f)) / math.sqrt(in_f)).astype(dtype)
    lora_B = (rng.standard_normal((out_f, r)) * 10 ** rng.uniform(-1, 1)).astype(dtype)
    if kind == "torch":
        return torch.from_numpy(lora_A), torch.from_numpy(lora_B)
    return lora_A, lora_B


@st.composite
def rounds(draw: st.DrawFn, dtype: type = np.float64, max_dim: int = 24, max_rank: int = 8) -> Round:
    """1–12 clients of mixed ranks and α/r or α/√r scalings, random weights, numpy or torch inputs."""
    out_f = draw(st.integers(1, max_dim))
    in_f = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, 12))
    ranks = draw(st.lists(st.integers(1, max_rank), min_size=n, max_size=n))
    alphas = draw(st.lists(st.sampled_from([1.0, 8.0, 16.0, 32.0]), min_size=n, max_size=n))
    rslora = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    kinds = draw(st.lists(st.sampled_from(["numpy", "torch"]), min_size=n, max_size=n))
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.01, 1000.0)), min_size=n, max_size=n))
    weights[draw(st.integers(0, n - 1))] = draw(st.floats(0.01, 1000.0))  # at least one positive weight
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scalings = [peft_scaling(a, r, rs) for a, r, rs in zip(alphas, ranks, rslora, strict=True)]
    clients = [
        (*make_factors(rng, out_f, in_f, r, dtype, kind), s) for r, s, kind in zip(ranks, scalings, kinds, strict=True)
    ]
    extra = (draw(st.integers(1, sum(ranks) + 3)), peft_scaling(draw(st.sampled_from([2.0, 16.0])), 4, False))
    return Round(out_f, in_f, clients, weights, [*zip(ranks, scalings, strict=True), extra])


def check_shapes(result: list, targets: list[tuple[int, float]], out_f: int, in_f: int) -> None:
    assert len(result) == len(targets)
    for (lora_A, lora_B), (rank, _) in zip(result, targets, strict=True):
        assert tuple(lora_A.shape) == (rank, in_f)
        assert tuple(lora_B.shape) == (out_f, rank)


# --- svd_reproject ---------------------------------------------------------------------------------------------------


@PROPERTY
@given(rounds())
def test_svd_equals_truncated_svd_of_dense_mean(rnd: Round) -> None:
    # Arrange
    truncated = Truncations(dense_mean(rnd.clients, rnd.weights))
    # Act
    result = svd_reproject(rnd.clients, rnd.weights, rnd.targets)
    # Assert
    check_shapes(result, rnd.targets, rnd.out_features, rnd.in_features)
    for pair, (rank, scaling) in zip(result, rnd.targets, strict=True):
        if truncation_is_unique(truncated.spectrum, rank, rel_gap=1e-6):
            assert rel_error(product(pair, scaling), truncated(rank)) <= 1e-6


@PROPERTY
@given(rounds(dtype=np.float32))
def test_svd_float32_equals_float64_reference(rnd: Round) -> None:
    # Arrange: the reference sees the same float32 values, widened.
    truncated = Truncations(dense_mean(rnd.clients, rnd.weights))
    # Act
    result = svd_reproject(rnd.clients, rnd.weights, rnd.targets)
    # Assert
    assert all(pair[0].dtype == torch.float32 and pair[1].dtype == torch.float32 for pair in result)
    for pair, (rank, scaling) in zip(result, rnd.targets, strict=True):
        if truncation_is_unique(truncated.spectrum, rank, rel_gap=1e-2):
            assert rel_error(product(pair, scaling), truncated(rank)) <= 1e-4


@PROPERTY
@given(rounds())
def test_svd_error_is_the_spectral_tail(rnd: Round) -> None:
    """Eckart–Young: ‖ΔW̄ − ΔW_r‖²_F = Σ_{k>r} σ_k² and ‖ΔW̄ − ΔW_r‖_2 = σ_{r+1}, whatever the ties."""
    # Arrange
    dw = dense_mean(rnd.clients, rnd.weights)
    spectrum = np.linalg.svd(dw, compute_uv=False)
    scale = max(spectrum[0], 1e-300)
    # Act
    result = svd_reproject(rnd.clients, rnd.weights, rnd.targets)
    # Assert
    for pair, (rank, scaling) in zip(result, rnd.targets, strict=True):
        residual = dw - product(pair, scaling)
        tail = spectrum[rank:]
        assert np.linalg.norm(residual) == pytest.approx(np.sqrt(np.sum(tail**2)), abs=1e-9 * scale)
        assert np.linalg.norm(residual, 2) == pytest.approx(tail[0] if len(tail) else 0.0, abs=1e-9 * scale)


@PROPERTY
@given(rounds(), st.randoms(use_true_random=False))
def test_svd_order_of_clients_does_not_matter(rnd: Round, random: object) -> None:
    # Arrange
    order = list(range(len(rnd.clients)))
    random.shuffle(order)  # type: ignore[attr-defined]
    spectrum = np.linalg.svd(dense_mean(rnd.clients, rnd.weights), compute_uv=False)
    # Act
    forward = svd_reproject(rnd.clients, rnd.weights, rnd.targets)
    shuffled = svd_reproject([rnd.clients[i] for i in order], [rnd.weights[i] for i in order], rnd.targets)
    # Assert
    for x, y, (rank, scaling) in zip(forward, shuffled, rnd.targets, strict=True):
        if truncation_is_unique(spectrum, rank, rel_gap=1e-6):
            assert rel_error(product(y, scaling), product(x, scaling)) <= 1e-6


@PROPERTY
@given(
    st.integers(1, 24),
    st.integers(1, 24),
    st.integers(1, 8),
    st.floats(0.01, 1000.0),
    st.sampled_from([0.25, 1.0, 16.0 / math.sqrt(8)]),
    st.sampled_from([0.5, 2.0, 16.0]),
    st.sampled_from(["numpy", "torch"]),
    st.integers(0, 2**32 - 1),
)
def test_svd_one_client_at_its_own_rank_reproduces_itself(
    out_f: int, in_f: int, r: int, weight: float, scaling: float, target_scaling: float, kind: str, seed: int
) -> None:
    # Arrange
    lora_A, lora_B = make_factors(np.random.default_rng(seed), out_f, in_f, r, np.float64, kind)
    own = scaling * (as_numpy(lora_B) @ as_numpy(lora_A))
    # Act
    ((new_A, new_B),) = svd_reproject([(lora_A, lora_B, scaling)], [weight], [(r, target_scaling)])
    # Assert
    assert rel_error(product((new_A, new_B), target_scaling), own) <= 1e-6


@PROPERTY
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_svd_equal_updates_average_to_themselves(out_f: int, in_f: int, r: int, n: int, seed: int) -> None:
    """n clients send the same ΔW in different factorisations: rescaled factors, other scalings, padded ranks."""
    # Arrange
    rng = np.random.default_rng(seed)
    lora_A, lora_B = make_factors(rng, out_f, in_f, r, np.float64, "numpy")
    own = 2.0 * lora_B @ lora_A
    clients = []
    for _ in range(n):
        c, s, pad = 10 ** rng.uniform(-1, 1), 10 ** rng.uniform(-1, 1), int(rng.integers(0, 3))
        padded_A = np.vstack([c * lora_A, rng.standard_normal((pad, in_f))])  # extra rows meet zero columns of B
        padded_B = np.hstack([lora_B * 2.0 / (c * s), np.zeros((out_f, pad))])
        clients.append((padded_A, padded_B, s))
    weights = list(rng.uniform(0.1, 10.0, size=n))
    # Act
    ((new_A, new_B),) = svd_reproject(clients, weights, [(r, 0.5)])
    # Assert
    assert rel_error(product((new_A, new_B), 0.5), own) <= 1e-6


def test_svd_non_square_384_by_1536_is_not_transposed() -> None:
    """An SVD aggregator that returned the transposed update shipped elsewhere (APPFL PR #398)."""
    # Arrange
    rng = np.random.default_rng(384)
    ranks, alphas, rslora = [4, 8, 16, 32], [8.0, 16.0, 16.0, 64.0], [False, True, False, True]
    clients = [
        (*make_factors(rng, 384, 1536, r, np.float64, kind), peft_scaling(a, r, rs))
        for r, a, rs, kind in zip(ranks, alphas, rslora, ["numpy", "torch", "numpy", "torch"], strict=True)
    ]
    weights = [120.0, 30.0, 75.0, 5.0]
    targets = [(r, peft_scaling(16.0, r, False)) for r in ranks]
    narrow = [(as_numpy(a).astype(np.float32), as_numpy(b).astype(np.float32), s) for a, b, s in clients]
    truncated, truncated_narrow = Truncations(dense_mean(clients, weights)), Truncations(dense_mean(narrow, weights))
    # Act
    result = svd_reproject(clients, weights, targets)
    result_narrow = svd_reproject(narrow, weights, targets)
    # Assert
    check_shapes(result, targets, 384, 1536)
    for pair, pair_narrow, (rank, scaling) in zip(result, result_narrow, targets, strict=True):
        assert product(pair, scaling).shape == (384, 1536)
        assert rel_error(product(pair, scaling), truncated(rank)) <= 1e-6
        assert rel_error(product(pair_narrow, scaling), truncated_narrow(rank)) <= 1e-4


@PROPERTY
@given(rounds(max_dim=12, max_rank=4), st.integers(1, 8))
def test_svd_target_rank_beyond_the_spectrum_is_zero_padded(rnd: Round, extra: int) -> None:
    # Arrange
    dw = dense_mean(rnd.clients, rnd.weights)
    top = min(rnd.out_features, rnd.in_features, sum(int(as_numpy(a).shape[0]) for a, _, _ in rnd.clients))
    targets = [(top + extra, 1.0)]
    # Act
    ((lora_A, lora_B),) = svd_reproject(rnd.clients, rnd.weights, targets)
    # Assert
    check_shapes([(lora_A, lora_B)], targets, rnd.out_features, rnd.in_features)
    assert torch.all(lora_A[top:] == 0) and torch.all(lora_B[:, top:] == 0)
    assert rel_error(product((lora_A, lora_B), 1.0), dw) <= 1e-6


# --- every rule ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [svd_reproject, fedavg_zero_pad, ffa])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_zero_updates_return_zeros(rule: object, dtype: torch.dtype) -> None:
    """A fresh LoRA has B = 0; nothing may divide by its norm."""
    # Arrange
    lora_A = torch.randn(8, 20, dtype=dtype)
    clients = [(lora_A[:r].clone(), torch.zeros(12, r, dtype=dtype), 16.0 / r) for r in (2, 4, 8)]
    targets = [(2, 8.0), (8, 2.0), (16, 1.0)]
    # Act
    result = rule(clients, [1.0, 2.0, 3.0], targets)  # type: ignore[operator]
    # Assert
    check_shapes(result, targets, 12, 20)
    for (new_A, new_B), (_, scaling) in zip(result, targets, strict=True):
        assert torch.isfinite(new_A).all() and torch.isfinite(new_B).all()
        assert np.array_equal(product((new_A, new_B), scaling), np.zeros((12, 20)))


@pytest.mark.parametrize("rule", [svd_reproject, fedavg_zero_pad, ffa])
def test_numpy_and_torch_inputs_give_the_same_result(rule: object) -> None:
    # Arrange
    rng = np.random.default_rng(7)
    lora_A = rng.standard_normal((6, 9))
    as_np = [(lora_A[:r], rng.standard_normal((5, r)), 4.0 / r) for r in (2, 6)]
    as_torch = [(torch.from_numpy(a), torch.from_numpy(b), s) for a, b, s in as_np]
    targets = [(2, 2.0), (6, 1.0)]
    # Act
    from_np = rule(as_np, [3.0, 1.0], targets)  # type: ignore[operator]
    from_torch = rule(as_torch, [3.0, 1.0], targets)  # type: ignore[operator]
    # Assert
    for (a1, b1), (a2, b2) in zip(from_np, from_torch, strict=True):
        assert isinstance(a1, torch.Tensor) and a1.dtype == torch.float64
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


# --- fedavg_zero_pad -------------------------------------------------------------------------------------------------


def pad_to(x: Array, rows: int | None = None, cols: int | None = None) -> Array:
    """Zero-pad (or cut) ``x`` to ``rows`` rows or ``cols`` columns."""
    if rows is not None:
        x = np.vstack([x[:rows], np.zeros((max(0, rows - x.shape[0]), x.shape[1]))])
    if cols is not None:
        x = np.hstack([x[:, :cols], np.zeros((x.shape[0], max(0, cols - x.shape[1])))])
    return x


def fedavg_reference(rnd: Round) -> tuple[Array, Array]:
    """(Ā, sB̄) from ``np.average`` over factors zero-padded to the largest rank."""
    r_max = max(as_numpy(a).shape[0] for a, _, _ in rnd.clients)
    a_mean = np.average([pad_to(as_numpy(a), rows=r_max) for a, _, _ in rnd.clients], axis=0, weights=rnd.weights)
    sb = [s * pad_to(as_numpy(b), cols=r_max) for _, b, s in rnd.clients]
    return a_mean, np.average(sb, axis=0, weights=rnd.weights)


@PROPERTY
@given(rounds())
def test_fedavg_equals_np_average_of_padded_factors(rnd: Round) -> None:
    # Arrange
    a_mean, sb_mean = fedavg_reference(rnd)
    # Act
    result = fedavg_zero_pad(rnd.clients, rnd.weights, rnd.targets)
    # Assert
    check_shapes(result, rnd.targets, rnd.out_features, rnd.in_features)
    for (lora_A, lora_B), (rank, scaling) in zip(result, rnd.targets, strict=True):
        np.testing.assert_allclose(as_numpy(lora_A), pad_to(a_mean, rows=rank), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(scaling * as_numpy(lora_B), pad_to(sb_mean, cols=rank), rtol=1e-10, atol=1e-12)


@PROPERTY
@given(rounds(), st.randoms(use_true_random=False))
def test_fedavg_order_of_clients_does_not_matter(rnd: Round, random: object) -> None:
    # Arrange
    order = list(range(len(rnd.clients)))
    random.shuffle(order)  # type: ignore[attr-defined]
    # Act
    forward = fedavg_zero_pad(rnd.clients, rnd.weights, rnd.targets)
    shuffled = fedavg_zero_pad([rnd.clients[i] for i in order], [rnd.weights[i] for i in order], rnd.targets)
    # Assert
    for (a1, b1), (a2, b2) in zip(forward, shuffled, strict=True):
        torch.testing.assert_close(a2, a1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b2, b1, rtol=1e-12, atol=1e-14)


@PROPERTY
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 8), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_fedavg_equal_updates_average_to_themselves(out_f: int, in_f: int, r: int, n: int, seed: int) -> None:
    """Same lora_A and same s·lora_B under different scalings: the average is that update."""
    # Arrange
    rng = np.random.default_rng(seed)
    lora_A, lora_B = make_factors(rng, out_f, in_f, r, np.float64, "numpy")
    scalings = 10 ** rng.uniform(-1, 1, size=n)
    clients = [(lora_A, lora_B * 2.0 / s, float(s)) for s in scalings]
    # Act
    ((new_A, new_B),) = fedavg_zero_pad(clients, list(rng.uniform(0.1, 10.0, size=n)), [(r, 2.0)])
    # Assert
    np.testing.assert_allclose(as_numpy(new_A), lora_A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(as_numpy(new_B), lora_B, rtol=1e-10, atol=1e-12)


# --- ffa -------------------------------------------------------------------------------------------------------------


@st.composite
def ffa_rounds(draw: st.DrawFn) -> Round:
    """A round whose clients share one frozen lora_A (leading slices of it for lower ranks)."""
    rnd = draw(rounds())
    r_max = max(as_numpy(a).shape[0] for a, _, _ in rnd.clients)
    shared = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((r_max, rnd.in_features))
    clients = []
    for lora_A, lora_B, s in rnd.clients:
        frozen = shared[: as_numpy(lora_A).shape[0]]
        clients.append((torch.from_numpy(frozen) if isinstance(lora_A, torch.Tensor) else frozen, lora_B, s))
    return Round(rnd.out_features, rnd.in_features, clients, rnd.weights, rnd.targets)


@PROPERTY
@given(ffa_rounds())
def test_ffa_is_the_exact_mean_restricted_to_the_target_rank(rnd: Round) -> None:
    """With one frozen A, target r_j gets Σ p_i s_i B_i[:, :r_j] A[:r_j]: the exact ΔW̄ once r_j ≥ r_max."""
    # Arrange
    r_max = max(as_numpy(a).shape[0] for a, _, _ in rnd.clients)
    shared = next(as_numpy(a) for a, _, _ in rnd.clients if as_numpy(a).shape[0] == r_max)
    dw = dense_mean(rnd.clients, rnd.weights)
    # Act
    result = ffa(rnd.clients, rnd.weights, rnd.targets)
    # Assert
    check_shapes(result, rnd.targets, rnd.out_features, rnd.in_features)
    for (lora_A, lora_B), (rank, scaling) in zip(result, rnd.targets, strict=True):
        kept = [(a[:rank], as_numpy(b)[:, :rank], s) for a, b, s in ((as_numpy(a), b, s) for a, b, s in rnd.clients)]
        np.testing.assert_allclose(as_numpy(lora_A), pad_to(shared, rows=rank), rtol=0, atol=0)
        assert rel_error(product((lora_A, lora_B), scaling), dense_mean(kept, rnd.weights)) <= 1e-10
        if rank >= r_max:
            assert rel_error(product((lora_A, lora_B), scaling), dw) <= 1e-10


@PROPERTY
@given(ffa_rounds(), st.randoms(use_true_random=False))
def test_ffa_order_of_clients_does_not_matter(rnd: Round, random: object) -> None:
    # Arrange
    order = list(range(len(rnd.clients)))
    random.shuffle(order)  # type: ignore[attr-defined]
    # Act
    forward = ffa(rnd.clients, rnd.weights, rnd.targets)
    shuffled = ffa([rnd.clients[i] for i in order], [rnd.weights[i] for i in order], rnd.targets)
    # Assert
    for (a1, b1), (a2, b2) in zip(forward, shuffled, strict=True):
        torch.testing.assert_close(a2, a1, rtol=0, atol=0)
        torch.testing.assert_close(b2, b1, rtol=1e-12, atol=1e-14)


@PROPERTY
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 8), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_ffa_equal_updates_average_to_themselves(out_f: int, in_f: int, r: int, n: int, seed: int) -> None:
    # Arrange
    rng = np.random.default_rng(seed)
    lora_A, lora_B = make_factors(rng, out_f, in_f, r, np.float64, "torch")
    clients = [(lora_A, lora_B * 2.0 / s, float(s)) for s in 10 ** rng.uniform(-1, 1, size=n)]
    # Act
    ((new_A, new_B),) = ffa(clients, list(rng.uniform(0.1, 10.0, size=n)), [(r, 2.0)])
    # Assert
    assert torch.equal(new_A, lora_A)
    torch.testing.assert_close(new_B, lora_B, rtol=1e-10, atol=1e-12)
