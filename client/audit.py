"""An audit log of what crosses a node's boundary: every array a node receives or sends, by name, shape and bytes.

Enabled by the ``audit-dir`` run-config key (or node-config key). Each message appends one JSON line to
``<audit-dir>/<node-name>.jsonl``, so anyone can check that only LoRA factors and the head ever leave a node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

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


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: log the arrays of the incoming message and of the reply."""
    folder = str(context.node_config.get(AUDIT_DIR, context.run_config.get(AUDIT_DIR, "")))
    reply = call_next(msg, context)
    if folder:
        name = str(context.node_config.get("node-name", f"partition-{context.node_config.get('partition-id', 0)}"))
        entry = {
            "time": time.time(),
            "node-name": name,
            "message-type": msg.metadata.message_type,
            "received": describe(msg),
            "sent": describe(reply),
        }
        path = Path(folder) / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    return reply
