"""Everything a run leaves behind: metrics files, checkpoints, the run store, the plot and the PEFT adapter."""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.supercore import log

from common.atomic_file import write_json_atomic
from common.config import RunConfig
from common.updates import AdapterFactors, NodeInfo
from server.checkpoint import prune_checkpoints, save_checkpoint
from server.engine import RoundOutcome
from server.export import plot_metrics, save_peft_adapter, write_metrics
from server.run_lock import RunLock
from server.run_store import RoundRecord, RunStore


def mean_energy(diagnostics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Average each diagnostic over modules (one number per rank for the CSV)."""
    keys = sorted({k for row in diagnostics.values() for k in row})
    return {k: float(np.mean([row[k] for row in diagnostics.values() if k in row])) for k in keys}


class RunRecorder:
    """Writes a run's outputs under ``out_dir`` and its rows into the SQLite run store."""

    def __init__(self, cfg: RunConfig, out_dir: Path, run_id: str, store_path: Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.run_id = run_id
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()
        self.lock = RunLock(out_dir, f"the coordinator of run {run_id}").acquire()
        """Held until :meth:`finish` (or this process's end): no second writer in ``out_dir`` meanwhile."""
        write_json_atomic(out_dir / "config.json", {"run-id": run_id, **cfg.to_mapping()})
        self.store = RunStore(store_path)
        self.store.start_run(
            run_id, cfg.to_mapping(), rounds_planned=cfg.num_rounds, out_dir=str(out_dir.resolve()), resume=resume
        )

    @property
    def checkpoint_dir(self) -> Path:
        """Where the per-round checkpoints go."""
        return self.out_dir / "checkpoints"

    def node_seen(self, node_id: int, info: NodeInfo, server_round: int) -> None:
        """Record a node (rank, device, name) in the run store."""
        self.store.upsert_node(self.run_id, node_id, info.rank, info.device, info.name, server_round)

    def record_round(self, entry: RoundOutcome, state: tuple[dict[str, np.ndarray], dict[str, Any]]) -> None:
        """Append the round's row, rewrite the metrics files, checkpoint ``state`` (arrays, JSON metadata), and commit
        the round and the nodes heard from to the store."""
        for node_id, info, server_round in entry.nodes_seen:
            self.node_seen(node_id, info, server_round)
        row: dict[str, Any] = {
            "round": entry.round,
            "eval_accuracy": entry.metrics.get("eval-accuracy"),
            "eval_loss": entry.metrics.get("eval-loss"),
            **({"eval_perplexity": entry.metrics["eval-perplexity"]} if "eval-perplexity" in entry.metrics else {}),
            "train_loss": entry.metrics.get("train-loss"),
            "participants": len(entry.participants),
            "rejected": len(entry.rejected),
            "bytes_down": sum(entry.bytes_down.values()),
            "bytes_up": sum(entry.bytes_up.values()),
            "bytes_up_per_node": int(np.mean(list(entry.bytes_up.values()))) if entry.bytes_up else 0,
            "aggregation_seconds": round(entry.aggregation_seconds, 6),
            "round_seconds": round(time.time() - entry.started, 3),
            "epsilon": entry.epsilon,
            "skipped": entry.skipped or "",
            "rank_warning": entry.warning,
            **{k.replace("-", "_"): v for k, v in entry.metrics.items() if k.startswith("global-")},
            "global_eval_seconds": round(entry.global_eval_seconds, 3),
            **{f"mean_{k}": round(v, 6) for k, v in mean_energy(entry.diagnostics).items()},
        }
        self.rows = [r for r in self.rows if r["round"] < entry.round] + [row]
        write_metrics(self.rows, self.out_dir)
        checkpoint = None
        if entry.round > 0:
            arrays, meta = state
            meta = {**meta, "metrics": self.rows}
            checkpoint = save_checkpoint(self.checkpoint_dir, entry.round, arrays, meta)
            prune_checkpoints(self.checkpoint_dir, self.cfg.reliability.keep_checkpoints)
        self.store.record_round(self.run_id, _store_record(entry, checkpoint))
        self._progress(row)

    def _progress(self, row: dict[str, Any]) -> None:
        accuracy, perplexity = row["eval_accuracy"], row.get("eval_perplexity")
        parts = [
            f"round {row['round']}/{self.cfg.num_rounds}",
            f"perplexity {perplexity:.2f}" if perplexity is not None else "",
            f"accuracy {accuracy:.3f}" if accuracy is not None else ("" if perplexity is not None else "accuracy n/a"),
            f"train loss {row['train_loss']:.3f}" if row["train_loss"] is not None else "",
            f"up {row['bytes_up'] / 1e6:.2f} MB" if row["bytes_up"] else "",
            f"{row['rejected']} rejected" if row["rejected"] else "",
            f"skipped: {row['skipped']}" if row["skipped"] else "",
            f"{time.time() - self.started:.0f} s",
        ]
        log(INFO, "fedlora | %s", " | ".join(p for p in parts if p))

    def finish(
        self,
        adapter: AdapterFactors | None,
        rank: int,
        status: str = "completed",
        reason: str = "",
        base_model: str | None = None,
    ) -> Path | None:
        """Export the adapter (PEFT folder), the plot and the summary; mark the run finished in the store; let go of
        the run folder. ``reason`` says why a run that did not complete ended as it did; ``base_model`` is what the
        adapter names as its base (a folder stock transformers loads; default: the run's ``model``)."""
        try:
            adapter_path = None
            if adapter is not None:
                adapter_path = save_peft_adapter(
                    self.out_dir / "adapter", adapter, rank, self.cfg, base_model or self.cfg.model
                )
            if self.rows:
                plot_metrics(self.rows, self.out_dir / "metrics.png", f"fedlora · rule {self.cfg.rule}")
            self._summary(adapter_path, rank, status, reason)
            self.store.finish_run(self.run_id, status, str(adapter_path.resolve()) if adapter_path else None)
            return adapter_path
        finally:
            self.lock.release()

    def _summary(self, adapter_path: Path | None, rank: int, status: str, reason: str) -> None:
        final = self.rows[-1] if self.rows else {}
        first = self.rows[0] if self.rows else {}
        lines = [
            f"status: {status}" + (f": {reason}" if reason else ""),
            f"rule: {self.cfg.rule}    rounds: {final.get('round', 0)}",
            f"model: {self.cfg.model}    task: {self.cfg.task}",
            *global_lines(first, final, rank),
            _nodes_line(first, final),
            f"nodes' mean eval loss: round 0 {_fmt(first.get('eval_loss'))}, final {_fmt(final.get('eval_loss'))}",
            f"bytes up (all rounds):   {sum(r['bytes_up'] for r in self.rows):,}",
            f"bytes down (all rounds): {sum(r['bytes_down'] for r in self.rows):,}",
            f"wall time: {time.time() - self.started:.0f} s",
            f"adapter: {adapter_path} (rank {rank})" if adapter_path else "adapter: none (no round completed)",
        ]
        (self.out_dir / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def global_lines(first: dict[str, Any], final: dict[str, Any], rank: int) -> list[str]:
    """The global metrics (the exported adapter on the fixed held-out set), round 0 and final, when there are any."""
    if "global_examples" not in final:
        return ["global evaluation: none (global-eval-examples is 0, or there is no fixed held-out set)"]
    lines = [
        f"global evaluation: the exported adapter (rank {rank}) on {final['global_examples']:.0f} held-out examples"
    ]
    for name in ("accuracy", "perplexity", "loss"):
        key = f"global_{name}"
        if key in final:
            lines.append(f"global {name}: round 0 {_fmt(first.get(key))}, final {_fmt(final.get(key))}")
    return lines


def _nodes_line(first: dict[str, Any], final: dict[str, Any]) -> str:
    """The nodes' own evaluation: pooled perplexity (causal LM) or mean accuracy (classification)."""
    if "eval_perplexity" in final:
        name, key = "perplexity (pooled over their held-out tokens)", "eval_perplexity"
    else:
        name, key = "mean accuracy", "eval_accuracy"
    return (
        f"nodes' {name}, each node at its own rank on its own held-out share: round 0 {_fmt(first.get(key))}, "
        f"final {_fmt(final.get(key))}"
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "n/a"


def _store_record(entry: RoundOutcome, checkpoint: Path | None) -> RoundRecord:
    metrics = {k.replace("-", "_"): v for k, v in entry.metrics.items()}
    if entry.skipped:
        log(WARNING, "round %d recorded as skipped", entry.round)
    return RoundRecord(
        server_round=entry.round,
        metrics=metrics,
        bytes_down=entry.bytes_down,
        bytes_up=entry.bytes_up,
        participants=entry.participants,
        aggregation_seconds=entry.aggregation_seconds,
        diagnostics=entry.diagnostics,
        epsilon=entry.epsilon,
        rejected=entry.rejected,
        checkpoint_path=str(checkpoint.resolve()) if checkpoint else None,
        warning=entry.warning,
    )
