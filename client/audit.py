"""An audit log of what crosses a node's boundary: every record of every message a node receives or sends.

Enabled by the ``audit-dir`` run-config key (or node-config key). Each message appends one JSON line to
``<audit-dir>/<node-name>.jsonl`` with :func:`describe` of what came in and of what went out (arrays by name, shape
and bytes; config and metric entries by key, type, length and bytes; the serialised size of the whole message), so
anyone can check that only LoRA factors, the head and a few named scalars ever leave a node. The
content of every train reply (factors, head, example count, rank, scaling) is also kept, as sent, in
``<audit-dir>/<node-name>-round<N>.npz``: what the node contributed to round N can be checked against the
coordinator's aggregate.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import message_to_proto

from common.atomic_file import write_bytes_atomic
from common.codec import packing, records

AUDIT_DIR = "audit-dir"
SHOWN_STRING = 256
"""Longest string value the log shows verbatim."""


def describe(message: Message) -> dict[str, Any]:
    """Everything a message carries, record by record, and its size as Flower serialises it.

    - ``arrays``: every array of every ArrayRecord: record, key, dtype, shape, raw bytes, serialised bytes;
    - ``values``: every entry of every ConfigRecord and MetricRecord: record, kind, key, value type, length (items
      of a list, characters of a string, bytes of a bytes value; 1 for a number), payload bytes, and the value itself
      when it is a number or a short string;
    - ``error``: the bytes of an error reply's reason (an error reply has no records);
    - ``bytes``: the payload bytes of all of the above; ``message_bytes``: the whole message serialised as Flower's
      protobuf ``Message`` (records, keys, metadata and framing), which is what the SuperNode transmits.
    """
    arrays: list[dict[str, Any]] = []
    values: list[dict[str, Any]] = []
    error = len((message.error.reason or "").encode("utf-8")) if message.has_error() else 0
    layout = 0
    if not message.has_error():
        for record_name, record in message.content.items():
            if isinstance(record, ArrayRecord):
                unpacked = _unpacked_entries(record_name, record)
                arrays.extend(unpacked or [_array_entry(record_name, key, record[key]) for key in record.keys()])
                layout += len(record[packing.LAYOUT].data) if unpacked else 0
            else:
                kind = "config" if isinstance(record, ConfigRecord) else "metric"
                values.extend(_value_entry(record_name, kind, key, value) for key, value in record.items())
    payload = sum(a["wire_bytes"] for a in arrays) + sum(v["bytes"] for v in values) + error + layout
    return {
        "arrays": arrays,
        "values": values,
        "error": error,
        "layout_bytes": layout,
        "bytes": payload,
        "message_bytes": message_to_proto(message).ByteSize(),
    }


def _unpacked_entries(record_name: str, record: ArrayRecord) -> list[dict[str, Any]]:
    """The tensors of a packed adapter record, one entry each, as if each had travelled alone: its key, dtype,
    shape and bytes; a packed array's serialisation header is counted with its first tensor. [] when the record is
    not a packed adapter that decodes (the raw arrays are then listed as they are)."""
    state = _unpacked_state(record)
    if state is None:
        return []
    packed = [_array_entry(record_name, key, record[key]) for key in record.keys() if key != packing.LAYOUT]
    headers = {e["key"].removeprefix(packing.PREFIX): e["wire_bytes"] - e["nbytes"] for e in packed}
    entries = []
    for key, value in state.items():
        nbytes = int(value.nbytes)
        entries.append(
            {"record": record_name, "key": key, "dtype": value.dtype.name, "shape": list(value.shape),
             "nbytes": nbytes, "wire_bytes": nbytes + headers.pop(value.dtype.name, 0)}
        )  # fmt: skip
    return entries


def _array_entry(record: str, key: str, array: Array) -> dict[str, Any]:
    shape = list(array.shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    return {
        "record": record,
        "key": key,
        "dtype": array.dtype,
        "shape": shape,
        "nbytes": nbytes,
        "wire_bytes": len(array.data),
    }


def _value_entry(record: str, kind: str, key: str, value: Any) -> dict[str, Any]:
    items = value if isinstance(value, list) else [value]
    sizes = [len(v.encode("utf-8")) if isinstance(v, str) else len(v) if isinstance(v, bytes) else 8 for v in items]
    length = len(value) if isinstance(value, list | str | bytes) else 1
    element = type(items[0]).__name__ if items else "empty"
    kind_name = f"list[{element}]" if isinstance(value, list) else type(value).__name__
    entry = {"record": record, "kind": kind, "key": key, "type": kind_name, "length": length, "bytes": sum(sizes)}
    if isinstance(value, int | float | bool) or (isinstance(value, str) and len(value) <= SHOWN_STRING):
        entry["value"] = value  # a scalar is shown as it is; a list or a long value only by its size
    return entry


def flat_content(message: Message) -> dict[str, np.ndarray]:
    """Everything a message carries as numpy arrays keyed ``<record>/<key>`` (metrics and config as 0-d arrays)."""
    if message.has_error():
        return {}
    flat: dict[str, np.ndarray] = {}
    for record_name, record in message.content.items():
        unpacked = _unpacked_state(record)
        if unpacked is not None:
            flat.update({f"{record_name}/{key}": value for key, value in unpacked.items()})
            continue
        for key in record.keys():
            value = record[key]
            flat[f"{record_name}/{key}"] = value.numpy() if isinstance(value, Array) else np.asarray(value)
    return flat


def _unpacked_state(record: Any) -> dict[str, np.ndarray] | None:
    """A packed adapter record's tensors by key, or None when ``record`` is not one that decodes."""
    if not isinstance(record, ArrayRecord) or packing.LAYOUT not in record.keys():
        return None
    try:
        return records.adapter_state(record)
    except records.RecordError:
        return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to an ``.npz`` file atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    named: dict[str, Any] = dict(arrays)  # numpy's stub types **kwds like allow_pickle
    np.savez(buffer, **named)
    write_bytes_atomic(path, buffer.getvalue())


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: log what the incoming message and the reply carry (:func:`describe`)."""
    folder = str(context.node_config.get(AUDIT_DIR, context.run_config.get(AUDIT_DIR, "")))
    reply = call_next(msg, context)
    if folder:
        name = str(context.node_config.get("node-name", f"partition-{context.node_config.get('partition-id', 0)}"))
        server_round = records.server_round_of(msg.content)
        entry = {
            "time": time.time(),
            "node-name": name,
            "message-type": msg.metadata.message_type,
            "server-round": server_round,
            "received": describe(msg),
            "sent": describe(reply),
        }
        path = Path(folder) / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        if msg.metadata.message_type == "train" and server_round is not None and not reply.has_error():
            save_arrays(Path(folder) / f"{name}-round{server_round}.npz", flat_content(reply))
    return reply
