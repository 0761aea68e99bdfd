"""What may leave a node, checked against the audit log (``client/audit.py``) by code that shares nothing with fedlora.

The base model's shapes come from Hugging Face itself; the allowed record keys are written out here. Per message:

- a train reply: the LoRA factors of the node's rank for every linear module, the head at its shapes, and the named
  scalars below; on the SecAgg+ path instead: the protocol's keys (public keys, ciphertexts, node ids, shares),
  masked vectors no larger than the node's summands at the round's padding rank, and the clear metadata;
- an evaluate or query reply: named scalars only;
- an error reply: its reason, at most :data:`MAX_ERROR_BYTES`.

Every value must be a scalar (a number, or a short string); anything else, or anything more, is a violation that
names its key. The serialised message may exceed what the entries hold only by the protocol's framing
(:func:`framing_bound`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

PEFT_PREFIX = "base_model.model."
TARGETS = ("query", "key", "value")
"""The modules fedlora adapts in a BERT model."""
NPY_HEADER_BYTES = 128
"""Flower serialises each array with ``np.save``: the array's raw bytes plus one 128-byte header (format 1.0)."""
MAX_STRING_BYTES = 256
"""Longest string value a node may send (its name, its device)."""
MAX_ERROR_BYTES = 64 * 1024
"""Longest error reason (Flower forwards a node's traceback)."""
MAX_PROTOCOL_BYTES = 64 * 1024
"""Largest SecAgg+ key-exchange value (public keys, ciphertexts and shares grow with the nodes, not the model)."""
NODE_KEYS = {"rank", "scaling", "name", "device"}
SCALARS: dict[str, set[tuple[str, str]]] = {
    "train": {("metrics", k) for k in ("num-examples", "train-loss", "train-loss-first", "train-loss-last")}
    | {("metrics", "epsilon"), ("metrics", "noise-multiplier")}
    | {("node", k) for k in NODE_KEYS},
    "evaluate": {("metrics", k) for k in ("num-examples", "eval-loss", "eval-accuracy", "eval-perplexity")}
    | {("metrics", k) for k in ("eval-nll-sum", "eval-tokens")}
    | {("metrics", f"eval-content-{k}") for k in ("perplexity", "nll-sum", "tokens")}
    | {("node", k) for k in NODE_KEYS},
    "query": {("node", k) for k in NODE_KEYS},
}
"""(record, key) of the scalars each reply may carry."""
SECURE_SCALARS = (
    {("fitres.metrics", f"node.{k}") for k in NODE_KEYS}
    | {("fitres.metrics", k) for k in ("train-loss", "train-loss-first", "train-loss-last", "epsilon")}
    | {("fitres.metrics", "noise-multiplier"), ("fitres.num_examples", "num_examples")}
    | {("fitres.status", "code"), ("fitres.status", "message")}
)
"""The clear metadata of a SecAgg+ train reply."""
SECURE_PROTOCOL = {"pk1", "pk2", "dsts", "ctxts", "nids", "shares"}
"""SecAgg+'s key-exchange and unmasking values (record ``secaggplus_configs``)."""


@dataclass(frozen=True)
class BaseModel:
    """Shapes of the base model a node fine-tunes, read from the Hugging Face model itself (not from fedlora)."""

    linear: dict[str, tuple[int, int]]
    """Every ``nn.Linear`` module: ``(out, in)``."""
    head: dict[str, tuple[int, ...]]
    """The classification head's parameters (``classifier.weight``, ``classifier.bias``)."""
    itemsize: int

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        """The linear modules fedlora adapts."""
        return {name: dims for name, dims in self.linear.items() if name.rsplit(".", 1)[-1] in TARGETS}

    def bound(self, rank: int) -> int:
        """Bytes of LoRA factors at ``rank`` for every target module plus the head: Σ r·(in + out)·itemsize + head."""
        factors = sum(rank * (inn + out) for out, inn in self.targets.values())
        head = sum(int(np.prod(shape)) for shape in self.head.values())
        return (factors + head) * self.itemsize

    def summand_bound(self, pad_rank: int) -> int:
        """Bytes of SecAgg+ masked vectors at ``pad_rank``: per module pad(A), pad(s·B) and the row indicator, and the
        head, as 64-bit integers with one ``np.save`` header each."""
        elements = sum(pad_rank * (inn + out) + pad_rank for out, inn in self.targets.values())
        elements += sum(int(np.prod(shape)) for shape in self.head.values())
        arrays = 3 * len(self.targets) + len(self.head)
        return elements * 8 + arrays * NPY_HEADER_BYTES


