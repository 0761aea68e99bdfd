"""Grids that wrap Flower's: a delegating base, and one that collects replies as soon as they arrive.

Flower 1.42's deployed Grid pulls replies in ``send_and_receive`` with a fixed 3-second sleep between pulls, so every
message's round trip is rounded up to a multiple of 3 s, on top of the SuperNode's own 3-second idle poll: a message
that a node answers in 3.1 s costs the round 6 s. :class:`PromptGrid` pulls after 0.2 s, then at intervals growing by
half up to 0.5 s: at most two pulls a second (one call for all the round's messages, to a SuperLink on the
coordinator), and a reply is picked up within half a second of its arrival. A reply whose arrays are still being
pushed is asked for again after 0.05 s, not Flower's 1 s (:mod:`common.codec.object_pulls`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.codec.object_pulls import shorten_object_pull_backoff

log = logging.getLogger(__name__)

FIRST_PULL_S = 0.2
MAX_PULL_INTERVAL_S = 0.5


class DelegatingGrid(Grid):
    """Passes every call to ``grid``; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

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
        """Delegated."""
        return self.grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """``send_and_receive`` with Flower's semantics (push, pull until every reply is in or ``timeout`` passed;
    ``None`` waits for ever) and short pull intervals (module doc)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        why_not = shorten_object_pull_backoff()
        if why_not:
            log.warning("replies' arrays are pulled on Flower's 1-s backoff: %s", why_not)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrived within ``timeout`` seconds."""
        waiting = set(self.push_messages(messages))
        end = math.inf if timeout is None else time.time() + timeout
        replies: list[Message] = []
        interval = FIRST_PULL_S
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            left = end - time.time()
            if not waiting or left <= 0:
                break
            time.sleep(min(interval, left))
            interval = min(interval * 1.5, MAX_PULL_INTERVAL_S)
        return replies
