"""``fedlora centralized``: one LoRA on the pooled data of every node, with the same total optimizer steps.

This is the reference a federated run is compared with: the same model, rank (the largest node rank), data
(the union of the nodes' shares) and number of optimizer steps (rounds × nodes per round × local steps), in one
process with one learning-rate schedule. It writes the same outputs as a federated run, with one row per
"round" of equivalent steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from common.config import RunConfig
from simulations.simulate import add_run_flags, resolve_run


def total_steps(cfg: RunConfig, nodes: int) -> tuple[int, int]:
    """(steps per round-equivalent, total steps) matching a federated run of ``nodes`` nodes."""
    per_round = max(1, math.ceil(cfg.reliability.fraction_train * nodes)) * cfg.training.local_steps
    return per_round, per_round * cfg.num_rounds


def run_centralized(cfg: RunConfig, nodes: int, out_dir: Path) -> list[dict[str, Any]]:
    """Train on the pooled data, evaluate after every round-equivalent, write the outputs; return the rows.

    Any task type (:mod:`client.task_types`): a classifier on the pooled shares, or a causal LM on every node's
    lines or chats, with the same model code, data code and metric as the federated nodes.
    """
    # Imported here so that `fedlora --help` and input errors do not pay for torch and transformers.
    from client.global_eval import GlobalEvaluator
    from client.model import get_adapter
    from client.node_settings import NodeSettings
    from client.task_types import CausalLM, concat_batches, task_type_for
    from client.train import TrainSettings, pick_device, train
    from common.atomic_file import write_json_atomic
    from server.export import plot_metrics, save_peft_adapter, write_metrics

    started = time.time()
    write_json_atomic(out_dir / "config.json", {"mode": "centralized", "num-nodes": nodes, **cfg.to_mapping()})
    task, evaluator = task_type_for(cfg.task), GlobalEvaluator.from_config(cfg)
    rank = max(cfg.lora.node_ranks[:nodes] or cfg.lora.node_ranks)
    node = NodeSettings(rank, cfg.model, cfg.task, 0, nodes, "centralized")
    model, settings = task.model(cfg, node)
    shares = [task.data(cfg, dataclasses.replace(node, partition_id=i)) for i in range(nodes)]
    train_batch, test_batch = concat_batches([s.train for s in shares]), concat_batches([s.test for s in shares])
    device = pick_device()
    per_round, steps = total_steps(cfg, nodes)
    rows: list[dict[str, Any]] = []

    def record(step: int, train_loss: float | None) -> None:
        _, metrics = task.evaluate(model, test_batch, cfg, device)
        row = {
            "round": step // per_round,
            "step": step,
            **({k.replace("-", "_"): v for k, v in evaluator.evaluate_model(model).items()} if evaluator else {}),
            **{k.replace("-", "_"): v for k, v in metrics.items()},
            "train_loss": train_loss,
            "seconds": round(time.time() - started, 1),
        }
        rows.append(row)
        write_metrics(rows, out_dir)
        name = "perplexity" if "eval_perplexity" in row else "accuracy"
        shown = row.get(f"global_{name}", row[f"eval_{name}"])
        print(f"centralized | step {step}/{steps} | {name} {shown:.3f} | {row['seconds']:.0f} s", flush=True)

    record(0, None)
    schedule = dataclasses.replace(
        TrainSettings.from_config(cfg, steps, cfg.seed), learning_rate=cfg.training.baseline_learning_rate
    )
    causal = isinstance(task, CausalLM)
    train(model, train_batch, schedule, device, every=per_round, callback=record, bf16_on_cuda=causal)
    base_model = evaluator.base_model if evaluator else cfg.model
    save_peft_adapter(out_dir / "adapter", get_adapter(model), settings.rank, cfg, base_model)
    plot_metrics(rows, out_dir / "metrics.png", f"centralized LoRA r={settings.rank}")
    write_summary(
        out_dir, rows, f"centralized LoRA r={settings.rank} on the pooled data of {nodes} nodes, {steps} steps", started
    )
    return rows


def write_summary(out_dir: Path, rows: list[dict[str, Any]], title: str, started: float) -> None:
    """``summary.txt``: what ran, the accuracy before and after (on the global set and on the pooled node shares),
    the wall time."""
    lines = [title]
    name = "perplexity" if "eval_perplexity" in rows[-1] else "accuracy"
    if f"global_{name}" in rows[-1]:
        lines.append(
            f"global {name} ({rows[-1]['global_examples']:.0f} held-out examples, the federated run's set): "
            f"round 0 {rows[0][f'global_{name}']:.4f}, final {rows[-1][f'global_{name}']:.4f}"
        )
    lines += [
        f"pooled held-out shares {name}: round 0 {rows[0][f'eval_{name}']:.4f}, final {rows[-1][f'eval_{name}']:.4f}",
        f"wall time: {time.time() - started:.0f} s",
    ]
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def centralized(args: argparse.Namespace) -> int:
    """``fedlora centralized``."""
    cfg, _, nodes = resolve_run(args)
    rows = run_centralized(cfg, nodes, Path(cfg.output.out_dir))
    print((Path(cfg.output.out_dir) / "summary.txt").read_text(encoding="utf-8"), end="")
    return 0 if rows else 1


def add_parser(subparsers: Any) -> None:
    """Register ``centralized``."""
    parser = subparsers.add_parser("centralized", help="train one LoRA on the pooled data (baseline)")
    add_run_flags(parser)
    parser.add_argument("--nodes", type=int, help="pool the shares of this many nodes (default: as simulate)")
    parser.set_defaults(handler=centralized)
