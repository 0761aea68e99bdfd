"""The robust rules (``rfa``, ``multikrum``), ``norm-bound`` and ``weighting`` against dense float64 references.

The references materialise every node's change Δ_i (each module's s_i B_i A_i − T_i as an out × in matrix, and the
head) as one long float64 vector and run Weiszfeld and Krum on those vectors directly: what the rules avoid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.config import RunConfig
from common.rules.robust import (
    RFA,
    WEISZFELD_ITERATIONS,
    WEISZFELD_RTOL,
    MultiKrum,
    krum_selection,
    squared_distances,
    weiszfeld_weights,
)
from common.rules.svd import SVD
from common.updates import AdapterFactors, NodeInfo, TrainReply
from server.global_adapter import GlobalAdapter
from server.norm_bound import bounded_replies
from server.weighting import aggregation_weights

PROPERTY = settings(max_examples=25, deadline=None)
pytestmark = pytest.mark.usefixtures("single_torch_thread")
MODULES = {"q": (7, 5), "v": (6, 5)}  # (out, in)
STORE = 64  # above every rank a round here can reach: no truncation, so references need no SVD


def reply(rng: np.random.Generator, rank: int, served: AdapterFactors | None, size: float, name: str) -> TrainReply:
    lora = {}
    for module, (n_out, n_in) in MODULES.items():
        a0, b0 = served.lora[module] if served else (rng.normal(size=(rank, n_in)), np.zeros((n_out, rank)))
        a = a0 + size * rng.normal(size=a0.shape)
        b = b0 + size * rng.normal(size=b0.shape)
        lora[module] = (a.astype(np.float32), b.astype(np.float32))
    head = {"head.weight": rng.normal(size=(3, 4)).astype(np.float32) * size}
    return TrainReply(AdapterFactors(lora, head), int(rng.integers(1, 100)), NodeInfo(rank, 2.0 / rank, name))


def started(rng: np.random.Generator, rule: SVD) -> GlobalAdapter:
    adapter = GlobalAdapter(rule, STORE)
    adapter.aggregate([reply(rng, 4, None, 1.0, "seed")], [4])
    return adapter


def dense_changes(adapter: GlobalAdapter, replies: list[TrainReply]) -> np.ndarray:
    """Every Δ_i as one float64 row: each module's s·B·A − s·B_s·A_s, then the head."""
    rows = []
    for r in replies:
        served = adapter.serve(r.node.rank, r.node.scaling)
        parts = []
        for module in sorted(MODULES):
            a, b = (np.asarray(x, np.float64) for x in r.adapter.lora[module])
            a_s, b_s = (np.asarray(x, np.float64) for x in served.lora[module]) if served else (a, 0 * b)
            parts.append((r.node.scaling * (b @ a - b_s @ a_s)).ravel())
        parts += [np.asarray(r.adapter.head[k], np.float64).ravel() for k in sorted(r.adapter.head)]
        rows.append(np.concatenate(parts))
    return np.array(rows)


def dense_weiszfeld(points: np.ndarray, p: np.ndarray, nu: float) -> tuple[np.ndarray, np.ndarray]:
    """Weiszfeld on the vectors themselves, with the rule's smoothing ν, stop test and step limit; returns the
    median and its weights β."""
    beta = p / p.sum()
    for _ in range(WEISZFELD_ITERATIONS):
        z = beta @ points
        w = p / np.maximum(np.linalg.norm(points - z, axis=1), nu)
        new = w / w.sum()
        done = np.abs(new - beta).max() <= WEISZFELD_RTOL
        beta = new
        if done:
            break
    best = min(range(len(points)), key=lambda k: objective(points, p, points[k]))
    if objective(points, p, points[best]) < objective(points, p, beta @ points):
        beta = np.eye(len(points))[best]
    return beta @ points, beta


def objective(points: np.ndarray, p: np.ndarray, z: np.ndarray) -> float:
    return float(p @ np.linalg.norm(points - z, axis=1))


@st.composite
def rounds(draw: st.DrawFn) -> tuple[np.random.Generator, list[int], list[float]]:
    n = draw(st.integers(3, 8))
    ranks = draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=n, max_size=n))
    sizes = draw(st.lists(st.sampled_from([0.01, 0.1, 1.0, 30.0]), min_size=n, max_size=n))
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))), ranks, sizes


