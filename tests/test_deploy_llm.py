"""A deployed causal-LM federation on 127.0.0.1: a TLS SuperLink with node authentication and two ``fedlora client``
devices that fine-tune the tiny Llama on their own instruction files (one of prompt/response records, one of chats).
The coordinator evaluates the exported adapter on its own held-out instructions (``server-eval-data``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from deploy import Deployment, bounded

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="process groups, SIGALRM")]
PROJECT_DIR = Path(__file__).resolve().parents[1]
RANKS = {"node-0": 2, "node-1": 4}
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]


def question(i: int) -> tuple[str, str]:
    """A templated instruction: the answer is easy to learn from the question."""
    colour = COLOURS[i % len(COLOURS)]
    return f"What colour is item {i}?", f"Item {i} is {colour}."


def write_files(folder: Path) -> dict[str, Path]:
    """node-0: prompt/response records; node-1: chat records; the coordinator: its own held-out records."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.jsonl" for name in (*RANKS, "held-out")}
    with files["node-0"].open("w") as out:
        for i in range(0, 48):
            prompt, response = question(i)
            out.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    with files["node-1"].open("w") as out:
        for i in range(48, 96):
            prompt, response = question(i)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            out.write(json.dumps({"messages": messages}) + "\n")
    with files["held-out"].open("w") as out:
        for i in range(96, 112):
            prompt, response = question(i)
            out.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return files


def run_instruction_federation(
    tmp_path: Path, local_steps: int, client: Sequence[str] = (sys.executable, "-m", "client.device")
) -> tuple[str, dict[str, str]]:
    """Two devices (``client``: the ``fedlora client`` command) on their own instruction files, through a TLS SuperLink
    with node authentication, 2 rounds; the run's final status and every process's log. Outputs under ``tmp_path``."""
    files = write_files(tmp_path / "data")
    outputs = {"out-dir": str(tmp_path / "run"), "store": str(tmp_path / "fedlora.db")}
    settings = {
        "model": "tiny-llama", "task": str(files["held-out"]), "server-eval-data": str(files["held-out"]),
        "node-ranks": "2,4", "num-rounds": 2, "local-steps": local_steps, "batch-size": 8, "learning-rate": 0.02,
        "lora-alpha": 8.0, "max-length": 64, "eval-examples": 8, "min-nodes": 2, **outputs,
    }  # fmt: skip
    with bounded(900), Deployment(tmp_path / "deployment", nodes=len(RANKS)) as dep:
        devices = []
        for index, (name, rank) in enumerate(RANKS.items()):
            dep.register(index)
            own = ("--name", name, "--model", "tiny-llama", "--data", str(files[name]))
            devices.append(dep.spawn(name, [*client, *dep.client_args(index, rank, *own)]))
        dep.wait_online(devices, timeout=300)
        status = dep.wait_run(dep.run_app(PROJECT_DIR, settings), timeout=800)
        return status, {proc.name: proc.log() for proc in dep.procs}


def test_two_devices_fine_tune_a_causal_lm_on_their_own_instruction_files(tmp_path: Path) -> None:
    # Arrange, act
    status, logs = run_instruction_federation(tmp_path, local_steps=12)
    # Assert: completed; the coordinator's held-out perplexity and the nodes' own fell; a causal-LM adapter.
    assert status == "finished:completed", logs
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["global_perplexity"] < 0.9 * rows[0]["global_perplexity"]
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert rows[-1]["participants"] == 2
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["r"] == 4
