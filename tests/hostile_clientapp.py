"""A ClientApp for tests only: fedlora's real handlers, with the nodes named in ``PLAN`` misbehaving.

``tests/hostile.py`` copies this file into a staged copy of the app, with ``PLAN`` filled in, and points
``[tool.flwr.app.components] clientapp`` at it; the real ServerApp then runs a real simulation against it. Honest
nodes run fedlora's handlers unchanged; a planned node runs them too and then alters its reply:

- ``declare-rank``: the node says it trains at ``rank``: in its evaluate replies from round ``from-round`` on, then in
  its train replies of the following rounds, whose factors it pads to that rank so that they are self-consistent.
- ``smuggle-metric``: its train replies also carry a base weight of the model, flattened, as a list of floats in the
  metric record (key ``warmup``).
- ``extra-config-key``: its train replies carry one more key in the node's config record (``debug``).
- ``head-twice``: its train replies carry the head a second time, in an array record of its own (``head``).
- ``padded-layout``: its train replies carry the packed adapter's layout re-written with indentation, whitespace
  that could carry bits (:mod:`common.codec.packing`).

Attacks on the aggregate (train replies from round ``from-round`` on; well-formed, finite, at the node's rank), as
:mod:`simulations.attacks` makes them: ``scale`` (lora_B × ``factor``), ``inflate-examples``, ``noise``,
``huge-head``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import client_app as real
from client.audit import audit_mod
from client.faults import fault_mod
from client.secure import secure_train_mod
from common.codec import packing, records
from common.lora import lora_scaling
from common.updates import AdapterFactors, NodeInfo, TrainReply
from simulations.attacks import attacked

PLAN: dict[str, dict[str, Any]] = {}
"""Node name → what it does (``{"behaviour": "declare-rank", "rank": 16, "from-round": 1}``)."""

app = ClientApp(mods=[audit_mod, fault_mod])


def _plan(context: Context, msg: Message, after: int = 0) -> dict[str, Any] | None:
    """This node's plan when it applies to ``msg`` (rounds from ``from-round`` + ``after`` on)."""
    name = str(context.node_config.get("node-name", f"partition-{context.node_config.get('partition-id', 0)}"))
    plan = PLAN.get(name)
    server_round = records.server_round_of(msg.content) or 0
    return plan if plan is not None and server_round >= int(plan.get("from-round", 0)) + after else None


def _declared(node: NodeInfo, plan: dict[str, Any], context: Context) -> NodeInfo:
    rank = int(plan["rank"])
    alpha = float(context.run_config["lora-alpha"])
    return dataclasses.replace(node, rank=rank, scaling=lora_scaling(alpha, rank))


def _padded(adapter: AdapterFactors, rank: int) -> AdapterFactors:
    """The same update at a larger rank: lora_A gains random rows, lora_B zero columns (s·B·A scales with s)."""
    rng = np.random.default_rng(rank)
    lora = {}
    for module, (lora_A, lora_B) in adapter.lora.items():
        extra = rank - lora_A.shape[0]
        a = np.concatenate([lora_A, rng.normal(0, 0.1, (extra, lora_A.shape[1])).astype(lora_A.dtype)])
        b = np.concatenate([lora_B, np.zeros((lora_B.shape[0], extra), lora_B.dtype)], axis=1)
        lora[module] = (a, b)
    return AdapterFactors(lora, adapter.head)


def _smuggle_metric(content: RecordDict, context: Context) -> None:
    from client.model import load_classifier, resolve_model

    model, _ = load_classifier(resolve_model(str(context.run_config["model"])), 4, 0)
    weight = next(p for name, p in model.named_parameters() if name.endswith("attention.self.query.weight"))
    content[records.METRICS]["warmup"] = [float(x) for x in weight.detach().flatten()]


def _extra_config_key(content: RecordDict, context: Context) -> None:
    content[records.NODE]["debug"] = "hello"


def _head_twice(content: RecordDict, context: Context) -> None:
    adapter = content[records.ADAPTER]
    content["head"] = ArrayRecord({k: adapter[k] for k in adapter.keys() if ".lora_" not in k})


def _padded_layout(content: RecordDict, context: Context) -> None:
    adapter = content[records.ADAPTER]
    layout = json.loads(adapter[packing.LAYOUT].numpy().tobytes())
    adapter[packing.LAYOUT] = Array(np.frombuffer(json.dumps(layout, indent=1).encode(), np.uint8).copy())


SMUGGLERS = {
    "smuggle-metric": _smuggle_metric,
    "extra-config-key": _extra_config_key,
    "head-twice": _head_twice,
    "padded-layout": _padded_layout,
}
"""Behaviours that add something to an honest train reply's records."""


ATTACKS = {"scale": None, "inflate-examples": "inflate-examples", "noise": "noise", "huge-head": "huge-head"}
"""Behaviours that change what an honest train reply says (:mod:`simulations.attacks`)."""


def _attacked(reply: TrainReply, plan: dict[str, Any]) -> TrainReply:
    """An honest reply turned into one of the attacks of :mod:`simulations.attacks` (``scale`` by any factor)."""
    if plan["behaviour"] != "scale":
        return attacked(reply, str(ATTACKS[plan["behaviour"]]))
    lora = {m: (a, (b * float(plan["factor"])).astype(b.dtype)) for m, (a, b) in reply.adapter.lora.items()}
    return dataclasses.replace(reply, adapter=AdapterFactors(lora, reply.adapter.head))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The real query handler."""
    return real.query(msg, context)


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """The real train handler, then the plan."""
    reply = real.train(msg, context)
    plan = _plan(context, msg, after=1)
    if plan is None or reply.has_error():
        return reply
    if plan["behaviour"] in SMUGGLERS:
        SMUGGLERS[plan["behaviour"]](reply.content, context)
        return reply
    decoded = records.decode_train_reply(reply.content)
    if plan["behaviour"] in ATTACKS:
        decoded = _attacked(decoded, plan)
    if plan["behaviour"] == "declare-rank":
        decoded = dataclasses.replace(
            decoded, adapter=_padded(decoded.adapter, int(plan["rank"])), node=_declared(decoded.node, plan, context)
        )
    return Message(records.encode_train_reply(decoded), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The real evaluate handler, then the plan."""
    reply = real.evaluate(msg, context)
    plan = _plan(context, msg)
    if plan is None or reply.has_error():
        return reply
    decoded = records.decode_evaluate_reply(reply.content)
    if plan["behaviour"] == "declare-rank":
        decoded = dataclasses.replace(decoded, node=_declared(decoded.node, plan, context))
    return Message(records.encode_evaluate_reply(decoded), reply_to=msg)
