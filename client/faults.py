"""Fault injection for chaos tests and drills: make chosen nodes fail in chosen rounds.

The ``inject-faults`` run-config key lists ``NODE:KIND@ROUND`` items separated by commas, e.g.
``"partition-1:raise@2, partition-3:hang@2"``. ``raise`` makes the node's handler fail (Flower returns an error
reply); ``hang`` makes it answer nothing until the round's deadline (``round-timeout`` after the coordinator sent
the message) has passed, so the coordinator never gets an answer in time. ``@ROUND`` may be ``@*`` for every round.
A fault hits the node's train and evaluate messages of that round; ``@ROUND/train`` (or ``/evaluate``) limits it to
one of them. Empty (the default) injects nothing.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.codec import records
from common.faults import PHASES, parse_faults

INJECT_FAULTS = "inject-faults"
HANG_MARGIN_S = 5.0
"""Least time past the coordinator's deadline a hanging node stays silent before it gives up."""
HANG_MARGIN_FRACTION = 0.25
"""... and at least this fraction of round-timeout: the coordinator starts its clock only once every message of the
round is pushed, which on a loaded machine can take several seconds after ``created_at``."""


class InjectedFault(RuntimeError):
    """The failure a node was told to simulate."""


def hang_seconds(msg: Message, round_timeout: float, now: float) -> float:
    """Seconds until the coordinator's deadline for ``msg`` has passed (plus a margin), from ``now``.

    The deadline counts from when the coordinator created the message (``created_at``), so a node that starts late
    (queued behind others) does not stay silent for longer than it takes to miss the round. The margin is
    ``max(HANG_MARGIN_S, HANG_MARGIN_FRACTION · round_timeout)``.
    """
    created = float(msg.metadata.created_at)
    start = created if created > 0 else now
    margin = max(HANG_MARGIN_S, HANG_MARGIN_FRACTION * round_timeout)
    return max(0.0, start + round_timeout + margin - now)


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: fail as planned for this node and round, else pass the message on."""
    text = str(context.run_config.get(INJECT_FAULTS, ""))
    phase = msg.metadata.message_type
    if text and phase in PHASES:
        name = str(context.node_config.get("node-name", f"partition-{context.node_config.get('partition-id', 0)}"))
        server_round = records.server_round_of(msg.content)
        for fault in parse_faults(text):
            if fault.hits(name, server_round, phase):
                if fault.kind == "hang":
                    timeout = float(context.run_config.get("round-timeout", 600))
                    time.sleep(hang_seconds(msg, timeout, time.time()))
                raise InjectedFault(f"injected fault: {name} told to {fault.kind} in round {server_round}")
    return call_next(msg, context)
