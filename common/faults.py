"""The plan of ``inject-faults``: which node fails how in which round (parsed with the rest of the run config).

Items ``NODE:KIND@ROUND[/PHASE]`` separated by commas, e.g. ``"partition-1:raise@2, partition-3:hang@*/train"``;
what a node does with them is :mod:`client.faults`.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("raise", "hang")
PHASES = ("train", "evaluate")


@dataclass(frozen=True)
class Fault:
    """One planned failure."""

    node: str
    kind: str
    round: int | None
    phases: tuple[str, ...] = PHASES

    def hits(self, node: str, server_round: int | None, phase: str) -> bool:
        """Whether this fault applies to ``node``'s ``phase`` message of ``server_round``."""
        return self.node == node and self.round in (None, server_round) and phase in self.phases


def parse_faults(text: str) -> list[Fault]:
    """Parse ``NODE:KIND@ROUND[/PHASE]`` items; raise ValueError naming a malformed item."""
    faults = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        node, _, rest = item.partition(":")
        kind, _, when = rest.partition("@")
        when, _, phase = when.partition("/")
        valid_when = when == "*" or when.isdigit()
        if not node or kind not in KINDS or not valid_when or phase not in ("", *PHASES):
            raise ValueError(
                f"inject-faults item {item!r} must look like NODE:raise@ROUND, NODE:hang@* or NODE:hang@2/train"
            )
        faults.append(Fault(node, kind, None if when == "*" else int(when), (phase,) if phase else PHASES))
    return faults
