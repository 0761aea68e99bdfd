"""How much each accepted update weighs in the aggregate (``weighting``), so that no node can inflate its own share.

A node reports how many examples it trained on, and nothing checks that. With ``examples`` (FedAvg's n_i / Σ n,
McMahan et al. 2017) one node of eight claiming 10⁷ examples made the global update its own. The default,
``examples-capped``, weighs node i by

    w_i = min(n_i, c · median_j n_j, n_i⁰)

with c = ``weight-cap`` and n_i⁰ the first count the coordinator accepted from node i (a node's data does not grow
during a run): a liar gets at most c times the median node's share, and cannot raise its weight later. ``uniform``
gives every node the same weight (no trust at all, at the cost of under-weighting nodes with more data). Under
secure aggregation the nodes weigh their own summands, bounded by ``secagg-max-weight``; under central DP the mean is
uniform (its noise is calibrated to that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

import numpy as np

EXAMPLES = "examples"
EXAMPLES_CAPPED = "examples-capped"
UNIFORM = "uniform"


def aggregation_weights(
    counts: Mapping[int, int], weighting: str, cap: float, registered: MutableMapping[int, int]
) -> tuple[dict[int, float], list[str]]:
    """Node id → weight for the round's accepted replies, and one line per node whose claim was cut.

    ``registered`` holds the first count accepted from each node; nodes met for the first time are added to it.
    """
    if weighting == UNIFORM:
        return {node: 1.0 for node in counts}, []
    if weighting == EXAMPLES:
        return {node: float(n) for node, n in counts.items()}, []
    if weighting != EXAMPLES_CAPPED:
        raise ValueError(f"weighting must be one of {(EXAMPLES_CAPPED, EXAMPLES, UNIFORM)}, got {weighting!r}")
    bound = cap * float(np.median(list(counts.values()))) if counts else math.inf
    weights: dict[int, float] = {}
    notes: list[str] = []
    for node, n in sorted(counts.items()):
        first = registered.setdefault(node, n)
        weight = float(min(n, bound, first))
        if weight < n:
            why = f"{cap:g} × the round's median" if weight == bound and bound < first else "its first count"
            notes.append(f"node {node} claims {n} examples, weighted as {weight:g} ({why}; weighting = {weighting})")
        weights[node] = weight
    return weights, notes
