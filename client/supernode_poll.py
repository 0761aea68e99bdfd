"""``python -m client.supernode_poll --prompt-window S -- FLOWER-SUPERNODE-ARGS``: Flower's SuperNode, asking promptly.

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) loops: pull a message; if there is none, sleep
3 s; if there is one, wait for its reply (checking every 0.5 s), push it, and pull again at once. The next message
of a round (the evaluation right after training, the next round's training right after the evaluation) is seldom
ready at that immediate pull, since the coordinator is still collecting the other nodes' replies, so it waits out the
3-s sleep on every node and every message.

This runs Flower's own ``flower-supernode`` entry point in this process with three waits changed and one start-up
shortened:

- for ``--prompt-window`` seconds after each reply, the 3-s idle sleep becomes 0.2 s, so the next message is taken
  within 0.2 s of being sent; outside that window the node polls every 3 s, as Flower does, so an idle fleet puts no
  more load on the SuperLink than before;
- the 0.5-s checks for a reply in the node's own store become 0.05 s (local, no network);
- a message object that has not reached the SuperLink yet is asked for again after 0.05 s instead of 1 s
  (:mod:`common.codec.object_pulls`);
- the SuperExec it starts forks each message's ``flwr-clientapp`` from a process that has Flower imported
  (:mod:`client.clientapp_forks`), which saves about 0.5 s of imports per message.

Nothing else changes: the same SuperNode code, connection, authentication, and a ClientApp process of its own for
every message. If the installed flwr no longer has the loop this patches, :func:`install` says so and the SuperNode runs
unchanged.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from client.clientapp_forks import SuperExecByFork
from common.codec.object_pulls import shorten_object_pull_backoff

IDLE_SLEEP_S = 3.0
"""The SuperNode's idle sleep in flwr 1.42 (``time.sleep(3)`` after a pull that found nothing)."""
PROMPT_POLL_S = 0.2
"""The idle sleep within the window after a reply."""
REPLY_CHECK_S = 0.5
"""flwr 1.42's wait between checks of its local store for a reply or an object."""
PROMPT_REPLY_CHECK_S = 0.05
"""Those local checks here."""


class PromptClock:
    """Stands in for the ``time`` module inside ``flwr.supernode.start_client_internal``: every attribute is the real
    module's, except ``sleep``, which shortens the two waits above."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.last_reply = -math.inf
        """``time.monotonic()`` when the SuperNode last finished pushing replies."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``, with the idle sleep shortened just after a reply and the local reply checks shortened."""
        if seconds == IDLE_SLEEP_S and time.monotonic() - self.last_reply < self.window_s:
            seconds = PROMPT_POLL_S
        elif seconds == REPLY_CHECK_S:
            seconds = PROMPT_REPLY_CHECK_S
        time.sleep(seconds)


def install(window_s: float) -> str:
    """Patch flwr's SuperNode loop in this process; return "" on success, else why it was left as it is."""
    import flwr
    from flwr.supernode import start_client_internal as loop

    push: Callable[..., Any] | None = getattr(loop, "_push_messages", None)
    if getattr(loop, "time", None) is not time or push is None or not flwr.__version__.startswith("1.42."):
        return f"flwr {flwr.__version__}'s SuperNode loop is not the one --prompt-window knows (flwr 1.42)"
    why_not = shorten_object_pull_backoff()
    if why_not:
        return why_not
    clock = PromptClock(window_s)

    def pushed(*args: Any, **kwargs: Any) -> Any:
        try:
            return push(*args, **kwargs)
        finally:
            clock.last_reply = time.monotonic()

    loop._push_messages = pushed
    loop.time = clock  # type: ignore[assignment]  # a stand-in for the module: every attribute but sleep is time's
    if getattr(loop, "subprocess", None) is subprocess:
        loop.subprocess = SuperExecByFork()  # type: ignore[assignment]  # every attribute but Popen is subprocess's
    return ""


def split_args(argv: Sequence[str]) -> tuple[float, list[str]]:
    """``--prompt-window S -- REST`` → (S, REST); raise ``SystemExit(2)`` with one line if malformed."""
    if len(argv) < 3 or argv[0] != "--prompt-window" or argv[2] != "--":
        _refuse("usage: python -m client.supernode_poll --prompt-window S -- FLOWER-SUPERNODE-ARGS")
    try:
        window = float(argv[1])
    except ValueError:
        window = math.nan
    if not 0.0 < window < math.inf:
        _refuse(f"--prompt-window must be a positive number of seconds, got {argv[1]!r}")
    return window, list(argv[3:])


def _refuse(line: str) -> None:
    print(f"client.supernode_poll: error: {line}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Install the prompt polling (or say why not) and run ``flower-supernode`` with the remaining arguments."""
    window, rest = split_args(sys.argv[1:] if argv is None else argv)
    why_not = install(window)
    if why_not:
        print(f"fedlora client: {why_not}; polling every {IDLE_SLEEP_S:g} s as Flower does", file=sys.stderr)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
