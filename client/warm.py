"""A warm node: ``fedlora client`` keeps the model, the tokenizer and the tokenised data in memory for a whole run.

Flower 1.42's SuperNode runs every message in a fresh ``flwr-clientapp`` process, which imports torch, transformers
and peft (seconds), loads the model from disk and reads and tokenises the node's data, all again for every message.
``fedlora client`` therefore does the node's work itself, on a thread of its own long-lived process
(:class:`WarmNode`), and the per-message ClientApp only hands the message over and the reply back (:func:`handle`):

- over a Unix socket in a private folder (mode 0700) that the SuperNode learns from its node-config
  (``warm-socket``), and
- with a secret of 32 random bytes made when ``fedlora client`` starts, in a file only this user can read
  (``warm-key-file``); both ends prove they hold it (``multiprocessing.connection``'s HMAC challenge) before
  anything is read.

Both ends run the same function, :func:`work`, on the same inputs (the message's records, the run config, the node
config), so a warm node replies exactly what a fresh ClientApp process would, to the last digit: the model loaders
hand out a copy and the global RNG as a fresh load leaves it (:func:`client.model.load_classifier`). What stays in
memory is keyed by the run config, so a run with other settings loads again. A ``fedlora client`` that restarts
warms up again at its first message. When the socket cannot be reached (the ``fedlora client`` that started the
SuperNode is gone), the ClientApp does the work in its own process, as Flower would, and logs why.

Each message's line in the ``fedlora client`` log says how often the model was loaded and the data prepared since
the start (:data:`client.model.LOADS`): ``model loaded 1×`` all run long is the cache at work.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from client.node_settings import NodeSettings
from common.codec import records
from common.config import RunConfig
from common.extras import missing_extra

SOCKET_KEY = "warm-socket"
"""Node-config key: the warm node's Unix socket."""
KEY_FILE_KEY = "warm-key-file"
"""Node-config key: the file holding the warm node's secret."""
PROTOCOL = 1
OPS = ("query", "train", "evaluate")

log = logging.getLogger("fedlora.warm")


class WarmNodeUnreachable(Exception):
    """The warm node's socket or secret cannot be used; the ClientApp does the work itself."""


def work(op: str, content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> RecordDict:
    """The node's answer to one message (``op``: query, train or evaluate), as plain node code computes it.

    A module that only an extra installs (local DP's Opacus, the packaged tasks' partitioner) is named with the extra
    to install when it is missing (:mod:`common.extras`).
    """
    try:
        return _work(op, content, run_config, node_config)
    except ModuleNotFoundError as err:
        line = missing_extra(err, f"this node's {op} message")
        if line is None:
            raise
        raise RuntimeError(line) from err


def _work(op: str, content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> RecordDict:
    from client.node import evaluate_node, node_info, train_node  # torch, transformers, peft: only where work runs

    cfg = RunConfig.from_mapping(run_config)
    node = NodeSettings.from_node_config(cfg, node_config)
    if op == "query":
        return records.encode_query_reply(node_info(cfg, node))
    instruction = records.decode_instruction(content)
    if op == "train":
        return records.encode_train_reply(train_node(cfg, node, instruction))
    if op == "evaluate":
        return records.encode_evaluate_reply(evaluate_node(cfg, node, instruction))
    raise ValueError(f"unknown node operation {op!r}; one of {', '.join(OPS)}")


def handle(op: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content for a message's ``content``: from the device's warm node if the node-config names one, else
    computed in this process."""
    address = str(context.node_config.get(SOCKET_KEY, ""))
    if address:
        try:
            return call(address, Path(str(context.node_config.get(KEY_FILE_KEY, ""))), op, content, context)
        except WarmNodeUnreachable as err:
            flwr_log(logging.WARNING, "%s; this ClientApp process does the work itself", err)
    return work(op, content, context.run_config, context.node_config)


def call(address: str, key_file: Path, op: str, content: RecordDict, context: Context) -> RecordDict:
    """Ask the warm node at ``address`` for the reply content; re-raise the error it raised, if any."""
    try:
        connection = Client(address, family="AF_UNIX", authkey=key_file.read_bytes())
    except (OSError, AuthenticationError, EOFError) as err:
        raise WarmNodeUnreachable(f"the warm node at {address} cannot be reached ({err})") from None
    request = {
        "protocol": PROTOCOL,
        "op": op,
        "content": _to_bytes(content),
        "run_config": dict(context.run_config),
        "node_config": dict(context.node_config),
    }
    with connection:
        connection.send(request)
        try:
            answer = connection.recv()
        except EOFError:
            raise RuntimeError(f"the warm node at {address} ended while answering a {op} message") from None
    if "error" in answer:
        raise answer["error"]
    return _from_bytes(answer["content"])


class WarmNode:
    """The node's work, served from this process over a private Unix socket (see the module doc)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fedlora-node-"))  # mode 0700
        self.address = str(self.folder / "node.sock")
        self.key_file = self.folder / "secret"
        key = secrets.token_bytes(32)
        descriptor = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle_:
            handle_.write(key)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=key)
        self._thread = threading.Thread(target=self._serve, name="fedlora-warm-node", daemon=True)

    def node_config(self) -> dict[str, str]:
        """The node-config entries that point the ClientApp here."""
        return {SOCKET_KEY: self.address, KEY_FILE_KEY: str(self.key_file)}

    def start(self) -> WarmNode:
        """Start serving on a daemon thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, and remove the socket and the secret."""
        self._listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _serve(self) -> None:
        while True:
            try:
                connection = self._listener.accept()
            except AuthenticationError as err:
                log.warning("warm node: refused a connection without the secret (%s)", err)
                continue
            except (OSError, EOFError):
                return  # closed
            with connection:
                self._answer(connection)

    def _answer(self, connection: Connection) -> None:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        op, started, content = str(request.get("op", "?")), time.monotonic(), None
        try:
            if request.get("protocol") != PROTOCOL:
                raise ValueError(f"warm-node protocol {request.get('protocol')!r}; this fedlora speaks {PROTOCOL}")
            content = _from_bytes(request["content"])
            answer: dict[str, Any] = {
                "content": _to_bytes(work(op, content, request["run_config"], request["node_config"]))
            }
        except Exception as err:  # noqa: BLE001 - handed back to the ClientApp, which raises it for Flower to report
            answer = {"error": _portable(err)}
        log.info("warm node: %s", _summary(op, content, answer, time.monotonic() - started))
        try:
            connection.send(answer)
        except OSError:
            log.warning("warm node: the ClientApp left before its %s reply", op)


def _summary(op: str, content: RecordDict | None, answer: Mapping[str, Any], seconds: float) -> str:
    from client.model import LOADS

    server_round = records.server_round_of(content) if content is not None and op != "query" else None
    where = f" (round {server_round})" if server_round is not None else ""
    outcome = f"failed: {answer['error']}" if "error" in answer else f"in {seconds:.1f} s"
    return f"{op}{where} {outcome}; model loaded {LOADS['model']}×, data prepared {LOADS['data']}× since start"


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (so the ClientApp raises the same type), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


def _to_bytes(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def _from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)
