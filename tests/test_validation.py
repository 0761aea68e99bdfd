"""Tests for common.validation: one broken reply per rejection reason, the median norm rule, instructions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest

from common.updates import AdapterFactors, Instruction, NodeInfo, TrainReply
from common.validation import (
    REASON_CODES,
    Layout,
    UpdateLimits,
    check_instruction,
    check_update,
    lora_update_norm,
    norm_outliers,
    reason_code,
)

RANK = 2
SCALING = 8.0 / RANK
MODULES = {"enc.layer.0.query": (6, 5), "enc.layer.0.value": (6, 5)}
HEAD = {"classifier.weight": (3, 5), "classifier.bias": (3,)}
LAYOUT = Layout(MODULES, HEAD)
LIMITS = UpdateLimits()


def make_adapter(rank: int = RANK, seed: int = 0, dtype: type = np.float32) -> AdapterFactors:
    rng = np.random.default_rng(seed)
    lora: dict[str, tuple[np.ndarray, np.ndarray]] = {
        m: (rng.normal(size=(rank, d_in)).astype(dtype), rng.normal(size=(d_out, rank)).astype(dtype))
        for m, (d_out, d_in) in MODULES.items()
    }
    head: dict[str, np.ndarray] = {k: rng.normal(size=shape).astype(dtype) for k, shape in HEAD.items()}
    return AdapterFactors(lora, head)


def make_reply(adapter: AdapterFactors | None = None, **changes: object) -> TrainReply:
    reply = TrainReply(make_adapter() if adapter is None else adapter, 100, NodeInfo(RANK, SCALING), {"loss": 0.5})
    return dataclasses.replace(reply, **changes)  # type: ignore[arg-type]


def with_factor(module: str, which: int, value: object) -> TrainReply:
    adapter = make_adapter()
    pair = list(adapter.lora[module])
    pair[which] = value  # type: ignore[call-overload]
    return make_reply(AdapterFactors({**adapter.lora, module: (pair[0], pair[1])}, adapter.head))


def with_head(key: str, value: np.ndarray | None) -> TrainReply:
    adapter = make_adapter()
    head = {k: v for k, v in adapter.head.items() if k != key}
    if value is not None:
        head[key] = value
    return make_reply(AdapterFactors(adapter.lora, head))


def without_module(module: str) -> TrainReply:
    adapter = make_adapter()
    return make_reply(AdapterFactors({m: f for m, f in adapter.lora.items() if m != module}, adapter.head))


def with_extra_module() -> TrainReply:
    adapter = make_adapter()
    return make_reply(
        AdapterFactors({**adapter.lora, "enc.layer.0.key": adapter.lora["enc.layer.0.query"]}, adapter.head)
    )


Q = "enc.layer.0.query"
BROKEN: dict[str, tuple[Callable[[], TrainReply], str]] = {
    "zero examples": (lambda: make_reply(num_examples=0), "num-examples"),
    "negative examples": (lambda: make_reply(num_examples=-5), "num-examples"),
    "too many examples": (lambda: make_reply(num_examples=LIMITS.max_num_examples + 1), "num-examples"),
    "bool examples": (lambda: make_reply(num_examples=True), "num-examples"),
    "float examples": (lambda: make_reply(num_examples=3.0), "num-examples"),
    "node reports another rank": (lambda: make_reply(node=NodeInfo(RANK + 1, SCALING)), "wrong-rank"),
    "factor at another rank": (lambda: with_factor(Q, 0, np.ones((RANK + 1, 5), np.float32)), "wrong-rank"),
    "A/B ranks disagree": (lambda: with_factor(Q, 1, np.ones((6, RANK + 1), np.float32)), "wrong-rank"),
    "zero scaling": (lambda: make_reply(node=NodeInfo(RANK, 0.0)), "scaling"),
    "nan scaling": (lambda: make_reply(node=NodeInfo(RANK, math.nan)), "scaling"),
    "nan metric": (lambda: make_reply(metrics={"loss": math.nan}), "bad-metric"),
    "string metric": (lambda: make_reply(metrics={"loss": "low"}), "bad-metric"),
    "missing module": (lambda: without_module(Q), "missing-key"),
    "missing head": (lambda: with_head("classifier.bias", None), "missing-key"),
    "extra module": (with_extra_module, "unexpected-key"),
    "extra head": (lambda: with_head("pooler.weight", np.ones((2, 2), np.float32)), "unexpected-key"),
    "3-D factor": (lambda: with_factor(Q, 0, np.ones((RANK, 5, 1), np.float32)), "shape"),
    "1-D factor": (lambda: with_factor(Q, 1, np.ones(6, np.float32)), "shape"),
    "wrong in features": (lambda: with_factor(Q, 0, np.ones((RANK, 4), np.float32)), "shape"),
    "wrong out features": (lambda: with_factor(Q, 1, np.ones((7, RANK), np.float32)), "shape"),
    "wrong head shape": (lambda: with_head("classifier.bias", np.ones(4, np.float32)), "shape"),
    "int factor": (lambda: with_factor(Q, 0, np.ones((RANK, 5), np.int32)), "dtype"),
    "complex factor": (lambda: with_factor(Q, 1, np.ones((6, RANK), np.complex64)), "dtype"),
    "float128 factor": (lambda: with_factor(Q, 1, np.ones((6, RANK), np.longdouble)), "dtype"),
    "list factor": (lambda: with_factor(Q, 0, [[1.0] * 5] * RANK), "dtype"),
    "bool head": (lambda: with_head("classifier.bias", np.ones(3, bool)), "dtype"),
    "nan in lora_B": (lambda: with_factor(Q, 1, np.full((6, RANK), np.nan, np.float32)), "non-finite"),
    "inf in lora_A": (lambda: with_factor(Q, 0, np.full((RANK, 5), -np.inf, np.float32)), "non-finite"),
    "inf in head": (lambda: with_head("classifier.bias", np.array([0, np.inf, 0], np.float32)), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_update_rejects_each_broken_reply_with_its_reason(case: str) -> None:
    # Arrange
    build, code = BROKEN[case]
    reply = build()
    # Act
    reason = check_update(reply, RANK, LAYOUT, LIMITS)
    # Assert
    assert reason is not None and reason_code(reason) == code, reason
    assert code in REASON_CODES and len(reason) > len(code) + 2


def test_non_finite_reason_names_factor_and_module() -> None:
    reply = with_factor(Q, 1, np.array([[0.0, np.nan]] * 6, np.float32))
    assert check_update(reply, RANK, LAYOUT, LIMITS) == f"non-finite: lora_B of {Q} contains NaN"


def test_too_large_update_is_rejected() -> None:
    reply = make_reply()
    limits = UpdateLimits(max_bytes=reply.adapter.nbytes - 1)
    reason = check_update(reply, RANK, LAYOUT, limits)
    assert reason is not None and reason.startswith("too-large: ")
    assert check_update(reply, RANK, LAYOUT, UpdateLimits(max_bytes=reply.adapter.nbytes)) is None


def test_without_layout_only_consistency_is_checked_and_the_layout_is_learned() -> None:
    reply = make_reply()
    assert check_update(reply, RANK, None, LIMITS) is None
    assert Layout.from_adapter(reply.adapter) == LAYOUT
    assert check_update(with_extra_module(), RANK, None, LIMITS) is None
    empty = make_reply(AdapterFactors({}, {}))
    assert reason_code(check_update(empty, RANK, None, LIMITS) or "") == "missing-key"
    zero_dim = with_factor(Q, 0, np.ones((RANK, 0), np.float32))
    assert reason_code(check_update(zero_dim, RANK, None, LIMITS) or "") == "shape"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_valid_float_updates_pass(dtype: type) -> None:
    assert check_update(make_reply(make_adapter(dtype=dtype)), RANK, LAYOUT, LIMITS) is None


def test_update_norm_equals_dense_oracle() -> None:
    reply = make_reply()
    dense = [
        np.linalg.norm(SCALING * b.astype(np.float64) @ a.astype(np.float64)) for a, b in reply.adapter.lora.values()
    ]
    assert lora_update_norm(reply) == pytest.approx(math.sqrt(sum(d**2 for d in dense)), rel=1e-9)


def test_update_norm_of_zero_update_is_zero_and_huge_update_stays_finite() -> None:
    zero = AdapterFactors({m: (a, np.zeros_like(b)) for m, (a, b) in make_adapter().lora.items()})
    assert lora_update_norm(make_reply(zero)) == 0.0
    huge = AdapterFactors({Q: (np.full((RANK, 5), 1e150), np.full((6, RANK), 1e150))})
    norm = lora_update_norm(make_reply(huge))
    assert math.isfinite(norm) and norm == pytest.approx(SCALING * 1e300 * RANK * math.sqrt(30), rel=1e-9)


def test_update_norm_of_huge_factors_with_zero_product_is_zero_not_nan() -> None:
    # s·a·b overflows to inf while B·A = 0; inf · 0 would be NaN
    lora_A = np.array([[1e200, 0.0], [0.0, 0.0]])
    lora_B = np.array([[0.0, 1e200]])
    assert lora_update_norm(make_reply(AdapterFactors({Q: (lora_A, lora_B)}))) == 0.0


def test_norm_outliers_use_the_rounds_median() -> None:
    norms = {1: 1.0, 2: 1.2, 3: 0.9, 4: 11.5, 5: 50.0}
    outliers = norm_outliers(norms, factor=10.0)  # median 1.2 → bound 12
    assert set(outliers) == {5}
    assert outliers[5].startswith("norm: ")


def test_norm_outliers_edge_cases() -> None:
    assert set(norm_outliers({1: 1.0, 2: math.nan, 3: math.inf, 4: 1.1}, 10.0)) == {2, 3}
    assert norm_outliers({1: 0.0, 2: 0.0, 3: 5.0}, 10.0) == {}  # median 0: no scale to compare with
    assert norm_outliers({1: 1.0, 2: 1.0, 3: 1e6}, math.inf) == {}
    assert norm_outliers({}, 10.0) == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [("norm_factor", 0.5), ("norm_factor", math.nan), ("max_num_examples", 0), ("max_bytes", -1), ("max_bytes", 1.5)],
)
def test_update_limits_name_the_bad_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        UpdateLimits(**{field: value})  # type: ignore[arg-type]


def test_layout_rejects_non_positive_dimensions() -> None:
    with pytest.raises(ValueError, match="query"):
        Layout({"query": (0, 5)}, {})


def make_instruction(adapter: AdapterFactors | None, rank: int = RANK, scaling: float = SCALING) -> Instruction:
    return Instruction(server_round=3, rank=rank, scaling=scaling, adapter=adapter)


def test_check_instruction_accepts_good_factors_and_no_factors() -> None:
    assert check_instruction(make_instruction(make_adapter()), RANK, LAYOUT, own_scaling=SCALING) is None
    assert check_instruction(make_instruction(None, rank=0, scaling=0.0), RANK, LAYOUT) is None


@pytest.mark.parametrize(
    ("ins", "code"),
    [
        (make_instruction(make_adapter(rank=RANK + 1), rank=RANK + 1), "wrong-rank"),
        (make_instruction(make_adapter(rank=RANK + 1)), "wrong-rank"),
        (make_instruction(make_adapter(), scaling=math.inf), "scaling"),
        (make_instruction(make_adapter(), scaling=2 * SCALING), "scaling"),
        (make_instruction(AdapterFactors(make_adapter().lora, {})), "missing-key"),
        (make_instruction(make_adapter(dtype=np.int64)), "dtype"),
        (make_instruction(with_factor(Q, 0, np.full((RANK, 5), np.nan)).adapter), "non-finite"),
    ],
)
def test_check_instruction_rejects_bad_global_factors(ins: Instruction, code: str) -> None:
    reason = check_instruction(ins, RANK, LAYOUT, own_scaling=SCALING)
    assert reason is not None and reason_code(reason) == code, reason


# --- a real node refuses bad global factors before loading them ------------------------------------------------------


def nan_in_lora_A(adapter: AdapterFactors) -> None:
    module = next(iter(adapter.lora))
    lora_A, lora_B = adapter.lora[module]
    adapter.lora[module] = (np.full_like(lora_A, np.nan), lora_B)


def drop_a_module(adapter: AdapterFactors) -> None:
    adapter.lora.pop(next(iter(adapter.lora)))


def extra_head_key(adapter: AdapterFactors) -> None:
    adapter.head["classifier.extra"] = np.zeros(2, np.float32)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(nan_in_lora_A, "non-finite"), (drop_a_module, "missing-key"), (extra_head_key, "unexpected-key")],
)
def test_a_node_refuses_damaged_global_factors(damage: Callable[[AdapterFactors], None], reason: str) -> None:
    from client.model import get_adapter
    from client.node import build_model
    from client.node_settings import NodeSettings
    from common.config import RunConfig
    from common.lora import lora_scaling

    cfg = RunConfig.from_mapping({"model": "tiny", "task": "tiny", "node-ranks": "2,4"})
    node = NodeSettings.from_node_config(cfg, {"partition-id": 1, "num-partitions": 2})
    scaling = lora_scaling(cfg.lora.lora_alpha, node.rank)
    fresh, _ = build_model(cfg, node, None)
    good = get_adapter(fresh)
    build_model(cfg, node, Instruction(2, node.rank, scaling, good))  # the undamaged factors load
    bad = AdapterFactors(dict(good.lora), dict(good.head))
    damage(bad)

    with pytest.raises(ValueError, match=f"refuses the global factors of round 2: {reason}"):
        build_model(cfg, node, Instruction(2, node.rank, scaling, bad))
