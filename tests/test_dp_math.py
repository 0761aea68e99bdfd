"""Properties of the DP math: clipping in factored form, the Gaussian mechanism, the central-DP aggregation rules."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from common.config import RunConfig
from common.dp import (
    add_gaussian_noise,
    clip_factors,
    clip_update,
    factor_difference,
    factors_norm,
    gaussian_noise_std,
    make_generator,
    whole_update_norm,
)
from common.lora import LoRAFactors, frobenius_norm_sq
from common.rules.base import GaussianMechanism
from common.rules.central_dp import CentralDP, CentralDPSettings, dp_mean
from common.rules.registry import RULE_NAMES, get_rule, rule_class
from common.rules.svd import SVD

SEED = 1234

DP_RULES = sorted(n for n in RULE_NAMES if rule_class(n).supports_central_dp)
"""The rules central DP can wrap (raflora cannot: see its docstring)."""


def dense_norm(f: LoRAFactors) -> float:
    """Oracle: ‖s·B·A‖_F from the materialised float64 product."""
    return float(torch.linalg.matrix_norm(f.scaling * (f.lora_B.double() @ f.lora_A.double())))


@st.composite
def lora_factors(draw: st.DrawFn, dtype: torch.dtype = torch.float64) -> LoRAFactors:
    out_f, in_f, r = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 5))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lora_A = scale * torch.randn(r, in_f, generator=g, dtype=dtype)
    lora_B = scale * torch.randn(out_f, r, generator=g, dtype=dtype)
    return LoRAFactors(lora_A, lora_B, draw(st.floats(0.05, 8.0)))


def random_factors(g: torch.Generator, out_f: int, in_f: int, r: int, scaling: float = 2.0) -> LoRAFactors:
    return LoRAFactors(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), scaling)


# --- clipping -------------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(f=lora_factors(), max_norm=st.floats(1e-3, 1e3))
def test_clipped_norm_is_at_most_c(f: LoRAFactors, max_norm: float) -> None:
    clipped, norm = clip_factors(f, max_norm)

    assert dense_norm(clipped) <= max_norm * (1 + 1e-6)
    assert norm == pytest.approx(dense_norm(f), rel=1e-9, abs=1e-12)
    assert clipped.scaling == f.scaling and torch.equal(clipped.lora_A, f.lora_A)


@settings(max_examples=50, deadline=None)
@given(f=lora_factors(dtype=torch.float32), max_norm=st.floats(1e-2, 1e2))
def test_clipping_float32_factors_stays_within_c(f: LoRAFactors, max_norm: float) -> None:
    clipped, _ = clip_factors(f, max_norm)

    assert clipped.lora_B.dtype == torch.float32
    assert dense_norm(clipped) <= max_norm * (1 + 1e-6)


@settings(max_examples=50, deadline=None)
@given(f=lora_factors())
def test_update_below_c_is_unchanged(f: LoRAFactors) -> None:
    clipped, norm = clip_factors(f, dense_norm(f) * 1.01 + 1e-9)

    assert clipped is f
    assert norm == pytest.approx(dense_norm(f), rel=1e-9, abs=1e-12)


def test_all_zero_update_is_safe() -> None:
    f = LoRAFactors(torch.zeros(4, 6), torch.zeros(5, 4), 2.0)

    clipped, norm = clip_factors(f, 1.0)
    joint = clip_update({"q": f}, 1.0, dense={"head": torch.zeros(3)})

    assert norm == 0.0 and clipped is f
    assert joint.norm == 0.0 and torch.equal(joint.dense["head"], torch.zeros(3))


def test_norm_is_stable_when_the_product_cancels() -> None:
    # B·A = b·(a₁ − a₂)ᵀ is tiny while ‖B‖·‖A‖ is not: the Gram form loses the digits, QR does not.
    b = torch.tensor([[3.0], [4.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    f = LoRAFactors(torch.cat([a, a + 1e-7]), torch.cat([b, -b], dim=1), 1.0)

    assert factors_norm(f) == pytest.approx(dense_norm(f), rel=1e-6)


def test_factored_norm_matches_the_gram_formula() -> None:
    f = random_factors(torch.Generator().manual_seed(SEED), 9, 11, 3)

    assert factors_norm(f) == pytest.approx(math.sqrt(float(frobenius_norm_sq(f))), rel=1e-5)


def test_clip_update_is_joint_over_modules_and_dense_tensors() -> None:
    g = torch.Generator().manual_seed(SEED)
    modules = {f"m{k}": random_factors(g, 6, 5, 2) for k in range(3)}
    head = torch.randn(4, 6, generator=g)

    clipped = clip_update(modules, 1.0, dense={"head": head})

    norms = [dense_norm(f) ** 2 for f in clipped.factors.values()] + [float(clipped.dense["head"].norm()) ** 2]
    assert math.sqrt(sum(norms)) == pytest.approx(1.0, rel=1e-5)
    assert clipped.norm == pytest.approx(whole_update_norm(modules, {"head": head}))
    ratios = [dense_norm(clipped.factors[k]) / dense_norm(modules[k]) for k in modules]
    assert ratios == pytest.approx([1.0 / clipped.norm] * 3, rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    modules=st.lists(lora_factors(), min_size=1, max_size=4),
    head_scale=st.sampled_from([0.0, 1e-3, 1.0, 30.0]),
    max_norm=st.floats(1e-3, 1e3),
)
def test_joint_clipped_norm_is_at_most_c(modules: list[LoRAFactors], head_scale: float, max_norm: float) -> None:
    """The whole update (every module with its own shape, plus a dense head) ends within C, dense-checked."""
    head = head_scale * torch.randn(3, 5, generator=torch.Generator().manual_seed(len(modules)), dtype=torch.float64)
    factors = {f"m{k}": f for k, f in enumerate(modules)}

    clipped = clip_update(factors, max_norm, dense={"head": head})

    total = math.sqrt(
        sum(dense_norm(f) ** 2 for f in clipped.factors.values()) + float(clipped.dense["head"].norm()) ** 2
    )
    assert total <= max_norm * (1 + 1e-6)
    original = math.sqrt(sum(dense_norm(f) ** 2 for f in modules) + float(head.norm()) ** 2)
    assert clipped.norm == pytest.approx(original, rel=1e-9, abs=1e-12)
    if original <= max_norm:
        assert total == pytest.approx(original, rel=1e-12, abs=1e-15)


def test_factor_difference_is_the_difference_of_products() -> None:
    g = torch.Generator().manual_seed(SEED)
    new, old = random_factors(g, 6, 5, 3, 0.5), random_factors(g, 6, 5, 2, 4.0)

    diff = factor_difference(new, old)

    assert diff.r == 5
    torch.testing.assert_close(diff.delta(), new.delta() - old.delta())


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_clip_norm_is_named(bad: float) -> None:
    f = LoRAFactors(torch.ones(1, 2), torch.ones(2, 1), 1.0)

    with pytest.raises(ValueError, match="max_norm"):
        clip_factors(f, bad)


# --- Gaussian mechanism -------------------------------------------------------------------------------------------


def test_noise_std_formula() -> None:
    assert gaussian_noise_std(1.2, 0.5, 4) == pytest.approx(0.15)
    assert gaussian_noise_std(0.0, 0.5, 4) == 0.0
    with pytest.raises(ValueError, match="num_clients"):
        gaussian_noise_std(1.0, 1.0, 0)


def test_fixed_seed_reproduces_and_default_seeds_differ() -> None:
    x = torch.zeros(64)

    same = [add_gaussian_noise(x, 1.0, make_generator(SEED)) for _ in range(2)]
    fresh = [add_gaussian_noise(x, 1.0, make_generator()) for _ in range(2)]

    assert torch.equal(same[0], same[1])
    assert not torch.equal(fresh[0], fresh[1])
    assert torch.equal(x, torch.zeros(64)), "add_gaussian_noise must return a new tensor"


NOISE_OF = {
    "svd": lambda a, b: (b @ a).flatten(),
    "ffa": lambda a, b: b[:, :3].flatten(),
    "fedavg": lambda a, b: torch.cat([b[:, :3].flatten(), a[:3].flatten()]),
}
"""Where each rule's noise lands, for all-zero updates, scaling 1 and a full-rank target."""


