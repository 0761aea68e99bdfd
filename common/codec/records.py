"""The one codec between Flower records and fedlora's plain types; it owns every record key.

Nothing else in fedlora reads or writes a ``RecordDict`` key. Decoding checks structure (keys, types, array
shapes are 2-D, numbers are numbers) and raises :class:`RecordError` naming the problem; the semantic checks
(ranks, dimensions, finiteness, norms) are in :mod:`common.validation`. The SecAgg+ path's keys are in
:mod:`common.codec.secure_records`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.codec import packing
from common.updates import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    AdapterFactors,
    EvaluateReply,
    Instruction,
    NodeInfo,
    TrainReply,
)

ADAPTER = "lora"
CONFIG = "config"
METRICS = "metrics"
NODE = "node"

SERVER_ROUND = "server-round"
RANK = "rank"
SCALING = "scaling"
FREEZE_LORA_A = "freeze-lora-a"
NUM_EXAMPLES = "num-examples"
NODE_NAME = "name"
NODE_DEVICE = "device"


class RecordError(ValueError):
    """A record does not have the structure fedlora expects."""


def encode_adapter(adapter: AdapterFactors) -> ArrayRecord:
    """Adapter → ArrayRecord of a few packed arrays (:mod:`common.codec.packing`), keyed like peft's state dict."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in packing.pack(adapter.to_state_dict()).items()})


def adapter_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The tensors of an adapter record by their peft keys; a RecordError when the packed arrays do not decode."""
    arrays: dict[str, np.ndarray] = {}
    for key in record.keys():
        try:
            arrays[key] = record[key].numpy()
        except Exception as err:  # a malformed Array can fail to deserialise in many ways
            raise RecordError(f"array {key!r} cannot be decoded: {err}") from None
    try:
        return packing.unpack(arrays)
    except ValueError as err:
        raise RecordError(str(err)) from None


def decode_adapter(record: Any) -> AdapterFactors:
    """ArrayRecord → adapter; rejects a record that does not unpack and object or non-numeric dtypes."""
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"'{ADAPTER}' must be an ArrayRecord, got {type(record).__name__}")
    state = adapter_state(record)
    for key, value in state.items():
        if value.ndim != 2 and (key.endswith(LORA_A_SUFFIX) or key.endswith(LORA_B_SUFFIX)):
            raise RecordError(f"LoRA factor {key!r} must be 2-D, got shape {value.shape}")
    try:
        return AdapterFactors.from_state_dict(state)
    except ValueError as err:
        raise RecordError(str(err)) from None


def encode_node_info(node: NodeInfo) -> ConfigRecord:
    """NodeInfo → ConfigRecord."""
    return ConfigRecord({RANK: node.rank, SCALING: node.scaling, NODE_NAME: node.name, NODE_DEVICE: node.device})


def decode_node_info(record: Any, max_rank: int | None = None) -> NodeInfo:
    """ConfigRecord → NodeInfo, with the rank an integer in 1..``max_rank`` and the scaling a positive number."""
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"'{NODE}' must be a ConfigRecord, got {type(record).__name__}")
    unknown = sorted(set(record.keys()) - {RANK, SCALING, NODE_NAME, NODE_DEVICE})
    if unknown:
        raise RecordError(f"'{NODE}' has a key this codec does not know: {unknown[0]!r}")
    rank = _number(record, RANK, int)
    scaling = _number(record, SCALING, float)
    if rank < 1:
        raise RecordError(f"node reports rank {rank}; a LoRA rank must be >= 1")
    if max_rank is not None and rank > max_rank:
        raise RecordError(f"node reports rank {rank}, above the run's max-rank {max_rank}")
    if not (np.isfinite(scaling) and scaling > 0):
        raise RecordError(f"node reports scaling {scaling}; it must be positive and finite")
    return NodeInfo(rank, scaling, str(record.get(NODE_NAME, "")), str(record.get(NODE_DEVICE, "")))


def encode_instruction(ins: Instruction) -> RecordDict:
    """Instruction → RecordDict for a train or evaluate message."""
    config = ConfigRecord(
        {SERVER_ROUND: ins.server_round, RANK: ins.rank, SCALING: ins.scaling, FREEZE_LORA_A: ins.freeze_lora_A}
    )
    adapter = encode_adapter(ins.adapter) if ins.adapter is not None else ArrayRecord()
    return RecordDict({ADAPTER: adapter, CONFIG: config})


def decode_instruction(content: RecordDict) -> Instruction:
    """RecordDict → Instruction (an empty adapter record means "no global factors yet")."""
    config = _get(content, CONFIG, ConfigRecord)
    record = _get(content, ADAPTER, ArrayRecord)
    adapter = decode_adapter(record) if len(record) else None
    return Instruction(
        server_round=_number(config, SERVER_ROUND, int),
        rank=_number(config, RANK, int),
        scaling=_number(config, SCALING, float),
        adapter=adapter,
        freeze_lora_A=bool(config.get(FREEZE_LORA_A, False)),
    )


def encode_train_reply(reply: TrainReply) -> RecordDict:
    """TrainReply → RecordDict."""
    metrics = MetricRecord({NUM_EXAMPLES: reply.num_examples, **reply.metrics})
    return RecordDict({ADAPTER: encode_adapter(reply.adapter), METRICS: metrics, NODE: encode_node_info(reply.node)})


def decode_train_reply(content: RecordDict, max_rank: int | None = None) -> TrainReply:
    """RecordDict → TrainReply; a record it does not know is refused, not ignored."""
    _only(content, (ADAPTER, METRICS, NODE))
    metrics = _metrics(content)
    num_examples = _number(metrics, NUM_EXAMPLES, int)
    return TrainReply(
        adapter=decode_adapter(_get(content, ADAPTER, ArrayRecord)),
        num_examples=num_examples,
        node=decode_node_info(_get(content, NODE, ConfigRecord), max_rank),
        metrics=_float_metrics(metrics),
    )


def encode_evaluate_reply(reply: EvaluateReply) -> RecordDict:
    """EvaluateReply → RecordDict."""
    metrics = MetricRecord({NUM_EXAMPLES: reply.num_examples, **reply.metrics})
    return RecordDict({METRICS: metrics, NODE: encode_node_info(reply.node)})


def decode_evaluate_reply(content: RecordDict, max_rank: int | None = None) -> EvaluateReply:
    """RecordDict → EvaluateReply; a record it does not know is refused, not ignored."""
    _only(content, (METRICS, NODE))
    metrics = _metrics(content)
    return EvaluateReply(
        num_examples=_number(metrics, NUM_EXAMPLES, int),
        node=decode_node_info(_get(content, NODE, ConfigRecord), max_rank),
        metrics=_float_metrics(metrics),
    )


def encode_query() -> RecordDict:
    """The coordinator's "who are you" query (rank discovery)."""
    return RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 0})})


