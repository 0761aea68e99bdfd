"""Splitting a round's replies into accepted updates and named rejections."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import WARNING

from flwr.app import Message
from flwr.supercore import log

from common import records
from common.config import RunConfig
from common.updates import NodeInfo, TrainReply
from common.validation import Layout, UpdateLimits, check_update, norm_outliers, update_norm

Rejection = tuple[int, str]


def split_replies(replies: Iterable[Message]) -> tuple[dict[int, Message], list[Rejection]]:
    """Replies with content by node id, and the nodes whose reply carries an error (with its reason)."""
    ok: dict[int, Message] = {}
    failed: list[Rejection] = []
    for msg in replies:
        node_id = int(msg.metadata.src_node_id)
        if msg.has_error():
            failed.append((node_id, f"node-error: {msg.error.reason}"))
        else:
            ok[node_id] = msg
    return ok, failed


def layout_of(reply: TrainReply) -> Layout:
    """The module dimensions and head shapes of a reply (what later replies must match)."""
    modules = {m: (int(b.shape[0]), int(a.shape[1])) for m, (a, b) in reply.adapter.lora.items()}
    return Layout(modules, {k: tuple(v.shape) for k, v in reply.adapter.head.items()})


def accept_train_replies(
    replies: Mapping[int, Message], known: Mapping[int, NodeInfo], cfg: RunConfig, layout: Layout | None
) -> tuple[dict[int, TrainReply], list[Rejection], Layout | None]:
    """Decode and validate every train reply; return the accepted ones, the rejections and the layout."""
    limits = UpdateLimits(norm_factor=cfg.norm_factor, max_num_examples=cfg.max_num_examples)
    accepted: dict[int, TrainReply] = {}
    rejected: list[Rejection] = []
    for node_id, msg in sorted(replies.items()):
        try:
            reply = records.decode_train_reply(msg.content)
        except records.RecordError as err:
            rejected.append((node_id, f"malformed: {err}"))
            continue
        expected_rank = known[node_id].rank if node_id in known else reply.node.rank
        reason = check_update(reply, expected_rank, layout, limits)
        if reason is None and layout is None:
            layout = layout_of(reply)
        if reason is not None:
            rejected.append((node_id, reason))
            continue
        accepted[node_id] = reply
    outliers = norm_outliers({n: update_norm(r) for n, r in accepted.items()}, limits.norm_factor)
    for node_id, reason in outliers.items():
        rejected.append((node_id, reason))
        del accepted[node_id]
    for node_id, reason in rejected:
        log(WARNING, "update from node %d rejected: %s", node_id, reason)
    return accepted, rejected, layout
