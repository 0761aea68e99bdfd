"""Central DP on the coordinator: DP-FedAvg over round changes, its accountant, and a coordinator restart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.accounting import compose_epsilon
from common.config import RunConfig
from common.rules.base import SeededInit
from common.rules.central_dp import CentralDP, CentralDPSettings
from common.rules.registry import get_rule
from common.updates import AdapterFactors, NodeInfo, TrainReply
from server.engine import RoundEngine
from server.global_adapter import GlobalAdapter

MODULES = {"layer.0.query": (6, 5), "layer.0.value": (6, 5)}  # (out, in)


INIT = SeededInit(seed=1, max_rank=8)
"""The nodes' shared lora_A init: what fedavg's first round changes start from."""
initial_a = INIT.lora_A


def reply(rank: int, seed: int, rule: str, start: GlobalAdapter | None = None, scale: float = 0.1) -> TrainReply:
    """A node's reply: what it was served (or the public start) plus a random change."""
    rng = np.random.default_rng(seed)
    scaling = 16.0 / rank
    served = start.serve(rank, scaling) if start is not None and not start.empty else None
    lora = {}
    for module, (out_f, in_f) in MODULES.items():
        a0, b0 = served.lora[module] if served else (initial_a(module, rank, in_f), np.zeros((out_f, rank)))
        a = a0 if rule == "ffa" else a0 + scale * rng.normal(size=(rank, in_f))
        lora[module] = (a.astype(np.float32), (b0 + scale * rng.normal(size=(out_f, rank))).astype(np.float32))
    head0 = served.head["head.weight"] if served else np.zeros((3, 6))
    head = {"head.weight": (head0 + scale * rng.normal(size=(3, 6))).astype(np.float32)}
    return TrainReply(AdapterFactors(lora, head), 10, NodeInfo(rank, scaling, f"n{seed}"), {})


def private_adapter(
    rule: str, z: float, clip: float, seed: int | None = 3, target: float = 0.0, q: float = 0.5
) -> GlobalAdapter:
    settings = CentralDPSettings(z, clip, 1e-5, target, "rdp", 2, planned_sample_rate=q, seed=seed, init=INIT)
    return GlobalAdapter(get_rule(rule), 8, central_dp=CentralDP(get_rule(rule), settings))


def products(adapter: GlobalAdapter) -> dict[str, np.ndarray]:
    return {m: b.astype(np.float64) @ a.astype(np.float64) for m, (a, b) in adapter.lora.items()}


@pytest.mark.parametrize("rule", ["svd", "fedavg", "ffa"])
def test_without_noise_or_clipping_it_is_the_uniform_mean(rule: str) -> None:
    # Arrange: equal ranks and equal weights, so that fedavg's mean of changes equals its mean of factors.
    replies = [reply(4, seed, rule) for seed in range(3)]
    plain, private = GlobalAdapter(get_rule(rule), 8), private_adapter(rule, z=1e-9, clip=100.0)
    # Act
    plain.aggregate(replies, [4])
    private.aggregate(replies, [4], num_sampled=3, num_available=3)
    # Assert
    for module, expected in products(plain).items():
        np.testing.assert_allclose(products(private)[module], expected, atol=1e-6)
    np.testing.assert_allclose(private.head["head.weight"], plain.head["head.weight"], atol=1e-6)


@pytest.mark.parametrize("rule", ["svd", "fedavg", "ffa"])
def test_each_change_is_clipped_to_c_before_averaging(rule: str) -> None:
    # Arrange: round 1 leaves a global; in round 2 every node moves far (‖Δ_i‖ ≫ C).
    warm = private_adapter(rule, z=1e-9, clip=100.0)
    warm.aggregate([reply(4, s, rule) for s in range(3)], [4], num_sampled=3)
    before = {m: p.copy() for m, p in products(warm).items()}
    head_before = warm.head["head.weight"].copy()
    clip = 0.05
    assert warm.central_dp is not None
    warm.central_dp.settings = CentralDPSettings(1e-9, clip, 1e-5, 0.0, "rdp", 2, 0.5, 3, INIT)
    # Act
    warm.aggregate([reply(4, 10 + s, rule, start=warm, scale=5.0) for s in range(3)], [4], num_sampled=3)
    # Assert: the released mean change is at most C in every part (each part of a mean of vectors within C).
    assert float(np.linalg.norm(warm.head["head.weight"] - head_before)) <= clip * (1 + 1e-4)
    if rule == "svd":
        total = sum(np.linalg.norm(products(warm)[m] - before[m]) ** 2 for m in before) ** 0.5
        assert total <= clip * (1 + 1e-3)


