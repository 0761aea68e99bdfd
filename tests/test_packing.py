"""The packed adapter on the wire (:mod:`common.codec.packing`): exact round trips, few objects, strict refusals."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codec import packing, records
from common.updates import LORA_A_SUFFIX, LORA_B_SUFFIX, AdapterFactors, Instruction

DTYPES = ["float16", "float32", "float64", "int8", "int64", "uint8"]
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=80, deadline=None, database=None)
@given(
    entries=st.dictionaries(st.text(min_size=1, max_size=6), st.tuples(SHAPES, st.sampled_from(DTYPES)), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_unpack_returns_every_tensor_bit_for_bit_in_order(entries: dict[str, Any], seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = {k: (rng.normal(size=shape) * 100).astype(dtype) for k, (shape, dtype) in entries.items()}

    arrays = packing.pack(state)
    back = packing.unpack(arrays)

    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert back[key].tobytes() == value.tobytes()
    assert len(arrays) == (len({v.dtype for v in state.values()}) + 1 if state else 0)


def minilm_shaped(rank: int) -> AdapterFactors:
    """A MiniLM-L6-shaped adapter: query and value of 6 layers at ``rank``, and a 20-label head."""
    rng = np.random.default_rng(rank)
    lora = {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}": (
            rng.normal(size=(rank, 384)).astype(np.float32),
            rng.normal(size=(384, rank)).astype(np.float32),
        )
        for i in range(6)
        for m in ("query", "value")
    }
    head = {
        "base_model.model.classifier.modules_to_save.default.weight": np.zeros((20, 384), np.float32),
        "base_model.model.classifier.modules_to_save.default.bias": np.zeros(20, np.float32),
    }
    return AdapterFactors(lora, head)


def flower_objects(content: RecordDict) -> int:
    """How many objects Flower 1.42 moves one by one between SuperLink and SuperNode for a message."""
    message: Message = make_message(Metadata(1, "", 0, 1, "", "1", 0.0, 60.0, "train"), content)
    return len(get_all_nested_objects(message))


def test_a_minilm_instruction_is_a_handful_of_flower_objects_whatever_its_module_count() -> None:
    adapter = minilm_shaped(8)
    ins = Instruction(server_round=1, rank=8, scaling=2.0, adapter=adapter)
    per_array = RecordDict({records.ADAPTER: ArrayRecord({k: Array(v) for k, v in adapter.to_state_dict().items()})})

    packed = flower_objects(records.encode_instruction(ins))
    unpacked = flower_objects(per_array)

    assert len(adapter.to_state_dict()) == 26
    assert packed <= 10, packed
    assert unpacked >= 2 * 26, unpacked  # one Array and one chunk per tensor: what a message cost before packing


def test_the_codec_round_trips_an_instruction_through_packed_arrays() -> None:
    ins = Instruction(server_round=3, rank=8, scaling=2.0, adapter=minilm_shaped(8))

    content = records.encode_instruction(ins)
    back = records.decode_instruction(content)

    assert sorted(content[records.ADAPTER].keys()) == [packing.PREFIX + "float32", packing.LAYOUT]
    assert back.adapter is not None
    for key, value in ins.adapter.to_state_dict().items():  # type: ignore[union-attr]
        assert np.array_equal(back.adapter.to_state_dict()[key], value)


def _packed_two() -> dict[str, np.ndarray]:
    state = {"m.q" + LORA_A_SUFFIX: np.ones((2, 5), np.float32), "m.q" + LORA_B_SUFFIX: np.ones((4, 2), np.float32)}
    return packing.pack(state)


def _with_layout(edit: Any, canonical: bool = True) -> dict[str, np.ndarray]:
    arrays = _packed_two()
    layout = json.loads(arrays[packing.LAYOUT].tobytes())
    edit(layout)
    text = json.dumps(layout) if canonical else json.dumps(layout, indent=2)
    arrays[packing.LAYOUT] = np.frombuffer(text.encode(), np.uint8)
    return arrays


@pytest.mark.parametrize(
    ("arrays", "named"),
    [
        ({"m.q.lora_A.weight": np.ones((2, 5), np.float32)}, "has no 'packed.layout'"),
        (_with_layout(lambda lay: None, canonical=False), "not in the canonical form"),
        (_with_layout(lambda lay: lay.update(note="hello")), "exactly the fields"),
        (_with_layout(lambda lay: lay["keys"].__setitem__(1, lay["keys"][0])), "distinct"),
        (_with_layout(lambda lay: lay["shapes"].__setitem__(0, [-2, 5])), "sizes in 0..2^31"),
        (_with_layout(lambda lay: lay["shapes"].__setitem__(0, [True, 5])), "sizes in 0..2^31"),
        (_with_layout(lambda lay: lay["shapes"].__setitem__(0, [3, 5])), "has 18 values; its layout needs 23"),
        (_with_layout(lambda lay: lay["dtypes"].__setitem__(0, "<f4")), "numeric numpy dtype name"),
        (_with_layout(lambda lay: lay["dtypes"].__setitem__(0, "bool")), "numeric numpy dtype name"),
        (_with_layout(lambda lay: lay["dtypes"].__setitem__(0, "float64")), "lacks 'packed.float64'"),
        ({**_packed_two(), "packed.float16": np.zeros(1, np.float16)}, "'packed.float16' is not in its layout"),
        ({**_packed_two(), "packed.float32": np.zeros(18, ">f4")}, "must be a 1-D native float32 array"),
        ({**_packed_two(), "packed.float32": np.zeros((2, 9), np.float32)}, "must be a 1-D native float32 array"),
        ({**_packed_two(), packing.LAYOUT: np.frombuffer(b"\xff\xfe", np.uint8)}, "not UTF-8 JSON"),
        ({**_packed_two(), packing.LAYOUT: np.zeros(3, np.int32)}, "1-D uint8 array"),
    ],
)
def test_unpack_refuses_a_record_that_does_not_fit_its_layout(arrays: dict[str, np.ndarray], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        packing.unpack(arrays)
