"""Factored norms and inner products of ΔW = s·B·A against dense float64 products, and the boundary of `common`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.lora import LoRAFactors, frobenius_inner, frobenius_norm_sq, weighted_sum_norm_sq

PROPERTY = settings(max_examples=40, deadline=None)


@st.composite
def factor_sets(draw: st.DrawFn) -> tuple[list[LoRAFactors], list[float]]:
    """1–6 updates of one module (shared out × in), mixed ranks and α/r or α/√r scalings, real weights."""
    out_f = draw(st.integers(1, 24))
    in_f = draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    parts, weights = [], []
    for _ in range(draw(st.integers(1, 6))):
        r = draw(st.integers(1, 8))
        alpha = draw(st.sampled_from([1.0, 8.0, 16.0]))
        scaling = alpha / (r**0.5 if draw(st.booleans()) else r)
        parts.append(LoRAFactors.from_arrays(rng.normal(size=(r, in_f)), rng.normal(size=(out_f, r)), scaling))
        weights.append(float(rng.uniform(-2.0, 2.0)))
    return parts, weights


def dense(x: LoRAFactors) -> np.ndarray:
    return x.scaling * (x.lora_B.double().numpy() @ x.lora_A.double().numpy())


@PROPERTY
@given(factor_sets())
def test_inner_product_equals_dense(case: tuple[list[LoRAFactors], list[float]]) -> None:
    parts, _ = case
    x, y = parts[0], parts[-1]
    expected = float(np.sum(dense(x) * dense(y)))
    assert float(frobenius_inner(x, y)) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert float(frobenius_norm_sq(x)) == pytest.approx(float(np.sum(dense(x) ** 2)), rel=1e-9, abs=1e-12)


@PROPERTY
@given(factor_sets())
def test_weighted_sum_norm_equals_dense(case: tuple[list[LoRAFactors], list[float]]) -> None:
    parts, weights = case
    total = sum(w * dense(x) for x, w in zip(parts, weights, strict=True))
    assert float(weighted_sum_norm_sq(parts, weights)) == pytest.approx(float(np.sum(total**2)), rel=1e-8, abs=1e-9)


def test_not_transposed_for_non_square() -> None:
    rng = np.random.default_rng(0)
    x = LoRAFactors.from_arrays(rng.normal(size=(3, 40)), rng.normal(size=(7, 3)), 2.0)
    y = LoRAFactors.from_arrays(rng.normal(size=(5, 40)), rng.normal(size=(7, 5)), 0.5)
    assert float(frobenius_inner(x, y)) == pytest.approx(float(np.sum(dense(x) * dense(y))), rel=1e-9)
    assert float(frobenius_inner(x, y)) == pytest.approx(float(frobenius_inner(y, x)), rel=1e-12)


def test_the_maths_of_common_loads_no_flower() -> None:
    """Everything in `common` but the codec package (DESIGN §2: the one place that speaks Flower) is Flower-free:
    imported, not only as written (tests/test_layers.py checks every import statement)."""
    root = Path(__file__).resolve().parents[1]
    pure = sorted(
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for path in (root / "common").rglob("*.py")
        if "codec" not in path.relative_to(root).parts
    )
    assert "common.rules.svd" in pure and "common.config" in pure
    code = f"import sys; import {', '.join(pure)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"a pure module of common imported Flower: {loaded}"