def encode_query_reply(node: NodeInfo) -> RecordDict:
    """A node's answer to the query."""
    return RecordDict({NODE: encode_node_info(node)})


def decode_query_reply(content: RecordDict, max_rank: int | None = None) -> NodeInfo:
    """RecordDict → NodeInfo."""
    return decode_node_info(_get(content, NODE, ConfigRecord), max_rank)


def server_round_of(content: RecordDict) -> int | None:
    """The ``server-round`` of an instruction, or None when the record does not carry one."""
    config = content.get(CONFIG)
    value = config.get(SERVER_ROUND) if isinstance(config, ConfigRecord) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _only(content: RecordDict, known: tuple[str, ...]) -> None:
    """A reply carries the records of its kind and nothing else (an extra record would be data nobody checks)."""
    unknown = sorted(set(content.keys()) - set(known))
    if unknown:
        raise RecordError(f"reply has a record this codec does not know: {unknown[0]!r} (expected {list(known)})")


def _get(content: RecordDict, key: str, kind: type) -> Any:
    if key not in content:
        raise RecordError(f"record is missing '{key}' (has {sorted(content.keys())})")
    value = content[key]
    if not isinstance(value, kind):
        raise RecordError(f"'{key}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _metrics(content: RecordDict) -> MetricRecord:
    record: MetricRecord = _get(content, METRICS, MetricRecord)
    return record


def _float_metrics(metrics: MetricRecord) -> dict[str, float]:
    """Every metric but ``num-examples`` as a float; a list or non-finite value is a RecordError."""
    out = {}
    for key in metrics.keys():
        if key != NUM_EXAMPLES:
            out[key] = float(_number(metrics, key, float))
    return out


def _number(record: Mapping[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    if key not in record:
        raise RecordError(f"record is missing '{key}'")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"'{key}' must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(f"'{key}' must be finite, got {value!r}")
    if isinstance(value, int) and abs(value) >= 2**63:  # a record on the wire holds 64-bit integers
        raise RecordError(f"'{key}' is out of range: {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise RecordError(f"'{key}' must be an integer, got {value!r}")
    try:
        converted = kind(value)
    except OverflowError:
        raise RecordError(f"'{key}' is out of range: {value!r}") from None
    if isinstance(converted, float) and not math.isfinite(converted):
        raise RecordError(f"'{key}' is out of range: {value!r}")
    if kind is int and abs(converted) > 2**62:
        raise RecordError(f"'{key}' is out of range: {value!r}")
    return converted
