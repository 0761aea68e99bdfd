"""PromptGrid collects replies as they arrive (Flower's deployed Grid waits 3 s between pulls) and keeps Flower's
``send_and_receive`` semantics: every reply that arrives before the timeout, none after it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from server.prompt_grid import PromptGrid


class SlowNodes:
    """A stand-in for the SuperLink side of a Grid: message ``i`` is answered ``delays[i]`` s after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.pushed_at = 0.0
        self.pulls = 0

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        self.pushed_at = time.time()
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        self.pulls += 1
        now = time.time() - self.pushed_at
        ready = [i for i in message_ids if self.delays[int(i)] <= now]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_replies_are_collected_within_half_a_second_of_arriving() -> None:
    nodes = SlowNodes([0.3, 2.2])
    started = time.time()
    replies = list(PromptGrid(nodes).send_and_receive([object(), object()], timeout=30))  # type: ignore[arg-type]
    elapsed = time.time() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1"]
    assert 2.2 <= elapsed < 2.9  # Flower's Grid would return at 3 s at the earliest (its first sleep), here ≤ 2.2 + 0.5
    assert nodes.pulls <= 10


def test_the_timeout_returns_what_arrived_and_no_later() -> None:
    nodes = SlowNodes([0.1, 60.0])
    started = time.time()
    replies = list(PromptGrid(nodes).send_and_receive([object(), object()], timeout=1.5))  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert 1.5 <= time.time() - started < 2.0
