"""Splitting a round's replies into accepted updates and named rejections."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import WARNING

from flwr.app import Message
from flwr.supercore import log

from common import records
from common.config import RunConfig
from common.updates import NodeInfo, TrainReply
from common.validation import Layout, UpdateLimits, check_update, norm_outliers, update_norm

Rejection = tuple[int, str]
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Fault|Exit|Interrupt)\w*: \S")
"""A traceback's ``module.ExceptionType: message`` line (with a message)."""


def split_replies(replies: Iterable[Message]) -> tuple[dict[int, Message], list[Rejection]]:
    """Replies with content by node id, and the nodes whose reply carries an error (with its reason)."""
    ok: dict[int, Message] = {}
    failed: list[Rejection] = []
    for msg in replies:
        node_id = int(msg.metadata.src_node_id)
        if msg.has_error():
            failed.append((node_id, f"node-error: {error_summary(msg.error.reason or '')}"))
        else:
            ok[node_id] = msg
    return ok, failed


def error_summary(reason: str, limit: int = 300) -> str:
    """The innermost ``Type: message`` line of a node's error (Flower forwards whole tracebacks), or its start."""
    lines = [line.strip() for line in reason.splitlines()]
    raised = [line for line in lines if _RAISED.match(line)]
    summary = (raised[0] if raised else lines[0] if lines else "").removesuffix("'>")  # Flower's <class …>:<'…'>
    return summary if len(summary) <= limit else summary[: limit - 1] + "…"


def missing_replies(
    sent: Iterable[int], ok: Mapping[int, Message], failed: Iterable[Rejection], timeout: float
) -> list[Rejection]:
    """The nodes that were sent a message and did not answer in time (they dropped out or hang)."""
    answered = set(ok) | {node_id for node_id, _ in failed}
    return [(n, f"no-reply: no answer within round-timeout ({timeout:g} s)") for n in sorted(set(sent) - answered)]


def update_limits(cfg: RunConfig) -> UpdateLimits:
    """The bounds of :func:`common.validation.check_update` from the run config."""
    return UpdateLimits(norm_factor=cfg.norm_factor, max_num_examples=cfg.max_num_examples)


def layout_of(reply: TrainReply) -> Layout:
    """The module dimensions and head shapes of a reply (what later replies must match)."""
    return Layout.from_adapter(reply.adapter)


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
        if check_update(reply, _expected_rank(node_id, reply, known), None, limits) is not None:
            continue
        layout = layout_of(reply)
        key = (tuple(sorted(layout.modules.items())), tuple(sorted(layout.head.items())))
        votes[key] += 1
        layouts.setdefault(key, layout)
    if not votes:
        return None
    best = max(votes.values())
    return next(layouts[key] for key in layouts if votes[key] == best)


def accept_train_replies(
    replies: Mapping[int, Message],
    known: Mapping[int, NodeInfo],
    cfg: RunConfig,
    layout: Layout | None,
    limits: UpdateLimits | None = None,
) -> tuple[dict[int, TrainReply], list[Rejection], Layout | None]:
    """Decode and validate every train reply; return the accepted ones, the rejections and the layout.

    ``layout`` is what replies must match; ``None`` before the first valid round, when the round's consensus
    (:func:`consensus_layout`) becomes the layout.
    """
    limits = limits or update_limits(cfg)
    decoded, rejected = _decode(replies)
    if layout is None:
        layout = consensus_layout(decoded, known, limits)
    accepted: dict[int, TrainReply] = {}
    for node_id, reply in decoded.items():
        reason = check_update(reply, _expected_rank(node_id, reply, known), layout, limits)
        if reason is not None:
            rejected.append((node_id, reason))
        else:
            accepted[node_id] = reply
    outliers = norm_outliers({n: update_norm(r) for n, r in accepted.items()}, limits.norm_factor)
    for node_id, reason in sorted(outliers.items()):
        rejected.append((node_id, reason))
        del accepted[node_id]
    for node_id, reason in rejected:
        log(WARNING, "update from node %d rejected: %s", node_id, reason)
    return accepted, rejected, layout


def _decode(replies: Mapping[int, Message]) -> tuple[dict[int, TrainReply], list[Rejection]]:
    decoded: dict[int, TrainReply] = {}
    rejected: list[Rejection] = []
    for node_id, msg in sorted(replies.items()):
        try:
            decoded[node_id] = records.decode_train_reply(msg.content)
        except records.RecordError as err:
            rejected.append((node_id, f"malformed: {err}"))
    return decoded, rejected


def _expected_rank(node_id: int, reply: TrainReply, known: Mapping[int, NodeInfo]) -> int:
    """The rank the coordinator learned for the node, or (for a node it has not met) the one it reports."""
    return known[node_id].rank if node_id in known else reply.node.rank
