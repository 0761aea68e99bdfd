"""The Flower side of a round's replies: error replies named, contents decoded by the codec (everything else is in
the Flower-free :mod:`server.accept` and :mod:`server.engine`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from flwr.app import Message

from common.codec import records
from common.updates import EvaluateReply, NodeInfo, TrainReply
from server.accept import Rejection

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


def decode_train_replies(ok: Mapping[int, Message], max_rank: int) -> tuple[dict[int, TrainReply], list[Rejection]]:
    """Train replies decoded by the codec (ranks up to ``max_rank``); a malformed one is a rejection."""
    decoded: dict[int, TrainReply] = {}
    rejected: list[Rejection] = []
    for node_id, msg in sorted(ok.items()):
        try:
            decoded[node_id] = records.decode_train_reply(msg.content, max_rank)
        except records.RecordError as err:
            rejected.append((node_id, f"malformed: {err}"))
    return decoded, rejected


def decode_evaluate_replies(
    ok: Mapping[int, Message], max_rank: int
) -> tuple[dict[int, EvaluateReply], list[Rejection]]:
    """Evaluate replies decoded by the codec; a malformed one is named (``malformed-evaluate-reply: …``)."""
    decoded: dict[int, EvaluateReply] = {}
    failed: list[Rejection] = []
    for node_id, msg in ok.items():
        try:
            decoded[node_id] = records.decode_evaluate_reply(msg.content, max_rank)
        except records.RecordError as err:
            failed.append((node_id, f"malformed-evaluate-reply: {err}"))
    return decoded, failed


def decode_query_replies(ok: Mapping[int, Message], max_rank: int) -> tuple[dict[int, NodeInfo], list[Rejection]]:
    """Query replies (a node's rank, scaling, name, device) decoded by the codec."""
    decoded: dict[int, NodeInfo] = {}
    failed: list[Rejection] = []
    for node_id, msg in ok.items():
        try:
            decoded[node_id] = records.decode_query_reply(msg.content, max_rank)
        except records.RecordError as err:
            failed.append((node_id, f"malformed query reply: {err}"))
    return decoded, failed
