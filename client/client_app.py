"""The fedlora ClientApp: thin handlers that pass a message to the node's work and the reply back.

The work itself (:func:`client.warm.work`: decode, call plain node code, encode) runs in ``fedlora client``'s warm
node when the node-config names one, so the model and data stay loaded across messages; otherwise (a simulation, a
plain ``flower-supernode``) in this process. Nothing here imports torch: a message that a warm node answers costs
this process only Flower's own imports.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.faults import fault_mod
from client.secure import secure_train_mod
from client.warm import handle

app = ClientApp(mods=[audit_mod, fault_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the coordinator this node's rank, scaling, name and device."""
    return Message(handle("query", msg.content, context), reply_to=msg)


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """Train LoRA at this node's rank from the global factors; reply with factors, head and metrics only.

    Under secure aggregation, ``secure_train_mod`` runs SecAgg+ around this handler and masks the reply.
    """
    return Message(handle("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter on this node's held-out split."""
    return Message(handle("evaluate", msg.content, context), reply_to=msg)
