"""The server optimizer (``server-learning-rate``, ``server-momentum``: FedAvgM) in factored form: the same steps as a
dense float64 reference, off by default, kept in checkpoints, refused where the rule averages factors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import simulate
from test_keep_residual import MODULES, reply

from common.config import RunConfig
from server.checkpoint import checkpoint_path, load_checkpoint
from server.global_adapter import GlobalAdapter
from server.server_optimizer import VELOCITY_PREFIX


def adapter(eta: float, beta: float) -> GlobalAdapter:
    cfg = RunConfig.from_mapping(
        {"max-rank": 10, "node-ranks": "2,2", "keep-residual": False, "server-learning-rate": eta,
         "server-momentum": beta}
    )  # fmt: skip
    return GlobalAdapter.from_config(cfg)


def dense(g: GlobalAdapter) -> dict[str, np.ndarray]:
    out = {m: b.astype(np.float64) @ a.astype(np.float64) for m, (a, b) in g.lora.items()}
    return out | {k: v.astype(np.float64) for k, v in g.head.items()}


def test_three_rounds_of_fedavgm_equal_a_dense_float64_reference() -> None:
    """Two rank-2 nodes and a store rank of 10 = min(out, in): no truncation, so the factored steps are exact."""
    eta, beta = 1.5, 0.7
    g, plain = adapter(eta, beta), adapter(1.0, 0.0)
    reference: dict[str, np.ndarray] = {}
    velocity: dict[str, np.ndarray] = {}
    for rnd in range(3):
        replies = [reply(2, 10 * rnd + i, g if rnd else None, n=10 + i) for i in range(2)]
        plain.lora, plain.head = {}, {}  # the rule alone, from nothing: the round's aggregate ΔW̄_t
        plain.aggregate(replies, [2])
        aggregate = dense(plain)
        if rnd == 0:
            reference = aggregate  # no previous global: stored as the rule made it
        else:
            velocity = {k: beta * velocity.get(k, 0.0) + aggregate[k] - reference[k] for k in aggregate}
            reference = {k: reference[k] + eta * velocity[k] for k in aggregate}
        g.aggregate(replies, [2])
        got = dense(g)
        for key in reference:
            np.testing.assert_allclose(got[key], reference[key], atol=1e-5, rtol=1e-4, err_msg=f"round {rnd}: {key}")
    assert set(g.optimizer.velocity) == set(MODULES)


def test_off_by_default_the_rule_s_aggregate_is_stored_bit_for_bit() -> None:
    g = GlobalAdapter.from_config(RunConfig.from_mapping({"max-rank": 10, "node-ranks": "2,2"}))
    assert not g.optimizer.active
    g.aggregate([reply(2, i) for i in range(2)], [2])
    replies = [reply(2, 5 + i, g) for i in range(2)]
    expected = g.rule.aggregate_adapter(g.adapter, replies, g.store_rank)
    assert expected is not None
    g.aggregate(replies, [2])
    for key, value in expected.to_state_dict().items():
        np.testing.assert_array_equal(g.to_arrays()[key], value)
    assert g.optimizer.velocity == {} and all(not k.startswith(VELOCITY_PREFIX) for k in g.to_arrays())


def test_momentum_survives_a_checkpoint_and_an_old_checkpoint_starts_it_at_zero() -> None:
    g = adapter(1.0, 0.9)
    g.aggregate([reply(2, i) for i in range(2)], [2])
    g.aggregate([reply(2, 5 + i, g) for i in range(2)], [2])
    arrays = g.to_arrays()
    assert any(k.startswith(VELOCITY_PREFIX) for k in arrays)
    restored = adapter(1.0, 0.9)
    restored.load_arrays(arrays)
    nxt = [reply(2, 9 + i, g) for i in range(2)]
    g.aggregate(nxt, [2])
    restored.aggregate(nxt, [2])
    for key, value in dense(g).items():
        np.testing.assert_array_equal(dense(restored)[key], value)
    old = adapter(1.0, 0.9)
    old.load_arrays({k: v for k, v in arrays.items() if not k.startswith(VELOCITY_PREFIX)})
    assert old.optimizer.velocity == {} and set(old.lora) == set(MODULES)


def test_a_non_finite_step_keeps_the_global_and_the_momentum() -> None:
    g = adapter(10.0, 0.9)
    g.aggregate([reply(2, i) for i in range(2)], [2])
    g.aggregate([reply(2, 5 + i, g) for i in range(2)], [2])
    before, velocity = dense(g), {k: tuple(x.copy() for x in v) for k, v in g.optimizer.velocity.items()}
    huge = [reply(2, 7, g, change=3e37), reply(2, 8, g)]
    with pytest.raises((FloatingPointError, ValueError)):
        g.aggregate(huge, [2])
    for key, value in before.items():
        np.testing.assert_array_equal(dense(g)[key], value)
    for key, (a, b) in velocity.items():
        np.testing.assert_array_equal(g.optimizer.velocity[key][0], a)
        np.testing.assert_array_equal(g.optimizer.velocity[key][1], b)


@pytest.mark.parametrize("rule", ["fedavg", "ffa"])
def test_a_rule_that_averages_factors_refuses_a_server_optimizer_saying_why(rule: str) -> None:
    with pytest.raises(ValueError, match=f"rule '{rule}' averages the factors themselves"):
        RunConfig.from_mapping({"rule": rule, "server-momentum": 0.9})
    RunConfig.from_mapping({"rule": rule})  # the defaults are fine


def test_a_flower_run_with_server_momentum_checkpoints_the_momentum(tmp_path: Path) -> None:
    """Through the real ServerApp: the run completes, its config keeps the keys, and each checkpoint holds m."""
    run = simulate(tmp_path, nodes=2, **{"node-ranks": "2,4", "server-momentum": 0.5, "server-learning-rate": 1.5})
    assert run.returncode == 0, run.output[-3000:]
    assert (run.config()["server-momentum"], run.config()["server-learning-rate"]) == (0.5, 1.5)
    checkpoint = load_checkpoint(checkpoint_path(run.out_dir / "checkpoints", 2))
    velocity = {k for k in checkpoint.arrays if k.startswith(VELOCITY_PREFIX)}
    assert velocity and {k[len(VELOCITY_PREFIX) :] for k in velocity} <= set(checkpoint.arrays)
