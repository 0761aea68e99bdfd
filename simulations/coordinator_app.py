"""The fedlora ServerApp: the coordinator's rounds (``server/``), with the global evaluation of the exported adapter.

It lives in the top layer because it composes the two below: the coordinator's round engine from ``server/`` and,
for the global evaluation, the task's model and data code from ``client/`` (the coordinator loads the base model
and evaluates the adapter a user would export on the run's fixed held-out set, see :mod:`client.global_eval`).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.global_eval import GlobalEvaluator
from common.config import RunConfig
from server.coordinator import run_coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The whole run; the global evaluation when the task has a fixed held-out set."""
    cfg = RunConfig.from_mapping(context.run_config)
    run_coordinator(grid, context, cfg, GlobalEvaluator.from_config(cfg))
