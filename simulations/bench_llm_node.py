"""``python -m simulations.bench_llm_node``: peak memory and time of one LLM node's round, with and without
gradient checkpointing.

Each measurement runs in a fresh process (peak RSS only grows within one): it loads the preset's model and the node's
data, then trains one round (``local-steps`` at the preset's batch size and length) through the node path of
:mod:`client.node`, as a simulated or deployed node would. Printed: peak RSS after loading and after the round, and
the round's seconds; written to ``docs/results/llm-node-memory.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from simulations.compare import EXPERIMENTS
from simulations.launcher import PROJECT_DIR


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(preset: str, checkpointing: bool, settings: Sequence[str]) -> dict[str, float]:
    """One node's round in this process: peak RSS after the load and after training, and the seconds."""
    from client.node import train_node
    from client.node_settings import NodeSettings
    from client.task_types import task_type_for
    from common.config import RunConfig
    from common.updates import Instruction
    from simulations.simulate import merged_config, parse_set, read_overlay

    overlay = read_overlay(EXPERIMENTS / f"{preset}.toml")
    merged, nodes = merged_config(overlay, {**parse_set(settings), "gradient-checkpointing": checkpointing})
    cfg = RunConfig.from_mapping(merged)
    node = NodeSettings(max(cfg.lora.node_ranks), cfg.model, cfg.task, 0, nodes or 1, "node-0")
    task = task_type_for(cfg.task)
    task.model(cfg, node)
    task.data(cfg, node)
    loaded = peak_rss_mib()
    started = time.perf_counter()
    train_node(cfg, node, Instruction(server_round=1, rank=node.rank, scaling=1.0, adapter=None))
    return {"rank": node.rank, "load_mib": loaded, "peak_mib": peak_rss_mib(), "seconds": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both settings in fresh processes; print and write the table."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_llm_node", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llm-friends")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=PROJECT_DIR / "docs" / "results")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.preset, args.one == "on", args.set)))
        return 0
    rows = {}
    for mode in ("off", "on"):
        command = [sys.executable, "-m", "simulations.bench_llm_node", "--preset", args.preset, "--one", mode]
        command += [part for item in args.set for part in ("--set", item)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=PROJECT_DIR)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"gradient checkpointing {mode}: {rows[mode]}", flush=True)
    write_report(args, rows)
    return 0


def write_report(args: argparse.Namespace, rows: dict[str, dict[str, float]]) -> None:
    """``llm-node-memory.md``: the table and the command."""
    from simulations.compare_report import commit, machine

    lines = [
        f"# One {args.preset} node: peak memory and time of a round",
        "",
        f"- Command: `python -m simulations.bench_llm_node --preset {args.preset}"
        + "".join(f" --set {s}" for s in args.set)
        + f"`. Machine: {machine()}. Commit: {commit()}.",
        f"- The node at the preset's largest rank ({rows['off']['rank']:.0f}) trains one round (its local steps, batch"
        " size and max-length) in a fresh process, float32 on the CPU.",
        "",
        "| gradient checkpointing | peak RSS after loading (MiB) | peak RSS after the round (MiB) | round (s) |",
        "|---|---:|---:|---:|",
    ]
    for mode, row in rows.items():
        lines.append(f"| {mode} | {row['load_mib']:.0f} | {row['peak_mib']:.0f} | {row['seconds']:.1f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "llm-node-memory.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
