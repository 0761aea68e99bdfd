"""Node sampling with a deadline (Flower's ``sample_nodes`` waits forever for ``min_available_nodes``)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore import log

POLL_SECONDS = 1.0


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """The connected node ids (sorted), after waiting up to ``timeout`` s for ``min_nodes`` of them.

    When the deadline passes with fewer nodes, the round goes ahead with those that are connected; a round with
    too few valid replies is skipped later, so the run never hangs.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() >= deadline:
            log(WARNING, "only %d of the %d required nodes connected after %.0f s", len(nodes), min_nodes, timeout)
            break
        log(INFO, "waiting for nodes: %d connected, %d required", len(nodes), min_nodes)
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    return nodes


def sample_size(num_nodes: int, min_nodes: int, fraction: float) -> int:
    """How many of ``num_nodes`` connected nodes a round samples: ``⌈fraction·n⌉``, at least ``min_nodes``."""
    return min(num_nodes, max(min_nodes, math.ceil(fraction * num_nodes)))


def sample_nodes(nodes: list[int], size: int, rng: random.Random, key: Callable[[int], Any] | None = None) -> list[int]:
    """``size`` of ``nodes`` drawn with the seeded ``rng``, returned sorted by node id.

    The draw is over the nodes ordered by ``key`` (default: the id), so a key that does not depend on Flower's
    random node ids (e.g. the node's name) makes the draw the same after a restart gives the nodes new ids.
    """
    ordered = sorted(nodes, key=key) if key is not None else sorted(nodes)
    return sorted(rng.sample(ordered, size))
