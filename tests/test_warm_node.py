"""The warm node (:mod:`client.warm`): the same replies as a fresh ClientApp process, the model loaded once, and
nobody without the secret gets in. The deployed run (``test_deploy_run.py``) checks it through real SuperNodes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_SETTINGS
from flwr.app import Context, RecordDict

from client.warm import KEY_FILE_KEY, SOCKET_KEY, WarmNode, _to_bytes, call, handle
from common.codec import records
from common.updates import Instruction

NODE_CONFIG: dict[str, Any] = {"lora-rank": 4, "partition-id": 1, "num-partitions": 3, "node-name": "node-1"}
ROUNDS = 3

COLD_SCRIPT = """
import sys
from flwr.app import Context, RecordDict
from client.warm import work, _to_bytes
from common.codec import records
from common.updates import Instruction
import json
run_config, node_config = json.loads(sys.argv[1]), json.loads(sys.argv[2])
content = records.encode_instruction(Instruction(int(sys.argv[3]), 0, 0.0, None))
sys.stdout.buffer.write(_to_bytes(work("train", content, run_config, node_config)))
"""


@pytest.fixture()
def warm_node() -> Iterator[WarmNode]:
    node = WarmNode().start()
    yield node
    node.close()


def context(node_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(TINY_SETTINGS))


def train_message(server_round: int) -> RecordDict:
    return records.encode_instruction(Instruction(server_round, 0, 0.0, None))


def test_a_warm_node_replies_what_a_fresh_process_computes_to_the_last_bit(warm_node: WarmNode) -> None:
    import torch

    from client.model import LOADS

    before, threads = dict(LOADS), str(torch.get_num_threads())
    ctx = context({**NODE_CONFIG, **warm_node.node_config()})
    warm = [_to_bytes(handle("train", train_message(r), ctx)) for r in range(1, ROUNDS + 1)]
    cold = [
        subprocess.run(
            [sys.executable, "-c", COLD_SCRIPT, json.dumps(TINY_SETTINGS), json.dumps(NODE_CONFIG), str(r), threads],
            capture_output=True,
            check=True,
            timeout=300,
        ).stdout
        for r in (1, ROUNDS)
    ]
    assert warm[0] == cold[0] and warm[-1] == cold[-1]  # byte for byte, the first message and a later one
    assert LOADS["model"] - before.get("model", 0) <= 1  # loaded at most once for three messages (0: cached already)
    assert LOADS["data"] - before.get("data", 0) <= 1


def test_an_error_on_the_warm_node_is_raised_in_the_clientapp_with_its_type(warm_node: WarmNode) -> None:
    ctx = context({**NODE_CONFIG, "lora-rank": 999, **warm_node.node_config()})
    with pytest.raises(ValueError, match=r"lora-rank must be in 1\.\.64"):
        handle("train", train_message(1), ctx)


def test_a_caller_without_the_secret_is_refused_and_the_node_keeps_serving(
    warm_node: WarmNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = tmp_path / "wrong-secret"
    wrong.write_bytes(b"x" * 32)
    content = records.encode_instruction(Instruction(1, 0, 0.0, None))
    with pytest.raises(Exception, match="cannot be reached"):
        call(warm_node.address, wrong, "query", content, context(NODE_CONFIG))
    reply = call(warm_node.address, warm_node.key_file, "query", RecordDict(), context(NODE_CONFIG))
    assert records.decode_query_reply(reply).rank == NODE_CONFIG["lora-rank"]


def test_the_socket_folder_and_the_secret_are_private_and_removed_on_close() -> None:
    node = WarmNode()
    assert node.folder.stat().st_mode & 0o077 == 0
    assert node.key_file.stat().st_mode & 0o077 == 0
    node.close()
    assert not node.folder.exists()


def test_without_a_reachable_warm_node_the_clientapp_does_the_work_itself(tmp_path: Path) -> None:
    gone = {SOCKET_KEY: str(tmp_path / "no.sock"), KEY_FILE_KEY: str(tmp_path / "no-secret")}
    reply = handle("query", RecordDict(), context({**NODE_CONFIG, **gone}))
    assert records.decode_query_reply(reply).name == "node-1"
