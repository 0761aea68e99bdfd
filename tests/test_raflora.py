"""``raflora`` (arXiv 2602.13486) against a dense float64 transcription, and the rank-collapse measure of every rule.

The transcription materialises every client's s_i B_i A_i (out × in), splits it into its singular components with a
dense LAPACK SVD, weights component c of client i by p_i / Σ_{j: r_j > c} p_j, sums, and truncates with a second
dense SVD: what the rule avoids, sharing no code with it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_aggregation import Round, Truncations, as_numpy, product, rel_error, rounds, truncation_is_unique

from common.config import RunConfig
from common.diagnostics import energy_kept
from common.rules.raflora import RaFLoRA, component_weights, raflora_reproject
from common.rules.registry import RULE_NAMES, get_rule
from common.rules.svd import SVD
from common.updates import AdapterFactors, NodeInfo, TrainReply
from server.global_adapter import GlobalAdapter

PROPERTY = settings(max_examples=40, deadline=None)
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def dense_raflora(clients: list[tuple[object, object, float]], weights: list[float]) -> tuple[np.ndarray, bool]:
    """raFLoRA's ΔW̄ in float64, and whether every client's split into components is unique where weights change."""
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    ranks = [int(as_numpy(a).shape[0]) for a, _, _ in clients]
    total, unique = 0.0, True
    for i, (a, b, s) in enumerate(clients):
        u, sigma, vt = np.linalg.svd(s * (as_numpy(b) @ as_numpy(a)), full_matrices=False)
        k = min(ranks[i], len(sigma))
        holders = [sum(p_j for p_j, r_j in zip(p, ranks, strict=True) if r_j > c) for c in range(k)]
        w = np.array([p[i] / h if h > 0 else 0.0 for h in holders])
        for c in range(k - 1):  # a tie between two components of different weights has no one answer
            if w[c] != w[c + 1] and sigma[c] - sigma[c + 1] <= 1e-6 * max(sigma[0], 1e-300):
                unique = False
        total = total + (u[:, :k] * (w * sigma[:k])) @ vt[:k]
    return np.asarray(total), unique


@PROPERTY
@given(rounds())
def test_raflora_equals_the_dense_float64_transcription(rnd: Round) -> None:
    # Arrange
    dense, unique = dense_raflora(rnd.clients, rnd.weights)
    assume(unique)
    truncated = Truncations(dense)
    # Act
    result = raflora_reproject(rnd.clients, rnd.weights, rnd.targets)
    # Assert
    for pair, (rank, scaling) in zip(result, rnd.targets, strict=True):
        assert tuple(pair[0].shape) == (rank, rnd.in_features) and tuple(pair[1].shape) == (rnd.out_features, rank)
        if truncation_is_unique(truncated.spectrum, rank, rel_gap=1e-6):
            assert rel_error(product(pair, scaling), truncated(rank)) <= 1e-6


@PROPERTY
@given(rounds(max_rank=1), st.integers(1, 8))
def test_with_equal_ranks_it_is_flexloras_plain_average(rnd: Round, rank: int) -> None:
    # Arrange: every client at the same rank (rounds(max_rank=1) draws rank 1; widen them all to ``rank``).
    rng = np.random.default_rng(rank)
    clients = [
        (rng.standard_normal((rank, rnd.in_features)), rng.standard_normal((rnd.out_features, rank)), s)
        for _, _, s in rnd.clients
    ]
    targets = [(rank, 1.0), (rank * len(clients), 1.0)]
    plain = SVD(keep_residual=False)
    # Act
    ours, theirs = RaFLoRA().aggregate(clients, rnd.weights, targets), plain.aggregate(clients, rnd.weights, targets)
    # Assert
    truncated = Truncations(sum(product((a, b), 1.0) for a, b in theirs[-1:]))
    for (mine, other), (r, _) in zip(zip(ours, theirs, strict=True), targets, strict=True):
        if truncation_is_unique(truncated.spectrum, r, rel_gap=1e-6):
            assert rel_error(product(mine, 1.0), product(other, 1.0)) <= 1e-6


@given(st.lists(st.integers(1, 9), min_size=1, max_size=10), st.integers(0, 2**32 - 1))
def test_every_partition_is_averaged_over_the_clients_that_hold_it(ranks: list[int], seed: int) -> None:
    p = torch.tensor(np.random.default_rng(seed).dirichlet(np.ones(len(ranks))), dtype=torch.float64)
    weights = component_weights(ranks, p)
    for c in range(max(ranks)):
        holders = [i for i, r in enumerate(ranks) if r > c]
        assert sum(float(weights[i][c]) for i in holders) == pytest.approx(1.0, abs=1e-12)
        for i in holders:
            assert float(weights[i][c]) == pytest.approx(float(p[i]) / float(sum(p[j] for j in holders)))


# --- rank collapse, round after round -----------------------------------------------------------------------------

MODULES = {"layer.0.query": (16, 12)}  # (out, in)
RANKS = (2, 2, 4, 8)


def served_replies(adapter: GlobalAdapter | None, seed: int = 0) -> list[TrainReply]:
    """Every node sends back exactly what it was served; before the first aggregate, random lora_B and rows of one
    shared lora_A (so that ffa, which needs a shared lora_A, takes them too)."""
    rng = np.random.default_rng(seed)
    shared_a = {m: rng.normal(size=(max(RANKS), n_in)) for m, (_, n_in) in MODULES.items()}
    replies = []
    for i, rank in enumerate(RANKS):
        if adapter is None:
            lora = {m: (shared_a[m][:rank], rng.normal(size=(n_out, rank))) for m, (n_out, _) in MODULES.items()}
        else:
            served = adapter.serve(rank, 1.0)
            assert served is not None
            lora = dict(served.lora)
        lora = {m: (np.asarray(a, np.float32), np.asarray(b, np.float32)) for m, (a, b) in lora.items()}
        replies.append(TrainReply(AdapterFactors(lora, {}), 10, NodeInfo(rank, 1.0, f"n{i}"), {}))
    return replies


def collapse_over_rounds(rule: SVD, rounds_: int) -> list[float]:
    adapter = GlobalAdapter(rule, max(RANKS))
    adapter.aggregate(served_replies(None), list(RANKS))
    shares = []
    for _ in range(rounds_):
        result = adapter.aggregate(served_replies(adapter), list(RANKS))
        shares.append(result.diagnostics["layer.0.query"]["min_rank_energy"])
    return shares


def test_plain_svd_collapses_into_the_smallest_rank_and_raflora_does_not() -> None:
    # Nodes that change nothing: any drift is the rule's own. Under plain FlexLoRA component c of the global is
    # multiplied by Σ_{j: r_j > c} p_j every round (here 1/2 beyond rank 2, 1/4 beyond rank 4).
    plain, ra = collapse_over_rounds(SVD(keep_residual=False), 8), collapse_over_rounds(RaFLoRA(), 8)
    assert all(later > earlier for earlier, later in zip(plain, plain[1:], strict=False))
    assert plain[-1] > 0.999
    assert max(ra) - min(ra) < 1e-5 and ra[-1] < 0.9


def test_min_rank_energy_is_the_globals_share_in_the_smallest_rank_for_every_rule() -> None:
    for name in RULE_NAMES:
        adapter = GlobalAdapter(get_rule(name), max(RANKS))
        result = adapter.aggregate(served_replies(None, seed=3), list(RANKS))
        for module, (a, b) in adapter.lora.items():
            dense = np.asarray(b, np.float64) @ np.asarray(a, np.float64)
            spectrum = np.linalg.svd(dense, compute_uv=False) ** 2
            expected = spectrum[: min(RANKS)].sum() / spectrum.sum()
            assert result.diagnostics[module]["min_rank_energy"] == pytest.approx(expected, rel=1e-5), name
            assert energy_kept([(a, b, 1.0)], [1.0], [min(RANKS)])[0] == pytest.approx(expected, rel=1e-5)


def test_raflora_refuses_central_dp_and_secure_aggregation_with_one_line() -> None:
    with pytest.raises(ValueError, match="dp='central' cannot be combined with rule 'raflora'"):
        RunConfig.from_mapping({"rule": "raflora", "dp": "central", "noise-multiplier": 1.0})
    with pytest.raises(ValueError, match="secure aggregation cannot be combined with rule 'raflora'"):
        RunConfig.from_mapping({"rule": "raflora", "secure-aggregation": True})