def mechanism(z: float, c: float, m: int, seed: int | None = SEED) -> GaussianMechanism:
    return GaussianMechanism(z, c, m, make_generator(seed))


def zero_global(out: int, n_in: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A previous global of all zeros at ``rank`` (scaling 1), float64 as central DP holds it."""
    return torch.zeros(rank, n_in, dtype=torch.float64), torch.zeros(out, rank, dtype=torch.float64)


@pytest.mark.parametrize("name", DP_RULES)
def test_measured_noise_std_is_z_c_over_m(name: str) -> None:
    z, c, m = 1.3, 0.7, 5
    zeros = [(torch.zeros(3, 30, dtype=torch.float64), torch.zeros(400, 3, dtype=torch.float64), 2.0)] * m

    lora_A, lora_B = get_rule(name).private_update(zero_global(400, 30, 30), zeros, mechanism(z, c, m), 30)

    assert float(NOISE_OF[name](lora_A, lora_B).std()) == pytest.approx(z * c / m, rel=0.1)


def test_dp_mean_noise_std_and_fixed_denominator() -> None:
    tensors = [torch.zeros(20_000, dtype=torch.float64)] * 3

    noisy = dp_mean(tensors, mechanism(2.0, 1.5, 10))

    assert float(noisy.std()) == pytest.approx(2.0 * 1.5 / 10, rel=0.1)


# --- the rules' central-DP updates (what CentralDP runs) ------------------------------------------------------------


def client_factors(g: torch.Generator, ranks: list[int], shared_a: bool = False) -> list[LoRAFactors]:
    a_shared = torch.randn(max(ranks), 12, generator=g, dtype=torch.float64)
    factors = []
    for r in ranks:
        a = a_shared[:r] if shared_a else torch.randn(r, 12, generator=g, dtype=torch.float64)
        factors.append(LoRAFactors(a, torch.randn(10, r, generator=g, dtype=torch.float64), 8.0 / r))
    return factors


@pytest.mark.parametrize("name", DP_RULES)
def test_dp_off_equals_the_plain_rule_with_uniform_weights(name: str) -> None:
    rule = get_rule(name)
    g = torch.Generator().manual_seed(SEED)
    factors = client_factors(g, [2, 4, 3], shared_a=rule.freezes_lora_A)
    clients = [(f.lora_A, f.lora_B, f.scaling) for f in factors]

    ((a_p, b_p),) = rule.aggregate(clients, [1.0, 1.0, 1.0], [(10, 1.0)])
    a_d, b_d = rule.private_update(zero_global(10, 12, 10), clients, mechanism(0.0, 1e6, 3), 10)

    torch.testing.assert_close(b_d @ a_d, b_p @ a_p)


def test_svd_without_noise_releases_the_uniform_mean_over_the_public_denominator() -> None:
    g = torch.Generator().manual_seed(SEED)
    factors = client_factors(g, [2, 3])
    clients = [(f.lora_A, f.lora_B, f.scaling) for f in factors]

    lora_A, lora_B = SVD().private_update(zero_global(10, 12, 10), clients, mechanism(0.0, 1e6, 4), 10)

    torch.testing.assert_close(lora_B @ lora_A, sum(f.delta() for f in factors) / 4)


@pytest.mark.parametrize("name", DP_RULES)
def test_unclipped_contribution_is_refused(name: str) -> None:
    factors = client_factors(torch.Generator().manual_seed(SEED), [2, 2], shared_a=True)
    clients = [(f.lora_A, f.lora_B, f.scaling) for f in factors]

    with pytest.raises(ValueError, match="exceeds clip_norm"):
        get_rule(name).private_update(zero_global(10, 12, 2), clients, mechanism(1.0, 1e-3, 2), 2)


def test_denominator_below_the_number_of_replies_is_refused() -> None:
    with pytest.raises(ValueError, match="num_clients"):
        dp_mean([torch.zeros(2)] * 3, mechanism(1.0, 1.0, 2, seed=None))


def test_clipped_then_noised_svd_round_trip_is_finite_and_seeded() -> None:
    g = torch.Generator().manual_seed(SEED)
    updates = [clip_factors(f, 0.5)[0] for f in client_factors(g, [2, 4])]
    clients = [(f.lora_A, f.lora_B, f.scaling) for f in updates]

    runs = [SVD().private_update(zero_global(10, 12, 4), clients, mechanism(1.0, 0.5, 2, seed=7), 4) for _ in range(2)]

    assert all(bool(torch.isfinite(t).all()) for t in runs[0])
    np.testing.assert_array_equal(runs[0][1].numpy(), runs[1][1].numpy())


@pytest.mark.parametrize("name", DP_RULES)
@settings(max_examples=20, deadline=None)
@given(factor=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_clipping_a_change_scales_what_the_rule_releases_by_the_factor(name: str, factor: float, seed: int) -> None:
    """C/‖Δ‖ applied to a change must scale the released vector by exactly that factor: a rule that scaled both
    factors of a product would clip it to (C/‖Δ‖)²·‖Δ‖, far below C, and waste the privacy budget on noise."""
    rule = get_rule(name)
    g = torch.Generator().manual_seed(seed)
    new, old = client_factors(g, [3, 3], shared_a=rule.freezes_lora_A)
    change = rule.change((new.lora_A, new.lora_B), (old.lora_A, old.lora_B), new.scaling)

    clipped = rule.clip_change(change, factor)

    assert math.sqrt(rule.released_sq_norm(clipped)) == pytest.approx(
        factor * math.sqrt(rule.released_sq_norm(change)), rel=1e-9
    )


@pytest.mark.parametrize("name", sorted(set(RULE_NAMES) - set(DP_RULES)))
def test_a_rule_without_central_dp_refuses_the_wrapper_and_the_update(name: str) -> None:
    cfg = RunConfig.from_mapping({"dp": "central", "noise-multiplier": 1.0})
    with pytest.raises(ValueError, match=f"dp='central' cannot be combined with rule '{name}'"):
        CentralDP(get_rule(name), CentralDPSettings.from_config(cfg))
    clients = [(torch.zeros(2, 12, dtype=torch.float64), torch.zeros(10, 2, dtype=torch.float64), 1.0)]
    with pytest.raises(ValueError, match="cannot be combined"):
        get_rule(name).private_update(zero_global(10, 12, 2), clients, mechanism(1.0, 1.0, 1), 2)
