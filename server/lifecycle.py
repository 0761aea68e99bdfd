"""How a coordinator run starts and ends, on either path (Message API or SecAgg+): fresh or resumed, then exported."""

from __future__ import annotations

import json
import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.supercore import log

from common.atomic_file import write_json_atomic
from common.config import RunConfig
from server.checkpoint import load_latest_checkpoint
from server.engine import GlobalEvaluation
from server.recorder import RunRecorder
from server.strategy import LoRAStrategy


def output_dir(cfg: RunConfig) -> Path:
    """``out-dir`` from the config, or ``runs/<timestamp>``."""
    return Path(cfg.output.out_dir or time.strftime("runs/%Y%m%d-%H%M%S")).resolve()


def store_path(cfg: RunConfig, out_dir: Path) -> Path:
    """The SQLite run store: ``store`` from the config, or ``fedlora.db`` next to the run folder."""
    return Path(cfg.output.store).resolve() if cfg.output.store else out_dir.parent / "fedlora.db"


def open_run(
    grid: Grid, context: Context, cfg: RunConfig, evaluator: GlobalEvaluation | None = None
) -> tuple[LoRAStrategy, RunRecorder]:
    """The strategy and recorder of a run: restored from the last checkpoint on resume, else after round 0.

    ``evaluator`` evaluates the exported adapter on the run's fixed held-out set after every round (optional).
    """
    out_dir = output_dir(cfg)
    checkpoint = load_latest_checkpoint(out_dir / "checkpoints", required=True) if cfg.reliability.resume else None
    run_id = _previous_run_id(out_dir) if checkpoint else str(context.run_id)
    recorder = RunRecorder(cfg, out_dir, run_id, store_path(cfg, out_dir), resume=checkpoint is not None)
    strategy = LoRAStrategy(cfg, recorder, evaluator=evaluator)
    if evaluator is not None:
        write_json_atomic(out_dir / GLOBAL_SET_FILE, evaluator.description)
    if checkpoint is not None:
        strategy.engine.restore(checkpoint.server_round, checkpoint.arrays, checkpoint.meta)
        recorder.rows = list(checkpoint.meta.get("metrics", []))
        log(INFO, "fedlora | resuming %s after round %d", out_dir, checkpoint.server_round)
    else:
        strategy.evaluate_round_zero(grid)
    return strategy, recorder


GLOBAL_SET_FILE = "global_eval_set.json"
"""Where a run says which examples its global metrics come from."""


class NothingTrained(RuntimeError):
    """Every round of the run was skipped: there is no adapter to hand out, and the run must not look completed."""


def close_run(strategy: LoRAStrategy, recorder: RunRecorder, cfg: RunConfig) -> None:
    """Export the global adapter at the largest node rank and write the final outputs.

    A run in which no round aggregated anything ends ``failed`` (in the store, the summary and Flower's status,
    through :class:`NothingTrained`), with the reason of its last skipped round.
    """
    engine = strategy.engine
    if engine.global_adapter.empty:
        skipped = [str(row.get("skipped") or "") for row in recorder.rows if row.get("round", 0) > 0]
        reason = f"no round aggregated an update (last: {skipped[-1] or 'no round ran'})" if skipped else "no round ran"
        recorder.finish(None, 0, status="failed", reason=reason)
        log(ERROR, "fedlora | run failed: %s", reason)
        raise NothingTrained(f"the run trained nothing: {reason}")
    rank = max(engine.ranks, default=1)
    adapter = engine.global_adapter.export(rank, cfg.lora.lora_alpha, cfg.lora.use_rslora)
    evaluator = engine.evaluator
    path = recorder.finish(adapter, rank, base_model=evaluator.base_model if evaluator is not None else cfg.model)
    log(INFO, "fedlora | done: outputs in %s, adapter %s", recorder.out_dir, path)


def _previous_run_id(out_dir: Path) -> str:
    config = out_dir / "config.json"
    return str(json.loads(config.read_text(encoding="utf-8")).get("run-id")) if config.is_file() else out_dir.name
