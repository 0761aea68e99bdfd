"""How one cell of the matrix runs: a Flower simulation, in-process rounds, or a baseline; and CLI helpers.

Federated cells run either as real Flower simulations of this checkout (``python -m simulations.cli simulate`` in
a subprocess, so the cell uses exactly these files) or as in-process rounds (``simulations.inprocess``) with the
same node and aggregation code. Baselines run in this process with the nodes' public functions.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from simulations.launcher import PROJECT_DIR
from simulations.simulate import merged_config

BASELINES = ("centralized", "local")
"""The non-federated methods of the matrix (every other method is a rule, :data:`common.rules.registry.RULE_NAMES`, or
one of its :data:`VARIANTS`)."""
VARIANTS: dict[str, dict[str, Any]] = {"svd-plain": {"rule": "svd", "keep-residual": False}}
"""Federated methods that are a rule with settings: ``svd-plain`` is FlexLoRA's plain average (no keep-residual)."""


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: a method (rule or baseline) on one rank setting, data split and seed."""

    method: str
    ranks: str
    data: str
    seed: int

    @property
    def name(self) -> str:
        """Folder name, e.g. ``svd-heterogeneous-dirichlet-s0``."""
        return f"{self.method}-{self.ranks}-{self.data}-s{self.seed}"

    @property
    def kind(self) -> str:
        """``federated``, ``centralized`` or ``local`` (what runs it, and whose times predict its duration)."""
        return self.method if self.method in BASELINES else "federated"


def say(line: str) -> None:
    """Print one progress line now (output may be a pipe)."""
    print(line, flush=True)


def format_duration(seconds: float | None) -> str:
    """``1 h 05 min``, ``4 min 10 s``, ``12 s`` or ``unknown``."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def quiet_warnings() -> None:
    """Silence a transformers deprecation warning that peft triggers on every model build (pure noise here)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def set_threads(threads: int) -> None:
    """Use ``threads`` torch threads here and in every process started from here (Flower's node processes)."""
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def resolved(overlay: dict[str, Any], out_dir: Path) -> tuple[Any, int]:
    """The typed RunConfig and node count of an overlay (as ``fedlora simulate`` would resolve them)."""
    from common.config import RunConfig

    merged, num_nodes = merged_config(overlay, {})
    merged["out-dir"] = str(out_dir.resolve())
    cfg = RunConfig.from_mapping(merged)
    return cfg, num_nodes if num_nodes is not None else len(cfg.lora.node_ranks)


def run_federated(overlay: dict[str, Any], cell_dir: Path, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """A real Flower simulation of this checkout (``python -m simulations.cli simulate``); its per-round rows."""
    config = cell_dir / "overlay.toml"
    config.write_text(tomli_w.dumps(overlay), encoding="utf-8")
    run_dir = cell_dir / "run"
    command = [
        sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config),
        "--out", str(run_dir), "--store", str(cell_dir / "fedlora.db"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")])}
    with (cell_dir / "simulate.log").open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            command, cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            echo(line.rstrip("\n"))
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"fedlora simulate exited with {code}; see {cell_dir / 'simulate.log'}")
    rows: list[dict[str, Any]] = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return rows


def run_inprocess(overlay: dict[str, Any], cell_dir: Path, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """The same federated rounds without Flower (``simulations.inprocess``): real node code and aggregation."""
    from client.global_eval import GlobalEvaluator
    from client.node import evaluate_node, train_node
    from simulations.inprocess import RoundResult, run_rounds, simulated_nodes

    cfg, num_nodes = resolved(overlay, cell_dir / "run")
    started = time.time()

    def progress(result: RoundResult) -> None:
        accuracy = result.weighted("eval-accuracy")
        elapsed = time.time() - started
        echo(f"in-process | round {result.round}/{cfg.num_rounds} | accuracy {accuracy:.3f} | {elapsed:.0f} s")

    evaluator = GlobalEvaluator.from_config(cfg)
    results = run_rounds(
        cfg, simulated_nodes(cfg, num_nodes), train_node, evaluate_node, on_round=progress, evaluator=evaluator
    )
    return [
        {
            "round": r.round,
            **{k.replace("-", "_"): v for k, v in r.global_metrics.items()},
            "eval_accuracy": r.weighted("eval-accuracy"),
            "eval_loss": r.weighted("eval-loss"),
            "bytes_up_per_node": int(statistics.fmean(r.bytes_up_per_node)) if r.bytes_up_per_node else 0,
            "aggregation_seconds": round(r.aggregation_seconds, 6),
            "round_seconds": round(r.seconds, 3),
            **_largest_epsilon(r.train_metrics),
        }
        for r in results
    ]


def _largest_epsilon(train_metrics: list[dict[str, float]]) -> dict[str, float]:
    """``{"epsilon": ε}``, the largest cumulative ε a node reported in the round (local DP), or nothing."""
    spent = [float(m["epsilon"]) for m in train_metrics if "epsilon" in m]
    return {"epsilon": max(spent)} if spent else {}


def run_centralized_cell(overlay: dict[str, Any], cell_dir: Path) -> list[dict[str, Any]]:
    """One LoRA on the pooled data with the federated run's total steps (``simulations.centralized``)."""
    from simulations.centralized import run_centralized

    cfg, nodes = resolved(overlay, cell_dir / "run")
    return run_centralized(cfg, nodes, cell_dir / "run")


def run_local_cell(overlay: dict[str, Any], cell_dir: Path, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each node alone: the federated node recipe without aggregation; node metrics averaged per round."""
    from client.global_eval import GlobalEvaluator
    from client.node import evaluate_node, node_info, train_node
    from common.updates import AdapterFactors, weighted_metric
    from server.engine import make_instruction
    from simulations.inprocess import simulated_nodes

    cfg, num_nodes = resolved(overlay, cell_dir / "run")
    nodes = simulated_nodes(cfg, num_nodes)
    evaluator = GlobalEvaluator.from_config(cfg)
    own: dict[int, AdapterFactors] = {}
    rows: list[dict[str, Any]] = []
    started = time.time()
    for rnd in range(cfg.num_rounds + 1):
        evaluations = []
        for node in nodes:
            info = node_info(cfg, node)
            if rnd > 0:
                ins = make_instruction(rnd, info, own.get(node.partition_id), freeze_lora_A=False)
                own[node.partition_id] = train_node(cfg, node, ins).adapter
            ins = make_instruction(rnd, info, own.get(node.partition_id), freeze_lora_A=False)
            evaluations.append(evaluate_node(cfg, node, ins))
        row = {
            "round": rnd,
            **local_global_metrics(evaluator, own, nodes, rnd, cfg.num_rounds),
            "eval_accuracy": weighted_metric(evaluations, "eval-accuracy"),
            "eval_loss": weighted_metric(evaluations, "eval-loss"),
            "eval_accuracy_node_mean": statistics.fmean(e.metrics["eval-accuracy"] for e in evaluations),
            "seconds": round(time.time() - started, 1),
        }
        rows.append(row)
        echo(
            f"local-only | round {rnd}/{cfg.num_rounds} | accuracy {row['eval_accuracy']:.3f} | {row['seconds']:.0f} s"
        )
    return rows


def local_global_metrics(
    evaluator: Any, own: dict[int, Any], nodes: Sequence[Any], rnd: int, rounds: int
) -> dict[str, float]:
    """Local-only training on the run's fixed held-out set: every node's own adapter, averaged over nodes, in round 0
    (the untrained model, the same for all) and the last round (each evaluation costs a global evaluation)."""
    if evaluator is None or rnd not in (0, rounds):
        return {}
    if rnd == 0:
        metrics = [evaluator(None, nodes[0].rank)]
    else:
        metrics = [evaluator(own[node.partition_id], node.rank) for node in nodes]
    keys = sorted(set(metrics[0]) - {"global-examples"})
    return {k.replace("-", "_"): statistics.fmean(m[k] for m in metrics) for k in keys}


def run_cell(
    cell: Cell, overlay: dict[str, Any], cell_dir: Path, echo: Callable[[str], None], engine: str = "flower"
) -> list[dict[str, Any]]:
    """Run one cell from scratch (a half-finished earlier attempt is discarded) and return its per-round rows."""
    import shutil

    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    if cell.kind == "federated":
        return run_federated(overlay, cell_dir, echo) if engine == "flower" else run_inprocess(overlay, cell_dir, echo)
    if cell.kind == "centralized":
        return run_centralized_cell(overlay, cell_dir)
    return run_local_cell(overlay, cell_dir, echo)
