"""Validation of every update before it touches the aggregate, and of the global factors a node receives.

Pure checks over :mod:`common.updates` types: no Flower, no I/O. The codec (:mod:`common.codec.records`) has already
checked the structure of a record; this module checks what the values mean. A check returns ``None`` when the value
is valid, or a *reason*: a stable machine-readable code, a colon, and a human message, e.g.::

    "non-finite: lora_B of encoder.layer.0.attention.self.query contains NaN"

:func:`reason_code` extracts the code; :data:`REASON_CODES` lists every code a check can return. Rejected updates are
data (logged and recorded with their reason), never exceptions.

The norm rule is robust to scale: a node is an outlier when its ‖ΔW‖_F, taken over all its modules with
ΔW = s·B·A computed in factored form (:func:`common.lora.frobenius_norm_sq`), exceeds ``norm_factor`` times the
round's median; the same holds for its head's ‖head‖_F (:func:`head_norm`), which a node sends whole. The rule
needs at least three nodes to separate anything: with two, the median is their mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.lora import LoRAFactors, frobenius_norm_sq
from common.updates import AdapterFactors, Instruction, TrainReply

NUM_EXAMPLES = "num-examples"
TOO_LARGE = "too-large"
SCALING = "scaling"
BAD_METRIC = "bad-metric"
MISSING_KEY = "missing-key"
UNEXPECTED_KEY = "unexpected-key"
WRONG_RANK = "wrong-rank"
SHAPE = "shape"
DTYPE = "dtype"
NON_FINITE = "non-finite"
NORM = "norm"
REASON_CODES = (
    NUM_EXAMPLES,
    TOO_LARGE,
    SCALING,
    BAD_METRIC,
    MISSING_KEY,
    UNEXPECTED_KEY,
    WRONG_RANK,
    SHAPE,
    DTYPE,
    NON_FINITE,
    NORM,
)
"""Every code a check here can return, as the prefix of its reason."""

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
"""Names of the dtypes a factor or head tensor may have."""


def reason_code(reason: str) -> str:
    """Return the machine-readable code of a reason (the text before the first colon)."""
    return reason.split(":", 1)[0]


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds an incoming update must respect."""

    norm_factor: float = 10.0
    """Reject ‖ΔW‖_F above ``norm_factor`` × the round's median ‖ΔW‖_F (≥ 1; ``math.inf`` disables the rule)."""
    max_num_examples: int = 10_000_000
    """Largest ``num_examples`` a node may claim (its FedAvg weight)."""
    max_bytes: int = 1 << 30
    """Largest total size of an update's arrays, in bytes."""
    max_rank: int = 64
    """Largest rank a node may declare (the run's ``max-rank``)."""

    def __post_init__(self) -> None:
        if isinstance(self.norm_factor, bool) or not isinstance(self.norm_factor, int | float):
            raise ValueError(f"norm_factor must be a number, got norm_factor={self.norm_factor!r}")
        if math.isnan(self.norm_factor) or self.norm_factor < 1:
            raise ValueError(f"norm_factor must be >= 1 (inf disables the rule), got norm_factor={self.norm_factor}")
        for name in ("max_num_examples", "max_bytes", "max_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


@dataclass(frozen=True)
class Layout:
    """The adapter shapes the coordinator (or a node) expects, independent of rank."""

    modules: Mapping[str, tuple[int, int]]
    """LoRA target module → (out, in) of its base weight."""
    head: Mapping[str, tuple[int, ...]]
    """Head state-dict key → tensor shape."""

    def __post_init__(self) -> None:
        for module, dims in self.modules.items():
            if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
                raise ValueError(f"module {module!r} needs (out, in) positive integers, got {dims!r}")

    @classmethod
    def from_adapter(cls, adapter: AdapterFactors) -> Layout:
        """Learn the layout from an adapter that passed :func:`check_update` with no layout."""
        modules = {m: (int(b.shape[0]), int(a.shape[1])) for m, (a, b) in adapter.lora.items()}
        return cls(modules, {k: tuple(int(d) for d in v.shape) for k, v in adapter.head.items()})


def check_update(
    reply: TrainReply,
    expected_rank: int,
    layout: Layout | None,
    limits: UpdateLimits,
    expected_scaling: float | None = None,
) -> str | None:
    """Return why a node's train reply must be rejected, or ``None`` when it may be aggregated.

    Parameters
    ----------
    reply
        The decoded reply.
    expected_rank
        The rank the coordinator knows for this node; the reply's node rank and every factor must agree.
    layout
        The expected modules and head; ``None`` before the first valid reply (then only internal consistency is
        checked and the caller learns the layout with :meth:`Layout.from_adapter`).
    limits
        Bounds on the example count and size. The norm rule needs the whole round: see :func:`norm_outliers`.
    expected_scaling
        The scaling the coordinator knows for this node (None for a node it has not met).

    Returns
    -------
    str or None
        A reason whose code (:func:`reason_code`) is one of :data:`REASON_CODES` except ``norm``.
    """
    n = reply.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= limits.max_num_examples:
        return f"{NUM_EXAMPLES}: {n!r} is not an integer in [1, {limits.max_num_examples}]"
    if reply.node.rank != expected_rank:
        return f"{WRONG_RANK}: node reports rank {reply.node.rank}, the coordinator knows rank {expected_rank}"
    if expected_rank > limits.max_rank:
        return f"{WRONG_RANK}: node reports rank {expected_rank}, above max-rank {limits.max_rank}"
    if not (_is_finite_number(reply.node.scaling) and reply.node.scaling > 0):
        return f"{SCALING}: node reports scaling {reply.node.scaling!r}; it must be positive and finite"
    if expected_scaling is not None and reply.node.scaling != expected_scaling:
        return f"{SCALING}: node reports scaling {reply.node.scaling:.6g}, the coordinator knows {expected_scaling:.6g}"
    for key, value in reply.metrics.items():
        if not _is_finite_number(value):
            return f"{BAD_METRIC}: metric {key!r} is {value!r}, not a finite number"
    return _check_adapter(reply.adapter, expected_rank, layout, limits.max_bytes)


def check_instruction(
    ins: Instruction, own_rank: int, layout: Layout, *, own_scaling: float | None = None
) -> str | None:
    """Return why a node must refuse the global factors it received, or ``None`` when it may load them.

    The same checks as :func:`check_update`, on the node: the factors must be at the node's own rank, match its
    model's layout exactly, and be finite floats. With ``own_scaling``, the scaling the factors were split for
    must be the node's own (else s_j·B·A is not the global update). No adapter (before the first aggregation) is
    valid.
    """
    if ins.adapter is None:
        return None
    if ins.rank != own_rank:
        return f"{WRONG_RANK}: instruction is at rank {ins.rank}, this node has rank {own_rank}"
    if not (_is_finite_number(ins.scaling) and ins.scaling > 0):
        return f"{SCALING}: instruction scaling {ins.scaling!r} is not positive and finite"
    if own_scaling is not None and not math.isclose(ins.scaling, own_scaling, rel_tol=1e-9):
        return f"{SCALING}: factors were split for scaling {ins.scaling}, this node's scaling is {own_scaling}"
    return _check_adapter(ins.adapter, own_rank, layout, max_bytes=None)


def lora_update_norm(reply: TrainReply) -> float:
    """Return ‖ΔW‖_F over all LoRA modules of a checked reply, ΔW = s·B·A in factored form (head excluded).

    Each module's norm is ``s·a·b·‖(B/b)(A/a)‖_F`` with a, b the largest magnitudes of A and B, so huge but finite
    factors give a finite norm where ``s²·tr((BᵀB)(AAᵀ))`` would overflow; the module norms are combined with
    ``math.hypot`` for the same reason. The head is excluded: it carries weights, not an update.
    """
    scaling = float(reply.node.scaling)
    return math.hypot(*(_module_norm(a, b, scaling) for a, b in reply.adapter.lora.values()))


def head_norm(reply: TrainReply) -> float:
    """‖head‖_F over every head tensor of a checked reply (the head is sent whole, not as a change)."""
    return math.hypot(*(float(np.linalg.norm(np.asarray(t, dtype=np.float64))) for t in reply.adapter.head.values()))


def norm_outliers(norms: Mapping[int, float], factor: float, what: str = "‖ΔW‖_F") -> dict[int, str]:
    """Return node id → reason for every norm above ``factor`` × the median of the round's finite norms.

    A non-finite (or negative) norm is always an outlier. When the median is 0 there is no scale to compare with and
    no finite norm is rejected. ``what`` names the norm in the reason.
    """
    outliers = {
        node: f"{NORM}: {what} is {value}, not a finite non-negative number"
        for node, value in norms.items()
        if not (math.isfinite(value) and value >= 0)
    }
    finite = [v for node, v in norms.items() if node not in outliers]
    if not finite:
        return outliers
    median = float(np.median(finite))
    bound = factor * median
    for node, value in norms.items():
        if node not in outliers and median > 0 and value > bound:
            outliers[node] = f"{NORM}: {what} = {value:.4g} is above {factor:g} × the round's median {median:.4g}"
    return outliers


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_adapter(adapter: AdapterFactors, rank: int, layout: Layout | None, max_bytes: int | None) -> str | None:
    state = adapter.to_state_dict()
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            return f"{DTYPE}: {key} is a {type(value).__name__}, not a numpy array"
    if max_bytes is not None:
        nbytes = sum(int(v.nbytes) for v in state.values())
        if nbytes > max_bytes:
            return f"{TOO_LARGE}: update holds {nbytes} bytes, the limit is {max_bytes}"
    reason = _check_keys(adapter, layout)
    if reason is not None:
        return reason
    for key, value in state.items():
        if value.dtype.name not in FLOAT_DTYPES:
            return f"{DTYPE}: {key} has dtype {value.dtype}; allowed: {', '.join(sorted(FLOAT_DTYPES))}"
    for module, (lora_A, lora_B) in adapter.lora.items():
        expected = layout.modules[module] if layout is not None else None
        reason = _check_factor_shapes(module, lora_A, lora_B, rank, expected)
        if reason is not None:
            return reason
    for key, value in adapter.head.items():
        if layout is not None and value.shape != layout.head[key]:
            return f"{SHAPE}: head {key} has shape {value.shape}, expected {layout.head[key]}"
        if value.size == 0:
            return f"{SHAPE}: head {key} is empty (shape {value.shape})"
    for key, value in state.items():
        if not np.isfinite(value).all():
            what = "NaN" if np.isnan(value).any() else "Inf"
            return f"{NON_FINITE}: {_describe(key)} contains {what}"
    return None


def _check_keys(adapter: AdapterFactors, layout: Layout | None) -> str | None:
    if layout is None:
        return None if adapter.lora else f"{MISSING_KEY}: the update has no LoRA module"
    for kind, got, want in (("module", adapter.lora, layout.modules), ("head key", adapter.head, layout.head)):
        missing = sorted(set(want) - set(got))
        if missing:
            return f"{MISSING_KEY}: {kind} {missing[0]} is missing ({len(missing)} missing in all)"
        unexpected = sorted(set(got) - set(want))
        if unexpected:
            return (
                f"{UNEXPECTED_KEY}: {kind} {unexpected[0]} is not in the layout ({len(unexpected)} unexpected in all)"
            )
    return None


def _check_factor_shapes(
    module: str, lora_A: np.ndarray, lora_B: np.ndarray, rank: int, expected: tuple[int, int] | None
) -> str | None:
    if lora_A.ndim != 2 or lora_B.ndim != 2:
        return f"{SHAPE}: {module} needs 2-D factors, got lora_A {lora_A.shape} and lora_B {lora_B.shape}"
    if lora_A.shape[0] != rank or lora_B.shape[1] != rank:
        return f"{WRONG_RANK}: {module} has lora_A {lora_A.shape} and lora_B {lora_B.shape}, expected rank {rank}"
    out_features, in_features = int(lora_B.shape[0]), int(lora_A.shape[1])
    if expected is not None and (out_features, in_features) != expected:
        return f"{SHAPE}: {module} has (out, in) = {(out_features, in_features)}, the layout says {expected}"
    if out_features == 0 or in_features == 0:
        return f"{SHAPE}: {module} has an empty dimension (out, in) = {(out_features, in_features)}"
    if rank > min(out_features, in_features):
        return (
            f"{WRONG_RANK}: {module} is {out_features}×{in_features}, which holds no rank above "
            f"{min(out_features, in_features)}; the node declares {rank}"
        )
    return None


def _describe(key: str) -> str:
    for factor in ("lora_A", "lora_B"):
        suffix = f".{factor}.weight"
        if key.endswith(suffix):
            return f"{factor} of {key[: -len(suffix)]}"
    return f"head {key}"


def _module_norm(lora_A: np.ndarray, lora_B: np.ndarray, scaling: float) -> float:
    a = np.asarray(lora_A, dtype=np.float64)  # (r, in)
    b = np.asarray(lora_B, dtype=np.float64)  # (out, r)
    max_a = float(np.abs(a).max()) if a.size else 0.0
    max_b = float(np.abs(b).max()) if b.size else 0.0
    if max_a == 0.0 or max_b == 0.0:
        return 0.0
    unit = LoRAFactors.from_arrays(a / max_a, b / max_b, 1.0)
    unit_norm = math.sqrt(float(frobenius_norm_sq(unit)))
    if unit_norm == 0.0:  # B·A = 0 with huge factors: inf · 0 would be NaN
        return 0.0
    return unit_norm * max_a * max_b * scaling  # may overflow to inf, which the norm rule rejects