def tiny_bert(num_labels: int) -> BaseModel:
    """The tiny test model's shapes, from transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from client.model import resolve_model

    model = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny"), num_labels=num_labels)
    linear = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    head = {name: tuple(p.shape) for name, p in model.named_parameters() if name.startswith("classifier.")}
    return BaseModel(linear, head, itemsize=next(model.parameters()).element_size())


def boundary_violations(entry: dict[str, Any], rank: int, base: BaseModel, pad_rank: int | None = None) -> list[str]:
    """What in one audit entry's ``sent`` may not leave a node of LoRA rank ``rank`` (``pad_rank``: SecAgg+)."""
    sent, kind = entry["sent"], entry["message-type"]
    pad_rank = pad_rank or next(
        (
            int(v.get("value", 0))
            for v in entry["received"]["values"]
            if (v["record"], v["key"]) == ("secure", "pad-rank")
        ),
        None,
    )
    problems = (
        _array_violations(sent["arrays"], rank, base)
        if kind == "train"
        else [f"{a['record']}/{a['key']} {a['shape']}: a {kind} reply carries no arrays" for a in sent["arrays"]]
    )
    problems += _value_violations(sent["values"], kind, base, pad_rank)
    if sent["error"] > MAX_ERROR_BYTES:
        problems.append(f"an error reason of {sent['error']} bytes, above {MAX_ERROR_BYTES}")
    if sent["message_bytes"] > sent["bytes"] + framing_bound(sent):
        problems.append(f"{sent['message_bytes']} bytes sent for {sent['bytes']} bytes of audited content")
    return problems


def framing_bound(sent: dict[str, Any]) -> int:
    """What a serialised message may add to its audited content: 512 bytes of metadata and record names, and per
    entry its key and record name plus 24 bytes of protobuf tags, lengths and dtype/shape fields."""
    entries: Iterable[dict[str, Any]] = [*sent["arrays"], *sent["values"]]
    return 512 + sum(len(e["key"]) + len(e["record"]) + 24 for e in entries)


def _array_violations(arrays: list[dict[str, Any]], rank: int, base: BaseModel) -> list[str]:
    problems = []
    for array in arrays:
        key, shape = array["key"], tuple(array["shape"])
        name = key.removeprefix(PEFT_PREFIX)
        module, _, factor = name.rpartition(".lora_")
        expected: tuple[int, ...]
        if array["record"] != "lora":
            problems.append(f"{array['record']}/{key} {list(shape)}: arrays travel in the 'lora' record only")
            continue
        if key.startswith(PEFT_PREFIX) and module in base.linear and factor in ("A.weight", "B.weight"):
            out, inn = base.linear[module]
            expected = (rank, inn) if factor == "A.weight" else (out, rank)
        elif key.startswith(PEFT_PREFIX) and name in base.head:
            expected = base.head[name]
        else:
            problems.append(f"{key} {list(shape)} is neither a LoRA factor nor the head")
            continue
        if shape != expected:
            problems.append(f"{key} has shape {list(shape)}, expected {list(expected)} at rank {rank}")
    raw = sum(int(array["nbytes"]) for array in arrays)
    wire = sum(int(array["wire_bytes"]) for array in arrays)
    if raw > base.bound(rank):
        problems.append(f"{raw} bytes sent, above the rank-{rank} bound of {base.bound(rank)}")
    if wire > base.bound(rank) + NPY_HEADER_BYTES * len(arrays):
        problems.append(f"{wire} bytes on the wire for {raw} bytes of arrays")
    return problems


def _value_violations(values: list[dict[str, Any]], kind: str, base: BaseModel, pad_rank: int | None) -> list[str]:
    problems = []
    secure = any(v["record"] == "secaggplus_configs" for v in values)
    for value in values:
        where = f"{value['record']}/{value['key']}"
        if secure and value["record"] == "secaggplus_configs":
            if value["key"] == "masked_params":
                bound = base.summand_bound(pad_rank) if pad_rank else 0
                if value["bytes"] > bound:
                    problems.append(f"{where}: {value['bytes']} bytes of masked vectors, above {bound} at pad rank")
            elif value["key"] not in SECURE_PROTOCOL:
                problems.append(f"{where} is not a SecAgg+ protocol value")
            elif value["bytes"] > MAX_PROTOCOL_BYTES:
                problems.append(f"{where}: {value['bytes']} bytes, above {MAX_PROTOCOL_BYTES} for key exchange")
            continue
        if secure and (value["record"], value["key"]) == ("fitres.metrics", "summand-keys"):
            if value["bytes"] > 200 * (len(base.targets) * 3 + len(base.head)):
                problems.append(f"{where}: {value['bytes']} bytes of summand names")
            continue
        allowed = SECURE_SCALARS if secure else SCALARS.get(kind, set())
        if (value["record"], value["key"]) not in allowed:
            problems.append(f"{where} ({value['type']}) is not a value a {kind} reply may carry")
        elif value["type"] not in ("int", "float", "bool", "str") or (
            value["type"] == "str" and value["bytes"] > MAX_STRING_BYTES
        ):
            problems.append(f"{where} is a {value['type']} of length {value['length']}, not a scalar")
    return problems


def assert_no_violations(entries: Iterable[dict[str, Any]], rank: int, base: BaseModel) -> None:
    """Every entry of a node's audit passes."""
    problems = [p for entry in entries for p in boundary_violations(entry, rank, base)]
    assert problems == [], problems[:5]
