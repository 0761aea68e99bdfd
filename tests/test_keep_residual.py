"""``keep-residual``: the ``svd`` average with each node's term completed by what its rank could not hold."""

from __future__ import annotations

import numpy as np

from common.config import RunConfig
from common.rules.svd import SVD
from common.updates import AdapterFactors, NodeInfo, TrainReply
from server.global_adapter import GlobalAdapter

MODULES = {"layer.0.query": (12, 10), "layer.0.value": (12, 10)}  # (out, in)
STORE_RANK = 8
SMALL = {"max-rank": STORE_RANK, "node-ranks": "2,8"}


def scaling(rank: int) -> float:
    return 16.0 / rank


def reply(rank: int, seed: int, start: GlobalAdapter | None = None, change: float = 0.1, n: int = 10) -> TrainReply:
    """A node's reply: what it was served (or random factors in round 1) plus a random change of size ``change``."""
    rng = np.random.default_rng(seed)
    served = start.serve(rank, scaling(rank)) if start is not None else None
    lora = {}
    for module, (out_f, in_f) in MODULES.items():
        if served is not None:
            a0, b0 = served.lora[module]
        else:
            a0, b0 = rng.normal(size=(rank, in_f)), rng.normal(size=(out_f, rank))
        a = a0 + change * rng.normal(size=(rank, in_f))
        b = b0 + change * rng.normal(size=(out_f, rank))
        lora[module] = (a.astype(np.float32), b.astype(np.float32))
    head = {"head.weight": rng.normal(size=(3, 12)).astype(np.float32)}
    return TrainReply(AdapterFactors(lora, head), n, NodeInfo(rank, scaling(rank), f"n{seed}"), {})


def products(adapter: GlobalAdapter) -> dict[str, np.ndarray]:
    return {m: b.astype(np.float64) @ a.astype(np.float64) for m, (a, b) in adapter.lora.items()}


def started(keep_residual: bool, rank: int = 8) -> GlobalAdapter:
    """A global adapter after round 1: one node's rank-``rank`` update."""
    adapter = GlobalAdapter(SVD(keep_residual=keep_residual), STORE_RANK)
    adapter.aggregate([reply(rank, seed=0)], [2])
    return adapter


def test_a_low_rank_node_that_changed_nothing_leaves_the_global_as_it_was() -> None:
    # Arrange: a rank-8 global; a rank-2 node sends back exactly what it was served.
    kept, plain = started(keep_residual=True), started(keep_residual=False)
    before = products(kept)
    # Act
    kept.aggregate([reply(2, seed=1, start=kept, change=0.0)], [2])
    plain.aggregate([reply(2, seed=1, start=plain, change=0.0)], [2])
    # Assert: kept as it was; plain svd cut it to rank 2.
    for module, expected in before.items():
        np.testing.assert_allclose(products(kept)[module], expected, atol=1e-4)
        assert np.linalg.matrix_rank(products(plain)[module], tol=1e-4) == 2
        assert np.linalg.matrix_rank(expected, tol=1e-4) == 8


def test_it_is_plain_svd_when_every_node_holds_the_global_at_its_rank() -> None:
    # Arrange: a rank-2 global, served to nodes at ranks 2 and 4, which hold all of it.
    kept, plain = started(True, rank=2), started(False, rank=2)
    # Act
    kept.aggregate([reply(2, 1, kept), reply(4, 2, kept, n=30)], [2, 4])
    plain.aggregate([reply(2, 1, plain), reply(4, 2, plain, n=30)], [2, 4])
    # Assert
    for module, expected in products(plain).items():
        np.testing.assert_allclose(products(kept)[module], expected, atol=1e-4)


def test_it_is_the_global_plus_the_weighted_changes_from_what_was_served() -> None:
    # Arrange: a rank-8 global served at ranks 2, 4 and 8; the result fits in the store rank only if the changes are
    # small, so compare with a dense reference truncated the same way.
    kept = started(True)
    replies = [reply(2, 1, kept, n=10), reply(4, 2, kept, n=20), reply(8, 3, kept, n=30)]
    g = products(kept)
    served = {r.node.rank: kept.serve(r.node.rank, r.node.scaling) for r in replies}
    # Act
    kept.aggregate(replies, [2, 4, 8])
    # Assert: ΔW̄ = G + Σ p_i (s_i B_i A_i − T_i), truncated at the store rank (Eckart–Young).
    for module in MODULES:
        dense = g[module].copy()
        for r in replies:
            a, b = r.adapter.lora[module]
            a_s, b_s = served[r.node.rank].lora[module]  # type: ignore[union-attr]
            change = b.astype(np.float64) @ a.astype(np.float64) - b_s.astype(np.float64) @ a_s.astype(np.float64)
            dense += r.num_examples / 60 * r.node.scaling * change
        u, s, vt = np.linalg.svd(dense)
        expected = (u[:, :STORE_RANK] * s[:STORE_RANK]) @ vt[:STORE_RANK]
        np.testing.assert_allclose(products(kept)[module], expected, atol=1e-4)


def test_it_is_the_default_and_fedavg_aggregates_as_before() -> None:
    assert isinstance(rule := GlobalAdapter.from_config(RunConfig()).rule, SVD) and rule.keep_residual
    off_config = RunConfig.from_mapping({"keep-residual": False})
    assert isinstance(rule := GlobalAdapter.from_config(off_config).rule, SVD) and not rule.keep_residual
    on, off = (
        GlobalAdapter.from_config(RunConfig.from_mapping({"rule": "fedavg", "keep-residual": kept, **SMALL}))
        for kept in (True, False)
    )
    for adapter in (on, off):
        adapter.aggregate([reply(8, seed=0)], [8])
        adapter.aggregate([reply(2, seed=1, start=adapter), reply(8, seed=2, start=adapter)], [2, 8])
    for module, expected in products(off).items():
        np.testing.assert_allclose(products(on)[module], expected, atol=1e-6)
