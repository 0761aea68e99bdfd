"""Fault injection for chaos tests and drills: make chosen nodes fail in chosen rounds.

The ``inject-faults`` run-config key lists ``NODE:KIND@ROUND`` items separated by commas, e.g.
``"partition-1:raise@2, partition-3:hang@2"``. ``raise`` makes the node's handler fail (Flower returns an error
reply); ``hang`` makes it sleep past the round deadline (``round-timeout``) so the coordinator never gets an answer.
``@ROUND`` may be ``@*`` for every round. Empty (the default) injects nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common import records

INJECT_FAULTS = "inject-faults"
KINDS = ("raise", "hang")


class InjectedFault(RuntimeError):
    """The failure a node was told to simulate."""


@dataclass(frozen=True)
class Fault:
    """One planned failure."""

    node: str
    kind: str
    round: int | None


def parse_faults(text: str) -> list[Fault]:
    """Parse ``NODE:KIND@ROUND`` items; raise ValueError naming a malformed item."""
    faults = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        node, _, rest = item.partition(":")
        kind, _, when = rest.partition("@")
        if not node or kind not in KINDS or not when or not (when == "*" or when.isdigit()):
            raise ValueError(f"inject-faults item {item!r} must look like NODE:raise@ROUND or NODE:hang@*")
        faults.append(Fault(node, kind, None if when == "*" else int(when)))
    return faults


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: fail as planned for this node and round, else pass the message on."""
    text = str(context.run_config.get(INJECT_FAULTS, ""))
    if text and msg.metadata.message_type in ("train", "evaluate"):
        name = str(context.node_config.get("node-name", f"partition-{context.node_config.get('partition-id', 0)}"))
        server_round = records.server_round_of(msg.content)
        for fault in parse_faults(text):
            if fault.node == name and fault.round in (None, server_round):
                if fault.kind == "hang":
                    time.sleep(float(context.run_config.get("round-timeout", 600)) + 30)
                raise InjectedFault(f"injected fault: {name} told to {fault.kind} in round {server_round}")
    return call_next(msg, context)