@PROPERTY
@given(rounds())
def test_rfa_is_the_dense_geometric_median_of_the_changes(rnd: tuple) -> None:
    rng, ranks, sizes = rnd
    adapter = started(rng, RFA())
    served = [adapter.serve(r, 2.0 / r) for r in ranks]
    replies = [reply(rng, r, s, z, f"n{i}") for i, (r, s, z) in enumerate(zip(ranks, served, sizes, strict=True))]
    points = dense_changes(adapter, replies)
    counts = np.array([float(r.num_examples) for r in replies])
    p = np.minimum(counts, np.median(counts))  # no node's say above the median node's
    spread = math.sqrt(float(squared_distances(points @ points.T).max()))
    assume(spread > 1e-6 * np.abs(points).max())
    median, _ = dense_weiszfeld(points, p, 1e-6 * spread)
    before = {m: np.asarray(b, np.float64) @ np.asarray(a, np.float64) for m, (a, b) in adapter.lora.items()}
    # Act
    adapter.aggregate(replies, sorted(set(ranks)))
    # Assert: the new global is G + the geometric median of the changes, module by module, and the head too.
    offset = 0
    for module in sorted(MODULES):
        n_out, n_in = MODULES[module]
        z = median[offset : offset + n_out * n_in].reshape(n_out, n_in)
        offset += n_out * n_in
        a, b = adapter.lora[module]
        got = np.asarray(b, np.float64) @ np.asarray(a, np.float64)
        assert np.linalg.norm(got - before[module] - z) <= 1e-5 * max(np.linalg.norm(z), np.linalg.norm(got))
    head = median[offset:].reshape(3, 4)
    assert np.abs(adapter.head["head.weight"] - head).max() <= 1e-5 * max(1.0, np.abs(head).max())
    # ... and it is a geometric median: no data point, nor the mean, has a lower sum of distances.
    best = min(objective(points, p, x) for x in [*points, p @ points / p.sum()])
    assert objective(points, p, median) <= best * (1 + 1e-9)


@PROPERTY
@given(rounds(), st.integers(0, 3))
def test_multikrum_keeps_the_nodes_a_dense_krum_keeps(rnd: tuple, f: int) -> None:
    rng, ranks, sizes = rnd
    adapter = started(rng, MultiKrum(byzantine_nodes=f))
    served = [adapter.serve(r, 2.0 / r) for r in ranks]
    replies = [reply(rng, r, s, z, f"n{i}") for i, (r, s, z) in enumerate(zip(ranks, served, sizes, strict=True))]
    points = dense_changes(adapter, replies)
    n = len(replies)
    d2 = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    k = max(1, n - f - 2)
    scores = np.array([np.sort(np.delete(d2[i], i))[:k].sum() for i in range(n)])
    order = np.sort(scores)
    assume(n - f >= n or order[max(1, n - f) - 1] < order[max(1, n - f)] * (1 - 1e-6))  # no tie at the cut
    expected = set(np.argsort(scores)[: max(1, n - f)].tolist())
    # Act
    got_scores, kept = krum_selection(points @ points.T, f)
    # Assert
    assert set(kept.tolist()) == expected
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6, atol=1e-9 * scores.max())


def test_multikrum_leaves_a_far_node_out_and_says_so() -> None:
    rng = np.random.default_rng(5)
    adapter = started(rng, MultiKrum(byzantine_nodes=1))
    replies = [reply(rng, 4, adapter.serve(4, 0.5), 0.1, f"n{i}") for i in range(4)]
    replies.append(reply(rng, 4, adapter.serve(4, 0.5), 50.0, "attacker"))
    result = adapter.aggregate(replies, [4])
    assert any("multikrum (f = 1) left out attacker" in line for line in result.notes)


# --- norm-bound --------------------------------------------------------------------------------------------------