def test_epsilon_composes_rounds_at_the_sampling_rate() -> None:
    adapter = private_adapter("svd", z=1.1, clip=1.0)
    first = adapter.aggregate([reply(4, s, "svd") for s in range(3)], [4], num_sampled=3, num_available=6)
    second = adapter.aggregate([reply(4, s, "svd", adapter) for s in range(3)], [4], num_sampled=3, num_available=6)

    assert first.epsilon is not None and second.epsilon is not None
    assert 0 < first.epsilon < second.epsilon
    assert second.epsilon == pytest.approx(compose_epsilon([(1.1, 0.5, 2)], 1e-5))


def test_unknown_availability_counts_as_no_subsampling() -> None:
    adapter = private_adapter("ffa", z=1.1, clip=1.0)
    result = adapter.aggregate([reply(4, s, "ffa") for s in range(3)], [4])
    assert result.epsilon == pytest.approx(compose_epsilon([(1.1, 1.0, 1)], 1e-5))


def test_coordinator_restart_continues_epsilon_and_the_seeded_noise() -> None:
    # Arrange: an uninterrupted run of two rounds.
    rounds = [[reply(4, 10 * r + s, "fedavg") for s in range(3)] for r in range(2)]
    straight = private_adapter("fedavg", z=1.0, clip=1.0)
    for replies in rounds:
        straight.aggregate(replies, [4], num_sampled=3, num_available=3)
    # Act: one round, a checkpoint through JSON, a fresh coordinator, the second round.
    before = private_adapter("fedavg", z=1.0, clip=1.0)
    before.aggregate(rounds[0], [4], num_sampled=3, num_available=3)
    arrays, extra = before.to_arrays(), json.loads(json.dumps(before.extra_state()))
    after = private_adapter("fedavg", z=1.0, clip=1.0)
    after.load_arrays(arrays)
    after.load_extra_state(extra)
    result = after.aggregate(rounds[1], [4], num_sampled=3, num_available=3)
    # Assert
    assert result.epsilon == pytest.approx(compose_epsilon([(1.0, 1.0, 2)], 1e-5))
    for module, expected in products(straight).items():
        np.testing.assert_allclose(products(after)[module], expected, atol=1e-6)


def test_the_engine_checkpoint_carries_the_accountant() -> None:
    cfg = RunConfig.from_mapping(
        {"rule": "svd", "dp": "central", "noise-multiplier": 1.0, "max-rank": 8, "node-ranks": "4"}
    )
    engine = RoundEngine(cfg)
    engine.global_adapter.aggregate([reply(4, s, "svd") for s in range(3)], [4], num_sampled=3)
    arrays, meta = engine.checkpoint_state()

    restored = RoundEngine(cfg)
    restored.restore(1, arrays, json.loads(json.dumps(meta)))

    assert restored.global_adapter.central_dp is not None
    assert restored.global_adapter.central_dp.ledger.history == [(1.0, 1.0, 1)]


def test_os_seeded_noise_state_never_reaches_the_checkpoint() -> None:
    adapter = private_adapter("svd", z=1.0, clip=1.0, seed=None)
    adapter.aggregate([reply(4, s, "svd") for s in range(3)], [4])
    assert set(adapter.extra_state()["central-dp"]) == {"ledger"}
    assert "generator" in private_adapter("svd", z=1.0, clip=1.0, seed=5).extra_state()["central-dp"]


def test_the_budget_is_never_exceeded() -> None:
    adapter = private_adapter("ffa", z=0.0, clip=1.0, target=3.0, q=1.0)  # z calibrated for 2 rounds at q = 1

    def round_(r: int) -> float | None:
        replies = [reply(4, 10 * r + s, "ffa", adapter) for s in range(3)]
        return adapter.aggregate(replies, [4], num_sampled=3, num_available=3).epsilon

    spent = [round_(0), round_(1)]
    kept = products(adapter)
    third = round_(2)

    assert spent[1] is not None and spent[0] is not None and 0 < spent[0] < spent[1] <= 3.0
    assert third == spent[1]  # the third round is not released, so nothing is spent
    for module, expected in kept.items():
        np.testing.assert_array_equal(products(adapter)[module], expected)


def test_checkpoint_and_run_must_agree_about_central_dp() -> None:
    with pytest.raises(ValueError, match="disagree about central DP"):
        GlobalAdapter(get_rule("svd"), 8).load_extra_state(private_adapter("svd", 1.0, 1.0).extra_state())
    with pytest.raises(ValueError, match="disagree about central DP"):
        private_adapter("svd", 1.0, 1.0).load_extra_state({})
