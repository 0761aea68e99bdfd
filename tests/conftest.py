"""Shared fixtures: a seed, and one small real Flower simulation that several tests read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TINY_SETTINGS: dict[str, Any] = {
    "model": "tiny",
    "task": "tiny",
    "node-ranks": "2,4,8",
    "local-steps": 15,
    "learning-rate": 0.02,
    "baseline-learning-rate": 0.02,
    "head-lr-ratio": 1.0,
    "max-length": 16,
    "num-rounds": 2,
}
"""A 3-node, 2-round run of the tiny model on the tiny task (tens of seconds)."""


@dataclass(frozen=True)
class SimulationRun:
    """A finished ``fedlora simulate`` run."""

    out_dir: Path
    store: Path
    audit_dir: Path
    returncode: int
    output: str

    def metrics(self) -> list[dict[str, Any]]:
        return json.loads((self.out_dir / "metrics.json").read_text())

    def config(self) -> dict[str, Any]:
        """The run config the coordinator wrote (``config.json`` without its run id)."""
        saved = json.loads((self.out_dir / "config.json").read_text())
        saved.pop("run-id", None)
        return dict(saved)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for p in sorted(self.audit_dir.glob("*.jsonl")) for line in p.read_text().splitlines()]


def fedlora_command(*args: str) -> list[str]:
    """The ``fedlora`` console script of this environment."""
    return [str(Path(sys.executable).parent / "fedlora"), *args]


def run_fedlora(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``fedlora ARGS`` as a real process and capture its output."""
    return subprocess.run(
        fedlora_command(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def settings_flags(settings: dict[str, Any]) -> list[str]:
    """``--set key=value`` flags (TOML values)."""
    flags = []
    for key, value in settings.items():
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return flags


def simulate(tmp: Path, nodes: int = 3, cpus_per_node: int = 2, **overrides: Any) -> SimulationRun:
    """Run a real ``fedlora simulate`` of the tiny task into ``tmp``.

    ``cpus_per_node`` 2 (this machine's cores) runs the nodes one after the other, in partition order, which tests of
    timing and failures rely on; 1 (the command's default) runs two at once.
    """
    settings = {**TINY_SETTINGS, **overrides, "audit-dir": str(tmp / "audit")}
    done = run_fedlora(
        "simulate", "--nodes", str(nodes), "--out", str(tmp / "run"), "--store", str(tmp / "fedlora.db"),
        "--cpus-per-node", str(cpus_per_node), *settings_flags(settings),
    )  # fmt: skip
    return SimulationRun(tmp / "run", tmp / "fedlora.db", tmp / "audit", done.returncode, done.stdout + done.stderr)


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-matrix tests (``pytestmark = pytest.mark.usefixtures(...)``): they gain
    nothing from a second OpenMP thread, and on a busy machine it stalls them (112 s with 2 threads at a load average
    of 15, 40 s with 1, for the aggregation and diagnostics modules)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LONGEST_FIRST = (
    "test_deploy_run.py",
    "test_llm_flower.py",
    "test_privacy_sim.py",
    "test_reliability_dropout.py",
    "test_resume.py",
    "test_attacks.py",
    "test_proxy.py",
    "test_deploy_llm.py",
    "test_simulation.py",
    "test_deploy_smuggling.py",
    "test_hostile_ranks.py",
    "test_many_nodes.py",
    "test_config_errors.py",
    "test_dashboard_browser.py",
    "test_deploy_refusals.py",
    "test_smuggling.py",
    "test_cli_errors.py",
    "test_centralized.py",
)
"""The longest modules, longest first (about 316, 240, 221, 230, 156, 126, 129, 125, 118, 80, 75, 74, 60, 58, 55, 50,
53, 31 s)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest modules first: those in ``LONGEST_FIRST``, in its order, then any other module with an
    end-to-end run (a ``slow`` test, or one reading ``tiny_simulation``), then the rest.

    ``make test`` hands whole modules to two xdist workers in this order (``--no-loadscope-reorder``: by default
    xdist would reorder them by their number of tests), each worker taking the next module when it is done: longest
    first, the workers finish close together rather than one idling while the other runs a long module at the end.
    The order within a module and among the other modules is unchanged.
    """

    def is_heavy(item: pytest.Item) -> bool:
        return item.get_closest_marker("slow") is not None or "tiny_simulation" in getattr(item, "fixturenames", ())

    for item in items:
        if "tiny_simulation" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)  # it runs a real simulation: not part of `make check`
    heavy = {item.path for item in items if is_heavy(item)}

    def rank(item: pytest.Item) -> int:
        if item.path.name in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.name)
        return len(LONGEST_FIRST) + (item.path not in heavy)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_simulation(tmp_path_factory: pytest.TempPathFactory) -> SimulationRun:
    """One real 3-node, 2-round simulation (ranks 2, 4, 8; svd rule) shared by the tests that only read it."""
    run = simulate(tmp_path_factory.mktemp("tiny-simulation"), cpus_per_node=1)  # the default: nodes in parallel
    assert run.returncode == 0, run.output[-4000:]
    return run


@pytest.fixture
def seed() -> int:
    """The seed tests use for their own random draws."""
    return 1234
