"""The device install: ``pip install fedlora`` in a fresh virtual environment holds what a node needs and nothing
else (no Ray, Opacus, matplotlib or flwr-datasets), stays within torch + transformers + 250 MiB, and two devices on it
fine-tune the tiny causal LM on their own files through a real SuperLink (the SuperLink and the ServerApp run on the
full install, as a coordinator would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy_llm import RANKS, run_instruction_federation

from simulations.bench_deploy import install_size

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="process groups, SIGALRM")]
PROJECT_DIR = Path(__file__).resolve().parents[1]
REST_LIMIT_MIB = 250


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with pinned torch and ``pip install <this repository>`` (no extras)."""
    folder = tmp_path_factory.mktemp("device")
    venv, source = folder / "venv", folder / "fedlora"
    # A copy of the tracked files: pip builds in the source tree, and the checkout should not gain build/ folders.
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_DIR / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for what in (["torch==2.13.0"], [str(source)]):
        done = subprocess.run([*pip, *what], capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
    yield venv


def test_the_device_install_has_the_node_and_none_of_the_lab(device_venv: Path) -> None:
    python = str(device_venv / "bin" / "python")
    help_ = subprocess.run([str(device_venv / "bin" / "fedlora"), "client", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--superlink" in help_.stdout, help_.stderr
    probe = "import importlib.util as u; print([m for m in {mods} if u.find_spec(m)])"
    wanted = subprocess.run([python, "-c", probe.format(mods=["torch", "transformers", "peft", "flwr"])],
                            capture_output=True, text=True, check=True)  # fmt: skip
    lab = subprocess.run([python, "-c", probe.format(mods=["ray", "opacus", "matplotlib", "flwr_datasets"])],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert wanted.stdout.strip() == "['torch', 'transformers', 'peft', 'flwr']"
    assert lab.stdout.strip() == "[]"
    # Work that needs an extra says which, in one line: a node given a share of a packaged task (flwr-datasets).
    script = (
        "from client.warm import work\nfrom common.codec import records\nfrom common.updates import Instruction\n"
        "ins = records.encode_instruction(Instruction(1, 0, 0.0, None))\n"
        "work('train', ins, {'model': 'tiny', 'task': 'tiny'}, {'partition-id': 0, 'num-partitions': 2})\n"
    )
    share = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert share.returncode == 1 and "pip install 'fedlora[tasks]'" in share.stderr.splitlines()[-1], share.stderr


def test_the_device_install_is_torch_and_transformers_and_at_most_250_mib_more(device_venv: Path) -> None:
    site = next((device_venv / "lib").glob("python3*/site-packages"))
    sizes = install_size(site)
    print(f"\ndevice install (MiB): {json.dumps(sizes)}")
    assert sizes["torch"] > 500 and sizes["transformers"] > 50  # measured, not empty
    assert sizes["rest"] <= REST_LIMIT_MIB, sizes


def test_two_devices_on_the_device_install_complete_a_run(device_venv: Path, tmp_path: Path) -> None:
    # Arrange, act: the devices run the device venv's fedlora client (its flower-supernode, its ClientApp processes).
    status, logs = run_instruction_federation(
        tmp_path, local_steps=8, client=[str(device_venv / "bin" / "fedlora"), "client"]
    )
    # Assert: completed, and the nodes' work ran in the device install (its warm node logged every message).
    assert status == "finished:completed", logs
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rows[-1]["global_perplexity"] < rows[0]["global_perplexity"]
    for name in RANKS:
        assert logs[name].count("warm node: train") == 2, logs[name][-3000:]
        assert os.fspath(device_venv) in logs[name], logs[name][-3000:]  # it started the device venv's SuperNode
