"""Bad inputs to every aggregation rule raise ``ValueError`` with a message that names the problem."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from common.rules.base import Rule
from common.rules.factors import check_clients
from common.rules.ffa import ffa
from common.rules.registry import RULE_NAMES, get_rule
from common.rules.svd import SVD

OUT, IN = 6, 10


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def good_clients() -> list[tuple[object, object, float]]:
    """Two valid clients of ranks 2 and 4 sharing one lora_A (so ``ffa`` accepts them too)."""
    rng = np.random.default_rng(0)
    lora_A = rng.standard_normal((4, IN))
    return [
        (lora_A[:2], rng.standard_normal((OUT, 2)), 8.0),
        (torch.from_numpy(lora_A), torch.from_numpy(rng.standard_normal((OUT, 4))), 4.0),
    ]


KEEP = object()


def with_client(index: int, lora_A: object = KEEP, lora_B: object = KEEP, scaling: object = KEEP) -> list:
    """``good_clients()`` with some fields of one client replaced."""
    clients = good_clients()
    a, b, s = clients[index]
    clients[index] = (
        a if lora_A is KEEP else lora_A,
        b if lora_B is KEEP else lora_B,
        s if scaling is KEEP else scaling,
    )
    return clients


@pytest.fixture(params=sorted(RULE_NAMES))
def rule(request: pytest.FixtureRequest) -> Rule:
    return get_rule(request.param)


def test_good_inputs_are_accepted(rule: Rule) -> None:
    # Act
    result = rule.aggregate(good_clients(), [1.0, 3.0], [(2, 8.0), (4, 4.0)])
    # Assert
    assert [tuple(a.shape) for a, _ in result] == [(2, IN), (4, IN)]


@pytest.mark.parametrize(
    ("lora_A", "lora_B", "expected"),
    [
        (np.zeros((4, IN + 1)), np.ones((OUT, 4)), r"client 1: .*6×11 but client 0's is 6×10.*out and in"),
        (np.zeros((4, IN)), np.ones((OUT + 2, 4)), r"client 1: .*8×10 but client 0's is 6×10.*out and in"),
    ],
)
def test_mismatched_dimensions_across_clients(rule: Rule, lora_A: object, lora_B: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        rule.aggregate(with_client(1, lora_A, lora_B), [1.0, 1.0], [(2, 1.0)])


def test_rank_mismatch_between_a_and_b(rule: Rule) -> None:
    with pytest.raises(ValueError, match=r"client 0: rank mismatch: lora_A has 2 rows but lora_B has 3 columns"):
        rule.aggregate(with_client(0, lora_B=np.ones((OUT, 3))), [1.0, 1.0], [(2, 1.0)])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["lora_A", "lora_B"])
def test_non_finite_entries(rule: Rule, bad: float, field: str) -> None:
    # Arrange
    a, b = np.zeros((4, IN)), np.ones((OUT, 4))
    (a if field == "lora_A" else b)[1, 1] = bad
    # Act / Assert
    with pytest.raises(ValueError, match=rf"client 1: {field} contains non-finite values"):
        rule.aggregate(with_client(1, a, b), [1.0, 1.0], [(2, 1.0)])


@pytest.mark.parametrize("weights", [[1.0, -0.5], [-1.0, 2.0]])
def test_negative_weights(rule: Rule, weights: list[float]) -> None:
    with pytest.raises(ValueError, match=r"weights must be finite and non-negative, got weights\[\d\]=-"):
        rule.aggregate(good_clients(), weights, [(2, 1.0)])


@pytest.mark.parametrize("weights", [[1.0, math.nan], [math.inf, 1.0]])
def test_non_finite_weights(rule: Rule, weights: list[float]) -> None:
    with pytest.raises(ValueError, match=r"weights must be finite and non-negative"):
        rule.aggregate(good_clients(), weights, [(2, 1.0)])


def test_all_zero_weights(rule: Rule) -> None:
    with pytest.raises(ValueError, match=r"weights must not all be zero"):
        rule.aggregate(good_clients(), [0.0, 0.0], [(2, 1.0)])


def test_one_weight_per_client(rule: Rule) -> None:
    with pytest.raises(ValueError, match=r"got 3 weights for 2 clients"):
        rule.aggregate(good_clients(), [1.0, 1.0, 1.0], [(2, 1.0)])


def test_no_clients(rule: Rule) -> None:
    with pytest.raises(ValueError, match=r"no clients to aggregate"):
        rule.aggregate([], [], [(2, 1.0)])


def test_client_rank_below_one(rule: Rule) -> None:
    with pytest.raises(ValueError, match=r"client 1: LoRA rank r must be at least 1, got r=0"):
        rule.aggregate(with_client(1, np.zeros((0, IN)), np.zeros((OUT, 0))), [1.0, 1.0], [(2, 1.0)])


@pytest.mark.parametrize("rank", [0, -3, 2.5, math.nan, True, "4"])
def test_target_rank_below_one_or_not_an_integer(rule: Rule, rank: object) -> None:
    with pytest.raises(ValueError, match=r"target 1: rank must be an integer >= 1"):
        rule.aggregate(good_clients(), [1.0, 1.0], [(2, 1.0), (rank, 1.0)])


@pytest.mark.parametrize("scaling", [0.0, -2.0, math.nan, math.inf, None])
def test_non_positive_client_scaling(rule: Rule, scaling: object) -> None:
    with pytest.raises(ValueError, match=r"client 0: scaling must be"):
        rule.aggregate(with_client(0, scaling=scaling), [1.0, 1.0], [(2, 1.0)])


@pytest.mark.parametrize("scaling", [0.0, -2.0, math.nan, math.inf, "x"])
def test_non_positive_target_scaling(rule: Rule, scaling: object) -> None:
    with pytest.raises(ValueError, match=r"target 0: scaling must be"):
        rule.aggregate(good_clients(), [1.0, 1.0], [(2, scaling)])


@pytest.mark.parametrize(
    ("lora_A", "expected"),
    [
        (
            np.ones((2, IN), dtype=np.int64),
            r"^client 0 lora_A must be a floating-point array, got dtype int64",
        ),
        (torch.ones(2, IN, dtype=torch.int32), r"^client 0 lora_A must be a floating-point tensor"),
        ([[1.0] * IN] * 2, r"^client 0 lora_A must be a numpy array or torch tensor, got list"),
        (np.ones(IN), r"client 0: lora_A and lora_B must be 2-D, got shapes \(10,\) and \(6, 2\)"),
    ],
)
def test_factors_that_are_not_float_matrices(rule: Rule, lora_A: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        rule.aggregate(with_client(0, lora_A=lora_A), [1.0, 1.0], [(2, 1.0)])


def test_client_entry_that_is_not_a_triple(rule: Rule) -> None:
    with pytest.raises(ValueError, match=r"client 0: expected \(lora_A, lora_B, scaling\), got a tuple of 2 items"):
        rule.aggregate([good_clients()[0][:2]], [1.0], [(2, 1.0)])  # type: ignore[list-item]


def test_target_that_is_not_a_pair(rule: Rule) -> None:
    with pytest.raises(ValueError, match=r"target 0: expected \(rank, scaling\), got a tuple of 3 items"):
        rule.aggregate(good_clients(), [1.0, 1.0], [(2, 1.0, 1.0)])  # type: ignore[list-item]


def test_aggregate_that_overflows_float32(rule: Rule) -> None:
    # Arrange: each factor is finite in float32, their product is not.
    clients = [(torch.full((2, IN), 1e20), torch.full((OUT, 2), 1e20), 1.0)] * 2
    # Act / Assert
    if isinstance(rule, SVD):
        with pytest.raises(ValueError, match=r"overflows torch.float32"):
            rule.aggregate(clients, [1.0, 1.0], [(2, 1.0)])
    else:  # the zero-padding rules never multiply B by A
        assert all(torch.isfinite(t).all() for pair in rule.aggregate(clients, [1.0, 1.0], [(2, 1.0)]) for t in pair)


def test_ffa_refuses_clients_whose_lora_a_differs() -> None:
    # Arrange
    clients = with_client(1, lora_A=np.ones((4, IN)))
    # Act / Assert
    with pytest.raises(ValueError, match=r"client \d: lora_A differs from the shared frozen lora_A.*ffa rule"):
        ffa(clients, [1.0, 1.0], [(2, 1.0)])


def test_unknown_rule_name_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown aggregation rule 'fedsvd'; choose one of "
        r"\['fedavg', 'ffa', 'multikrum', 'raflora', 'rfa', 'svd'\]",
    ):
        get_rule("fedsvd")


def test_read_only_numpy_inputs_are_accepted_without_a_warning(rule: Rule) -> None:
    """Arrays decoded from received bytes (``np.frombuffer``) are read-only."""
    # Arrange
    clients = []
    for a, b, s in good_clients():
        a, b = (np.frombuffer(np.asarray(x, dtype=np.float64).tobytes()).reshape(np.shape(x)) for x in (a, b))
        assert not a.flags.writeable
        clients.append((a, b, s))
    # Act
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = rule.aggregate(clients, [1.0, 1.0], [(2, 1.0)])
    # Assert
    assert tuple(result[0][0].shape) == (2, IN)


def test_finite_entries_whose_sum_overflows_are_accepted() -> None:
    """The finiteness check sums first; a sum that overflows must not pass for a non-finite entry."""
    # Arrange
    huge = np.full((2, IN), 3e38, dtype=np.float32)
    # Act
    factors, p = check_clients([(huge, np.ones((OUT, 2), dtype=np.float32), 1.0)], [1.0])
    # Assert
    assert torch.equal(factors[0].lora_A, torch.from_numpy(huge)) and float(p[0]) == 1.0