@PROPERTY
@given(rounds(), st.sampled_from(["median", "fixed"]))
def test_norm_bound_scales_every_change_down_to_the_bound_and_leaves_the_rest(rnd: tuple, mode: str) -> None:
    rng, ranks, sizes = rnd
    adapter = started(rng, SVD())
    served = [adapter.serve(r, 2.0 / r) for r in ranks]
    replies = [reply(rng, r, s, z, f"n{i}") for i, (r, s, z) in enumerate(zip(ranks, served, sizes, strict=True))]
    norms = np.linalg.norm(dense_changes(adapter, [_no_head(r) for r in replies]), axis=1)
    bound = float(np.median(norms)) if mode == "median" else 0.5
    # Act
    out, notes = bounded_replies(replies, served, None, mode, 0.5)
    # Assert
    after = np.linalg.norm(dense_changes(adapter, [_no_head(r) for r in out]), axis=1)
    for before_norm, after_norm, old, new in zip(norms, after, replies, out, strict=True):
        if before_norm <= bound:
            assert new is old
        else:
            assert after_norm <= bound * (1 + 1e-5) and after_norm >= bound * (1 - 1e-4)
            assert all(new.adapter.lora[m][0].shape == old.adapter.lora[m][0].shape for m in MODULES)
    assert len(notes) == int(np.sum(norms > bound))


def _no_head(r: TrainReply) -> TrainReply:
    return TrainReply(AdapterFactors(r.adapter.lora, {}), r.num_examples, r.node)


def test_norm_bound_cuts_a_huge_head_change_to_the_rounds_median() -> None:
    rng = np.random.default_rng(2)
    adapter = started(rng, SVD())
    replies = [reply(rng, 4, adapter.serve(4, 0.5), 0.1, f"n{i}") for i in range(4)]
    bad = replies[3]
    huge = {k: v * 1e6 for k, v in bad.adapter.head.items()}
    replies[3] = TrainReply(AdapterFactors(bad.adapter.lora, huge), bad.num_examples, bad.node)
    changes = [np.linalg.norm(r.adapter.head["head.weight"] - adapter.head["head.weight"]) for r in replies]
    out, notes = bounded_replies(replies, [adapter.serve(4, 0.5)] * 4, adapter.head, "median", 1.0)
    after = np.linalg.norm(out[3].adapter.head["head.weight"] - adapter.head["head.weight"])
    assert after == pytest.approx(np.median(changes), rel=1e-5)
    assert "head change scaled" in notes[-1]


# --- weighting -----------------------------------------------------------------------------------------------------


def test_an_inflated_count_is_capped_at_the_median_multiple_and_at_the_first_count() -> None:
    registered: dict[int, int] = {}
    weights, notes = aggregation_weights({1: 100, 2: 120, 3: 10_000_000, 4: 90}, "examples-capped", 3.0, registered)
    assert weights == {1: 100.0, 2: 120.0, 3: 3.0 * 110, 4: 90.0}
    assert notes == ["node 3 claims 10000000 examples, weighted as 330 (3 × the round's median; weighting = "
                     "examples-capped)"]  # fmt: skip
    # The next round node 1 claims more than it did: its first count holds.
    weights, notes = aggregation_weights({1: 115, 2: 120, 4: 90}, "examples-capped", 3.0, registered)
    assert weights[1] == 100.0 and "its first count" in notes[0]
    assert aggregation_weights({1: 5, 2: 7}, "uniform", 3.0, {})[0] == {1: 1.0, 2: 1.0}
    assert aggregation_weights({1: 5, 2: 7}, "examples", 3.0, {})[0] == {1: 5.0, 2: 7.0}


def test_rfa_gives_no_node_more_say_than_the_median_node_whatever_its_weight() -> None:
    """Eight changes spread as a non-IID round's are (orthogonal, the same norm), one of them claiming 3 median
    shares (the most examples-capped lets through): trusted, that weight pulls 41 % of the median to the claimant;
    capped at the median weight, it weighs as every other node."""
    points = np.eye(8)
    gram, p = points @ points.T, np.array([1.0] * 7 + [3.0])
    trusting, _ = weiszfeld_weights(gram, p)
    capped = RFA().robust_weights(gram, p, [f"n{i}" for i in range(8)])
    assert trusting[7] > 0.4
    np.testing.assert_allclose(capped, np.full(8, 1 / 8), atol=1e-6)


def test_robust_rules_refuse_central_dp_and_secure_aggregation() -> None:
    for rule in ("rfa", "multikrum"):
        with pytest.raises(ValueError, match=f"dp='central' cannot be combined with rule '{rule}'"):
            RunConfig.from_mapping({"rule": rule, "dp": "central", "noise-multiplier": 1.0})
        with pytest.raises(ValueError, match=f"secure aggregation cannot be combined with rule '{rule}'"):
            RunConfig.from_mapping({"rule": rule, "secure-aggregation": True})
    assert RunConfig.from_mapping({"rule": "multikrum", "byzantine-nodes": 2}).robustness.byzantine_nodes == 2
