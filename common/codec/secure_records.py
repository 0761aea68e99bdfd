"""The codec of the SecAgg+ path: Flower's legacy ``FitRes`` records around fedlora's plain types.

Flower 1.42 has SecAgg+ only on its legacy workflow path: ``secaggplus_mod`` reads a node's train reply as a legacy
``FitRes`` (``compat.recorddict_to_fitres``), masks its parameters and clears every ArrayRecord of the reply; the
``SecAggPlusWorkflow`` then gives the coordinator one ``FitRes`` per node whose ``parameters`` are the unmasked
weighted mean of everyone's. So on this path a node's reply is a ``FitRes`` whose parameters are its summands
(:mod:`common.secure_sum`) and whose metrics carry, in clear, its :class:`NodeInfo`, its metrics and the summand keys.

This module owns the keys of that path; :mod:`common.codec.records` owns those of the normal path (the instruction
a node receives is the normal one plus the ``secure`` record with the round's padding rank).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from common.codec import records
from common.rules.base import Rule
from common.secure_sum import secure_summands
from common.updates import NodeInfo, TrainReply

SECURE = "secure"
"""ConfigRecord added to a train instruction on the SecAgg+ path."""
PAD_RANK = "pad-rank"
"""The rank every node zero-pads its factors to in this round (the largest rank sampled)."""
SUMMAND_KEYS = "summand-keys"
"""FitRes metric: JSON list of the summand keys, in the order of the parameters."""
NODE_PREFIX = "node."
"""FitRes metrics that carry the node's info (``node.rank``, ``node.scaling``, …)."""


@dataclass(frozen=True)
class SecureReply:
    """What the coordinator learns from one node on the SecAgg+ path: everything but its update."""

    node: NodeInfo
    num_examples: int
    metrics: dict[str, float]
    summand_keys: list[str]


def with_pad_rank(content: RecordDict, pad_rank: int) -> RecordDict:
    """A copy of a train instruction's records plus the ``secure`` record with the padding rank."""
    if pad_rank < 1:
        raise ValueError(f"pad-rank must be >= 1, got {pad_rank}")
    out = RecordDict(dict(content.items()))
    out[SECURE] = ConfigRecord({PAD_RANK: int(pad_rank)})
    return out


def pad_rank_of(content: RecordDict) -> int:
    """The padding rank of a SecAgg+ train instruction; a RecordError when the record is missing or malformed."""
    record = content.get(SECURE)
    value = record.get(PAD_RANK) if isinstance(record, ConfigRecord) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise records.RecordError(f"SecAgg+ train instruction lacks a valid '{SECURE}.{PAD_RANK}', got {value!r}")
    return value


def encode_fit_res(reply: TrainReply, pad_rank: int, rule: Rule) -> tuple[RecordDict, list[np.ndarray]]:
    """A train reply as a legacy FitRes record (summands as parameters), and the summands themselves."""
    keys, summands = secure_summands(reply.adapter, reply.node.scaling, pad_rank, rule)
    info = records.encode_node_info(reply.node)
    metrics: dict[str, bool | bytes | float | int | str] = {f"{NODE_PREFIX}{k}": v for k, v in info.items()}  # type: ignore[misc]
    metrics.update(reply.metrics)
    metrics[SUMMAND_KEYS] = json.dumps(keys)
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(summands), reply.num_examples, metrics)
    return compat.fitres_to_recorddict(fit_res, keep_input=False), summands


def decode_fit_res(fit_res: FitRes, max_rank: int | None = None) -> SecureReply:
    """The clear part of a node's FitRes; a RecordError naming what is missing or malformed."""
    metrics = dict(fit_res.metrics)
    info = ConfigRecord({k[len(NODE_PREFIX) :]: v for k, v in metrics.items() if k.startswith(NODE_PREFIX)})
    node = records.decode_node_info(info, max_rank)
    try:
        keys = json.loads(str(metrics.get(SUMMAND_KEYS, "")))
    except json.JSONDecodeError:
        keys = None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise records.RecordError(f"FitRes metric '{SUMMAND_KEYS}' must be a JSON list of strings")
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if key == SUMMAND_KEYS or key.startswith(NODE_PREFIX):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise records.RecordError(f"metric {key!r} must be a finite number, got {value!r}")
        values[key] = float(value)
    if fit_res.num_examples < 0:
        raise records.RecordError(f"num-examples must be >= 0, got {fit_res.num_examples}")
    return SecureReply(node, int(fit_res.num_examples), values, keys)


def decode_means(parameters: Parameters) -> list[np.ndarray]:
    """The unmasked weighted means the SecAgg+ workflow put into every FitRes."""
    return [np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(parameters)]
