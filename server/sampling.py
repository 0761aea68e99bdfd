"""Node sampling with a deadline (Flower's ``sample_nodes`` waits forever for ``min_available_nodes``)."""

from __future__ import annotations

import math
import random
import time
from logging import INFO, WARNING

from flwr.serverapp import Grid
from flwr.supercore import log

POLL_SECONDS = 1.0


def sample_nodes_with_deadline(
    grid: Grid, min_nodes: int, fraction: float, rng: random.Random, timeout: float
) -> list[int]:
    """Wait up to ``timeout`` s for ``min_nodes`` connected nodes, then sample ``fraction`` of them (seeded).

    When the deadline passes with fewer nodes, the round goes ahead with those that are connected; a round with
    too few valid replies is skipped later, so the run never hangs.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() >= deadline:
            log(WARNING, "only %d of the %d required nodes connected after %.0f s", len(nodes), min_nodes, timeout)
            break
        log(INFO, "waiting for nodes: %d connected, %d required", len(nodes), min_nodes)
        time.sleep(POLL_SECONDS)
    size = min(len(nodes), max(min_nodes, math.ceil(fraction * len(nodes))))
    return sorted(rng.sample(nodes, size))
