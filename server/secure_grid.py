"""A Grid that passes everything to another and remembers, per node, what SecAgg+ replies said."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

from server.prompt_grid import DelegatingGrid


class RecordingGrid(DelegatingGrid):
    """Delegates to ``grid``; keeps each node's error reason and the bytes of its masked vector.

    Flower's SecAgg+ workflow keeps failures without node ids; this is where the coordinator learns who failed and
    why (e.g. a node whose privacy budget is spent), to record it like any other rejection.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.errors: dict[int, str] = {}
        """Node id → ``node-error: <reason>`` of its last error reply."""
        self.masked_bytes: dict[int, int] = {}
        """Node id → bytes of the masked vector it uploaded."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Delegated; every reply is looked at on the way back."""
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            if reply.has_error():
                self.errors[node_id] = f"node-error: {reply.error.reason}"
                continue
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            masked = configs.get(Key.MASKED_PARAMETERS) if configs is not None else None
            if isinstance(masked, list):
                self.masked_bytes[node_id] = sum(len(b) for b in masked if isinstance(b, bytes))
        return replies
