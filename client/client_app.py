"""The fedlora ClientApp: thin handlers that decode a message, call plain node code, and encode the reply."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.faults import fault_mod
from client.node import evaluate_node, node_info, train_node
from client.node_settings import NodeSettings
from client.secure import secure_train_mod
from common.codec import records
from common.config import RunConfig

app = ClientApp(mods=[audit_mod, fault_mod])


def _setup(context: Context) -> tuple[RunConfig, NodeSettings]:
    cfg = RunConfig.from_mapping(context.run_config)
    return cfg, NodeSettings.from_node_config(cfg, context.node_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the coordinator this node's rank, scaling, name and device."""
    cfg, node = _setup(context)
    return Message(records.encode_query_reply(node_info(cfg, node)), reply_to=msg)


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """Train LoRA at this node's rank from the global factors; reply with factors, head and metrics only.

    Under secure aggregation, ``secure_train_mod`` runs SecAgg+ around this handler and masks the reply.
    """
    cfg, node = _setup(context)
    instruction = records.decode_instruction(msg.content)
    reply = train_node(cfg, node, instruction)
    return Message(records.encode_train_reply(reply), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter on this node's held-out split."""
    cfg, node = _setup(context)
    instruction = records.decode_instruction(msg.content)
    reply = evaluate_node(cfg, node, instruction)
    return Message(records.encode_evaluate_reply(reply), reply_to=msg)
