"""The fedlora ServerApp: parse the run config once, run Flower's round loop with the LoRA strategy, export."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.lifecycle import close_run, open_run
from server.secure import run_secure

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Round 0 evaluation, ``num-rounds`` federated rounds (or the rest of them on resume), then the adapter."""
    cfg = RunConfig.from_mapping(context.run_config)
    if cfg.secagg.enabled:  # SecAgg+ lives on Flower's legacy workflow path
        run_secure(grid, context, cfg)
        return
    strategy, recorder = open_run(grid, context, cfg)
    try:
        remaining = cfg.num_rounds - strategy.engine.round_offset
        if remaining > 0:
            strategy.start(grid, ArrayRecord(), num_rounds=remaining, timeout=cfg.reliability.round_timeout)
    except BaseException as err:
        recorder.finish(None, 0, status="failed", reason=f"{type(err).__name__}: {err}")
        raise
    close_run(strategy, recorder, cfg)
