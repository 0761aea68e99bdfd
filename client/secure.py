"""The node side of secure aggregation: Flower's ``secaggplus_mod`` around the normal train handler.

Only train messages that carry SecAgg+'s config record take this path; every other message goes straight to the
handler. In SecAgg+'s third stage the mod calls the normal train handler (which decodes the fedlora instruction,
trains and encodes a normal reply), turns that reply into a legacy ``FitRes`` of zero-padded summands
(:mod:`common.codec.secure_records`, :mod:`common.secure_sum`), and lets ``secaggplus_mod`` quantise and mask it. What
leaves the node is masked integers, plus in clear its rank, scaling, name, device, example count and metrics.

SecAgg+ clips every entry of w·x (w = num-examples / secagg-max-weight) to ±secagg-clipping-range before it
quantises. A clipped entry would silently corrupt the sum, and only the node can see it, so the node refuses
instead, naming the entry (Flower turns that into an error reply and the coordinator records it).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.codec import records
from common.config import RunConfig


def secure_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: run SecAgg+ for train messages that carry its config record, pass the others on."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_then_encode(message: Message, ctx: Context) -> Message:
        reply = call_next(message, ctx)
        if reply.has_error():
            return reply
        from common.codec.secure_records import encode_fit_res, pad_rank_of  # torch: only under SecAgg+
        from common.rules.registry import rule_for

        cfg = RunConfig.from_mapping(ctx.run_config)
        train_reply = records.decode_train_reply(reply.content)
        content, summands = encode_fit_res(train_reply, pad_rank_of(message.content), rule_for(cfg))
        check_clipping_range(summands, train_reply.num_examples, cfg)
        return Message(content, reply_to=message)

    return secaggplus_mod(msg, context, train_then_encode)


def check_clipping_range(summands: list[np.ndarray], num_examples: int, cfg: RunConfig) -> None:
    """Refuse an update that SecAgg+ would clip or whose weight would overflow, with the setting to change."""
    weight = num_examples / cfg.secagg.max_weight
    if weight > 1:
        raise ValueError(
            f"num-examples {num_examples} exceeds secagg-max-weight {cfg.secagg.max_weight:g}; the masked sum could "
            "overflow. Raise secagg-max-weight"
        )
    largest = max((float(np.abs(s).max()) for s in summands if s.size), default=0.0)
    if weight * largest > cfg.secagg.clipping_range:
        raise ValueError(
            f"an update entry of magnitude {largest:.4g} (× weight {weight:.4g}) exceeds secagg-clipping-range "
            f"{cfg.secagg.clipping_range:g}; SecAgg+ would clip it and corrupt the sum. Raise secagg-clipping-range"
        )
