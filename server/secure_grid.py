"""A Grid that passes everything to another and remembers, per node, what SecAgg+ replies said."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class RecordingGrid(Grid):
    """Delegates to ``grid``; keeps each node's error reason and the bytes of its masked vector.

    Flower's SecAgg+ workflow keeps failures without node ids; this is where the coordinator learns who failed and
    why (e.g. a node whose privacy budget is spent), to record it like any other rejection.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: dict[int, str] = {}
        """Node id → ``node-error: <reason>`` of its last error reply."""
        self.masked_bytes: dict[int, int] = {}
        """Node id → bytes of the masked vector it uploaded."""

    def set_run(self, run: Run) -> None:
        """Delegated."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """Delegated."""
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Delegated."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.grid.pull_messages(message_ids)

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
