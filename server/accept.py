"""Which of a round's decoded train replies may be aggregated, and why the others may not (Flower-free).

A rejection is data, never an exception: ``(node id, reason)`` with a reason from :mod:`common.validation`, or
``no-reply`` for a node that did not answer in time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from common.config import RunConfig
from common.updates import NodeInfo, TrainReply
from common.validation import Layout, UpdateLimits, check_update, head_norm, lora_update_norm, norm_outliers

Rejection = tuple[int, str]
"""``(node id, reason)``."""


def update_limits(cfg: RunConfig) -> UpdateLimits:
    """The bounds of :func:`common.validation.check_update` from the run config."""
    reliability = cfg.reliability
    return UpdateLimits(
        norm_factor=reliability.norm_factor, max_num_examples=reliability.max_num_examples, max_rank=cfg.lora.max_rank
    )


def missing_replies(sent: Iterable[int], answered: Iterable[int], timeout: float) -> list[Rejection]:
    """The nodes that were sent a message and did not answer in time (they dropped out or hang)."""
    missing = sorted(set(sent) - set(answered))
    return [(n, f"no-reply: no answer within round-timeout ({timeout:g} s)") for n in missing]


def consensus_layout(
    replies: Mapping[int, TrainReply], known: Mapping[int, NodeInfo], limits: UpdateLimits
) -> Layout | None:
    """The layout most of the internally consistent replies share (None when there is none).

    The first round has no layout to check against; taking the first reply's would let one malformed update (a
    module missing, a wrong shape) define what every honest node is rejected against, for the rest of the run.
    Ties go to the layout of the reply whose sender sorts first by (name, node id).
    """
    votes: Counter[tuple[object, ...]] = Counter()
    layouts: dict[tuple[object, ...], Layout] = {}
    for node_id in sorted(replies, key=lambda n: (replies[n].node.name, n)):
        reply = replies[node_id]
        if _check(node_id, reply, known, None, limits) is not None:
            continue
        layout = Layout.from_adapter(reply.adapter)
        key = (tuple(sorted(layout.modules.items())), tuple(sorted(layout.head.items())))
        votes[key] += 1
        layouts.setdefault(key, layout)
    if not votes:
        return None
    best = max(votes.values())
    return next(layouts[key] for key in layouts if votes[key] == best)


def accept_updates(
    replies: Mapping[int, TrainReply], known: Mapping[int, NodeInfo], layout: Layout | None, limits: UpdateLimits
) -> tuple[dict[int, TrainReply], list[Rejection], Layout | None]:
    """Validate every decoded train reply; return the accepted ones, the rejections and the layout.

    ``layout`` is what replies must match; ``None`` before the first valid round, when the round's consensus
    (:func:`consensus_layout`) becomes the layout. Then the norm rule (:func:`common.validation.norm_outliers`)
    runs over the updates that passed: on ‖ΔW‖_F, then on the head's norm.
    """
    if layout is None:
        layout = consensus_layout(replies, known, limits)
    accepted: dict[int, TrainReply] = {}
    rejected: list[Rejection] = []
    for node_id, reply in sorted(replies.items()):
        reason = _check(node_id, reply, known, layout, limits)
        if reason is not None:
            rejected.append((node_id, reason))
        else:
            accepted[node_id] = reply
    outliers = norm_outliers({n: lora_update_norm(r) for n, r in accepted.items()}, limits.norm_factor)
    heads = {n: head_norm(r) for n, r in accepted.items() if n not in outliers and r.adapter.head}
    outliers.update(norm_outliers(heads, limits.norm_factor, what="‖head‖_F"))
    for node_id, reason in sorted(outliers.items()):
        rejected.append((node_id, reason))
        del accepted[node_id]
    return accepted, rejected, layout


def _check(
    node_id: int, reply: TrainReply, known: Mapping[int, NodeInfo], layout: Layout | None, limits: UpdateLimits
) -> str | None:
    """:func:`check_update` against the rank and scaling the coordinator learned for the node (for a node it has not
    met, the rank it reports)."""
    info = known.get(node_id)
    if info is None:
        return check_update(reply, reply.node.rank, layout, limits)
    return check_update(reply, info.rank, layout, limits, expected_scaling=info.scaling)
