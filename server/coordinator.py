"""The coordinator's whole run, Flower-facing: parse the run config once, run Flower's round loop with the LoRA
strategy (or the SecAgg+ path), export. The ServerApp that calls it (``simulations/coordinator_app.py``) adds the
global evaluation, which needs the task's model code from ``client/``."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid

from common.config import RunConfig
from server.engine import GlobalEvaluation
from server.lifecycle import close_run, open_run
from server.prompt_grid import PromptGrid
from server.secure import run_secure


def run_coordinator(grid: Grid, context: Context, cfg: RunConfig, evaluator: GlobalEvaluation | None = None) -> None:
    """Round 0 evaluation, ``num-rounds`` federated rounds (or the rest of them on resume), then the adapter."""
    grid = PromptGrid(grid)  # replies collected as they arrive, not on Flower's 3-second beat
    if cfg.secagg.enabled:  # SecAgg+ lives on Flower's legacy workflow path
        run_secure(grid, context, cfg, evaluator)
        return
    strategy, recorder = open_run(grid, context, cfg, evaluator)
    try:
        remaining = cfg.num_rounds - strategy.engine.round_offset
        if remaining > 0:
            strategy.start(grid, ArrayRecord(), num_rounds=remaining, timeout=cfg.reliability.round_timeout)
    except BaseException as err:
        recorder.finish(None, 0, status="failed", reason=f"{type(err).__name__}: {err}")
        raise
    close_run(strategy, recorder, cfg)
