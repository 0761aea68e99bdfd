"""Fuzzing of the record codec and update validation with malformed records (hypothesis).

Property: decoding a record and validating what comes out either returns a value, ``None`` or a reason, or raises
``RecordError`` (a ``ValueError``); never any other exception. Arrays stay tiny so ~1,100 cases run in seconds.
Inputs that once crashed the codec are fuzzed as regression tests at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from common.codec import packing, records
from common.codec.records import RecordError
from common.updates import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterFactors
from common.validation import (
    REASON_CODES,
    Layout,
    UpdateLimits,
    check_instruction,
    check_update,
    lora_update_norm,
    reason_code,
)

TRAIN_CASES = 600
INSTRUCTION_CASES = 300
OTHER_CASES = 200
FUZZ: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "report_multiple_bugs": False,
}

MODULES = {"m.q": (4, 5), "m.v": (4, 5)}
HEAD = {"head.w": (2,)}
LAYOUT = Layout(MODULES, HEAD)
LIMITS = UpdateLimits(max_bytes=4096, max_num_examples=1000)
INT64 = st.integers(-(2**63), 2**63 - 1)
SMALL_INT = st.integers(-3, 5)
NUMBER = st.one_of(SMALL_INT, INT64, st.floats(allow_nan=True, allow_infinity=True))
CONFIG_VALUE = st.one_of(
    NUMBER,
    st.booleans(),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(SMALL_INT, max_size=2),
    st.lists(st.floats(), max_size=2),
    st.lists(st.text(max_size=2), max_size=2),
)
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
PASSES_CODEC = [np.int8, np.int64, np.uint8, np.longdouble]
"""Numeric dtypes the codec lets through; validation must refuse them."""
REFUSED_BY_CODEC = [np.bool_, np.complex64, np.complex128]
SCALES = [1e-30, 1.0, 1e30]
SPECIALS = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, 5e-324, 6.6e4, 3.5e38, 1.7e308, -1.7e308]


def _npy(value: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=allow_pickle)
    return buffer.getvalue()


SEED = st.integers(0, 2**32 - 1)
METRIC_KEYS = st.lists(st.text(max_size=3), max_size=2)
NUM_EXAMPLES_VALUE = st.integers(1, LIMITS.max_num_examples)
GOOD_SCALING = st.floats(0.1, 8.0)
INSTRUCTION_SCALING = 2.0
TEXT = st.text(max_size=3)
WRONG_SLOT = [ConfigRecord, MetricRecord, ArrayRecord, None]


class Plan:
    """Structural choices (break this? which dtype?) from one drawn seed, at the rates the docstrings state.

    Hypothesis favours 0 and boundaries, so ``draw(st.integers(0, n)) == 0`` is far likelier than 1 in n and most
    records came out broken before reaching validation; each draw also costs ~0.2 ms. Values (numbers, text,
    config entries) are still drawn by hypothesis, whose edge cases are the point.
    """

    def __init__(self, draw: st.DrawFn) -> None:
        self.rng = np.random.default_rng(draw(SEED))

    def one_in(self, n: int) -> bool:
        return bool(self.rng.integers(n) == 0)

    def pick(self, options: list[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def keys(self, expected: dict[str, Any], extra: str) -> list[str]:
        """Each expected key 19 times in 20, plus an unexpected one 1 time in 20."""
        return [k for k in expected if not self.one_in(20)] + ([extra] if self.one_in(20) else [])


def tensor(plan: Plan, shape: tuple[int, ...]) -> np.ndarray:
    """A tiny array: the expected shape 15 times in 16, a float dtype 19 times in 20, extreme values 1 time in 4."""
    if plan.one_in(16):
        shape = tuple(int(d) for d in plan.rng.integers(0, 4, size=plan.rng.integers(0, 4)))
    dtype = np.dtype(plan.pick(FLOAT_DTYPES if not plan.one_in(20) else PASSES_CODEC + REFUSED_BY_CODEC))
    value = plan.rng.normal(scale=plan.pick(SCALES), size=shape)
    flat = value.reshape(-1)
    for _ in range(plan.rng.integers(1, 3) if flat.size and plan.one_in(4) else 0):
        flat[plan.rng.integers(flat.size)] = plan.pick(SPECIALS)
    with np.errstate(all="ignore"):  # overflow to inf (float16) and NaN → int casts are part of the fuzz
        return value.astype(dtype)


RAW_ARRAYS = st.one_of(
    st.builds(
        Array,
        dtype=st.sampled_from(["float32", "int8", "object", ""]),
        shape=st.lists(st.integers(0, 3), max_size=3).map(tuple),
        stype=st.sampled_from(["numpy.ndarray", "torch", ""]),
        data=st.binary(max_size=64),
    ),
    st.sampled_from(
        [
            Array("object", (2,), "numpy.ndarray", _npy(np.array([1, "a"], dtype=object), allow_pickle=True)),
            Array(np.array(["ab", "c"])),
            Array(np.array([b"x"])),
            Array(np.array(["2024-01-01"], dtype="datetime64[D]")),
            Array(np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])),
            Array(np.arange(4, dtype=">f4").reshape(2, 2)),
        ]
    ).map(lambda a: Array(a.dtype, a.shape, a.stype, a.data)),
)
"""Arrays whose bytes are garbage, pickled, of an unknown serialisation, or of non-numeric dtypes."""


def adapter_record(draw: st.DrawFn, plan: Plan, rank: int) -> ArrayRecord:
    """An ArrayRecord near the layout: modules and head keys dropped or added, factors broken in many ways, then
    packed as the codec packs (:func:`packed_record`, which breaks the packing itself now and then).

    Each module is at another rank 1 time in 8; each factor is missing 1 time in 80.
    """
    state: dict[str, np.ndarray] = {}
    for module in plan.keys(MODULES, "m.k"):
        d_out, d_in = MODULES.get(module, (3, 5))
        r = int(plan.rng.integers(4)) if plan.one_in(8) else rank
        for suffix, shape in ((LORA_A_SUFFIX, (r, d_in)), (LORA_B_SUFFIX, (d_out, r))):
            if not plan.one_in(80):
                state[module + suffix] = tensor(plan, shape)
    for key in plan.keys(HEAD, "head.b"):
        state[key] = tensor(plan, HEAD.get(key, (3,)))
    return packed_record(draw, plan, state)


LAYOUT_EDITS: list[Any] = [
    lambda lay: lay.pop("dtypes"),
    lambda lay: lay.update(extra=[1]),
    lambda lay: lay["keys"].append("m.q" + LORA_A_SUFFIX),
    lambda lay: lay["keys"].__setitem__(0, 7),
    lambda lay: lay["shapes"].__setitem__(0, [True, 2]),
    lambda lay: lay["shapes"].__setitem__(0, [-1, 5]),
    lambda lay: lay["shapes"].__setitem__(0, [2**40, 2**40]),
    lambda lay: lay["shapes"].__setitem__(0, [1.5]),
    lambda lay: lay["shapes"].__setitem__(0, [1, 1, 1, 1, 1, 1]),
    lambda lay: lay["shapes"].__setitem__(0, list(reversed(lay["shapes"][0]))),
    lambda lay: lay["dtypes"].__setitem__(0, ">f4"),
    lambda lay: lay["dtypes"].__setitem__(0, "object"),
    lambda lay: lay["dtypes"].__setitem__(0, "float64"),
    lambda lay: lay.update(shapes=lay["shapes"][:-1]),
]
"""Layouts that lie about the packed arrays, or are not layouts."""


def packed_record(draw: st.DrawFn, plan: Plan, state: dict[str, np.ndarray]) -> ArrayRecord:
    """``state`` packed (:mod:`common.codec.packing`); 1 time in 40 unpacked (one array per key, as before
    packing); 1 time in 10 a layout edited (:data:`LAYOUT_EDITS`, written canonically or not); 1 time in 12 one
    array replaced by raw bytes; 1 time in 30 an array added."""
    if plan.one_in(40):
        return ArrayRecord({k: Array(v) for k, v in state.items()})
    arrays = packing.pack(state)
    if arrays and plan.one_in(10):
        layout = json.loads(arrays[packing.LAYOUT].tobytes())
        with contextlib.suppress(IndexError, KeyError):
            plan.pick(LAYOUT_EDITS)(layout)
        text = json.dumps(layout, indent=None if plan.one_in(4) else 1)
        arrays[packing.LAYOUT] = np.frombuffer(text.encode(), dtype=np.uint8)
    record = {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
    if record and plan.one_in(12):
        record[plan.pick(sorted(record))] = draw(RAW_ARRAYS)
    if plan.one_in(30):
        record[plan.pick([packing.PREFIX + "float16", packing.LAYOUT + "2", "m.q" + LORA_A_SUFFIX])] = Array(
            np.zeros(3, np.float16)
        )
    return ArrayRecord(record)


def slot(plan: Plan, good: Any) -> Any:
    """The right record 19 times in 20; otherwise an empty record of the wrong kind, or nothing."""
    if not plan.one_in(20):
        return good
    kind = plan.pick(WRONG_SLOT)
    return None if kind is None else kind()


def config(draw: st.DrawFn, plan: Plan, keys: dict[str, Any]) -> dict[str, Any]:
    """Good values for ``keys`` (a value or a strategy); any config value 1 time in 20; missing 1 time in 40."""
    values: dict[str, Any] = {}
    for key, good in keys.items():
        if plan.one_in(40):
            continue
        value = CONFIG_VALUE if plan.one_in(20) else good
        values[key] = draw(value) if isinstance(value, st.SearchStrategy) else value
    return values


@st.composite
def train_replies(draw: st.DrawFn, rank: int) -> RecordDict:
    """A train reply RecordDict with malformed arrays, metrics and node info."""
    plan = Plan(draw)
    drawn = {k: draw(NUMBER) for k in draw(METRIC_KEYS)}
    drawn |= config(draw, plan, {records.NUM_EXAMPLES: NUM_EXAMPLES_VALUE})
    # MetricRecord itself refuses other types; lists, which it accepts, are fuzzed at the end of this file
    metrics: dict[str, Any] = {k: v for k, v in drawn.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    node = config(draw, plan, {records.RANK: rank, records.SCALING: GOOD_SCALING, records.NODE_NAME: TEXT})
    slots = {
        records.ADAPTER: slot(plan, adapter_record(draw, plan, rank)),
        records.METRICS: slot(plan, MetricRecord(metrics)),
        records.NODE: slot(plan, ConfigRecord(node)),
    }
    return RecordDict({k: v for k, v in slots.items() if v is not None})


@st.composite
def instructions(draw: st.DrawFn, rank: int) -> RecordDict:
    """A train/evaluate instruction RecordDict with malformed global factors and config."""
    plan = Plan(draw)
    keys = {
        records.SERVER_ROUND: st.integers(0, 5),
        records.RANK: rank,
        records.SCALING: INSTRUCTION_SCALING,
        records.FREEZE_LORA_A: st.booleans(),
    }
    adapter = ArrayRecord() if plan.one_in(4) else adapter_record(draw, plan, rank)
    slots = {records.ADAPTER: slot(plan, adapter), records.CONFIG: slot(plan, ConfigRecord(config(draw, plan, keys)))}
    return RecordDict({k: v for k, v in slots.items() if v is not None})


@settings(max_examples=TRAIN_CASES, **FUZZ)
@given(data=st.data(), rank=st.integers(1, 3), learned=st.booleans())
def test_fuzz_train_reply_decodes_and_validates_or_raises_record_error(
    data: st.DataObject, rank: int, learned: bool
) -> None:
    content = data.draw(train_replies(rank))
    try:
        reply = records.decode_train_reply(content)
    except RecordError:
        event("RecordError")
        return
    reason = check_update(reply, rank, LAYOUT if learned else None, LIMITS)
    event(f"check_update: {reason_code(reason) if reason else 'valid'}")
    if reason is not None:
        assert reason_code(reason) in REASON_CODES, reason
        return
    assert not math.isnan(lora_update_norm(reply))
    assert check_update(reply, rank, Layout.from_adapter(reply.adapter), LIMITS) is None


@settings(max_examples=INSTRUCTION_CASES, **FUZZ)
@given(data=st.data(), rank=st.integers(1, 3), own_scaling=st.sampled_from([None, INSTRUCTION_SCALING, 3.0]))
def test_fuzz_instruction_decodes_and_validates_or_raises_record_error(
    data: st.DataObject, rank: int, own_scaling: float | None
) -> None:
    content = data.draw(instructions(rank))
    try:
        ins = records.decode_instruction(content)
    except RecordError:
        event("RecordError")
        return
    reason = check_instruction(ins, rank, LAYOUT, own_scaling=own_scaling)
    event(f"check_instruction: {reason_code(reason) if reason else 'valid'}")
    assert reason is None or reason_code(reason) in REASON_CODES, reason


@settings(max_examples=OTHER_CASES, **FUZZ)
@given(data=st.data())
def test_fuzz_evaluate_and_query_replies_decode_or_raise_record_error(data: st.DataObject) -> None:
    content = data.draw(train_replies(rank=2))
    for decode in (records.decode_evaluate_reply, records.decode_query_reply):
        with contextlib.suppress(RecordError):
            decode(content)
    for value in content.values():
        for decode_one in (records.decode_adapter, records.decode_node_info):
            with contextlib.suppress(RecordError):
                decode_one(value)


# Codec crashes the fuzzer once found (list-valued metrics, integers beyond int64); kept as regression tests.
def _good_reply(metrics: dict[str, Any], node: dict[str, Any]) -> RecordDict:
    adapter = {"m.q" + LORA_A_SUFFIX: np.ones((2, 5), np.float32), "m.q" + LORA_B_SUFFIX: np.ones((4, 2), np.float32)}
    return RecordDict(
        {
            records.ADAPTER: records.encode_adapter(AdapterFactors.from_state_dict(adapter)),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 10, **metrics}),
            records.NODE: ConfigRecord({records.RANK: 2, records.SCALING: 1.0, **node}),
        }
    )


@settings(max_examples=20, phases=[Phase.generate], **FUZZ)
@given(value=st.one_of(st.lists(st.integers(-5, 5), max_size=3), st.lists(st.floats(), max_size=3)))
def test_fuzz_list_metric_raises_record_error(value: list[Any]) -> None:
    with pytest.raises(RecordError, match="'loss' must be a number"):
        records.decode_train_reply(_good_reply({"loss": value}, {}))


@settings(max_examples=20, phases=[Phase.generate], **FUZZ)
@given(
    value=st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**64))),
    where=st.sampled_from([records.RANK, records.SCALING, records.NUM_EXAMPLES, "loss"]),
)
def test_fuzz_ints_beyond_int64_raise_record_error(value: int, where: str) -> None:
    in_node = where in (records.RANK, records.SCALING)
    if where == "loss":
        value *= 10**400  # float() of a metric overflows only beyond the float range
    content = _good_reply({} if in_node else {where: value}, {where: value} if in_node else {})
    with pytest.raises(RecordError, match=f"'{where}' is out of range"):
        records.decode_train_reply(content)
