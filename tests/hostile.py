"""Real simulations in which chosen nodes misbehave: the real ServerApp against fedlora's ClientApp wrapped by
``tests/hostile_clientapp.py`` (which the product never ships)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import TINY_SETTINGS, SimulationRun

from server.flwr_cli import staged_app
from simulations.launcher import PROJECT_DIR, run_simulation

WRAPPER = Path(__file__).with_name("hostile_clientapp.py")
MODULE = "hostile_clientapp"


@contextmanager
def hostile_app(plan: dict[str, dict[str, Any]]) -> Iterator[Path]:
    """A staged copy of the app whose ClientApp is the wrapper, with ``plan`` in it."""
    with staged_app(PROJECT_DIR) as app:
        source = WRAPPER.read_text(encoding="utf-8")
        source, count = re.subn(r"^PLAN: .*$", f"PLAN: dict[str, dict[str, Any]] = {plan!r}", source, flags=re.M)
        assert count == 1, "the wrapper's PLAN line moved"
        (app / f"{MODULE}.py").write_text(source, encoding="utf-8")
        pyproject = app / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8")
        assert 'clientapp = "client.client_app:app"' in text
        pyproject.write_text(text.replace("client.client_app:app", f"{MODULE}:app"), encoding="utf-8")
        yield app


def simulate_hostile(tmp: Path, plan: dict[str, dict[str, Any]], nodes: int = 3, **overrides: Any) -> SimulationRun:
    """A real simulation of the tiny task into ``tmp`` with the nodes of ``plan`` misbehaving."""
    from common.config import RunConfig

    settings = {**TINY_SETTINGS, **overrides, "audit-dir": str(tmp / "audit")}
    settings.update({"out-dir": str(tmp / "run"), "store": str(tmp / "fedlora.db")})
    run_config = RunConfig.from_mapping(settings).to_mapping()
    lines: list[str] = []
    with hostile_app(plan) as app:
        outcome = run_simulation(run_config, nodes, tmp / "run", lines.append, cpus_per_node=2, app_dir=app)
    code = 0 if outcome.ok else 1
    return SimulationRun(tmp / "run", tmp / "fedlora.db", tmp / "audit", code, "\n".join(lines))


def train_replies(run: SimulationRun, server_round: int) -> dict[str, dict[str, Any]]:
    """What each node sent in a round's train reply, as the audit mod saved it (node name → flat content)."""
    import numpy as np

    out = {}
    for path in sorted(run.audit_dir.glob(f"*-round{server_round}.npz")):
        with np.load(path) as saved:
            out[path.name.rsplit("-round", 1)[0]] = {k: saved[k] for k in saved.files}
    return out


def log_lines(run: SimulationRun) -> list[str]:
    """The coordinator's log of the run (Flower's log file)."""
    return (run.out_dir / "flwr.log").read_text(encoding="utf-8").splitlines()


def metrics(run: SimulationRun) -> list[dict[str, Any]]:
    """metrics.json of the run."""
    return list(json.loads((run.out_dir / "metrics.json").read_text(encoding="utf-8")))
