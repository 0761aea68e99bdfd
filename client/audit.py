"""An audit log of what crosses a node's boundary: every array a node receives or sends, by name, shape and bytes.

Enabled by the ``audit-dir`` run-config key (or node-config key). Each message appends one JSON line to
``<audit-dir>/<node-name>.jsonl``, so anyone can check that only LoRA factors and the head ever leave a node. The
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
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.atomic_file import write_bytes_atomic
from common.codec import records

AUDIT_DIR = "audit-dir"


def describe(message: Message) -> list[dict[str, Any]]:
    """Name, dtype, shape, raw bytes and serialised bytes of every array in a message's content."""
    if message.has_error():
        return []
    arrays = []
    for record_name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            for key in record.keys():
                array = record[key]
                shape = list(array.shape)
                itemsize = np.dtype(array.dtype).itemsize
                arrays.append(
                    {
                        "record": record_name,
                        "key": key,
                        "dtype": array.dtype,
                        "shape": shape,
                        "nbytes": int(np.prod(shape, dtype=np.int64)) * itemsize,
                        "wire_bytes": len(array.data),
                    }
                )
    return arrays


def flat_content(message: Message) -> dict[str, np.ndarray]:
    """Everything a message carries as numpy arrays keyed ``<record>/<key>`` (metrics and config as 0-d arrays)."""
    if message.has_error():
        return {}
    flat: dict[str, np.ndarray] = {}
    for record_name, record in message.content.items():
        for key in record.keys():
            value = record[key]
            flat[f"{record_name}/{key}"] = value.numpy() if isinstance(value, Array) else np.asarray(value)
    return flat


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to an ``.npz`` file atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    named: dict[str, Any] = dict(arrays)  # numpy's stub types **kwds like allow_pickle
    np.savez(buffer, **named)
    write_bytes_atomic(path, buffer.getvalue())


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: log the arrays of the incoming message and of the reply."""
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
