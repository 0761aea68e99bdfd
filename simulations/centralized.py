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
    per_round = max(1, math.ceil(cfg.fraction_train * nodes)) * cfg.local_steps
    return per_round, per_round * cfg.num_rounds


def run_centralized(cfg: RunConfig, nodes: int, out_dir: Path) -> list[dict[str, Any]]:
    """Train on the pooled data, evaluate after every round-equivalent, write the outputs; return the rows."""
    # Imported here so that `fedlora --help` and input errors do not pay for torch and transformers.
    from client.data import pooled_data, tokenize
    from client.model import attach_lora, get_adapter, load_classifier, resolve_model
    from client.node import lora_settings
    from client.train import TrainSettings, evaluate, pick_device, train
    from server.export import plot_metrics, save_peft_adapter, write_json_atomic, write_metrics

    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "config.json", {"mode": "centralized", "num-nodes": nodes, **cfg.to_mapping()})
    data = pooled_data(cfg, cfg.task, nodes)
    base, tokenizer = load_classifier(resolve_model(cfg.model), data.num_labels, cfg.seed)
    settings = lora_settings(cfg, max(cfg.node_ranks[:nodes] or cfg.node_ranks), base)
    model = attach_lora(base, settings)
    train_batch = tokenize(tokenizer, data.train, cfg.max_length)
    test_batch = tokenize(tokenizer, data.test, cfg.max_length)
    device = pick_device()
    per_round, steps = total_steps(cfg, nodes)
    rows: list[dict[str, Any]] = []

    def record(step: int, train_loss: float | None) -> None:
        result = evaluate(model, test_batch, max(cfg.batch_size, 32), device)
        row = {
            "round": step // per_round,
            "step": step,
            "eval_accuracy": result.accuracy,
            "eval_loss": result.loss,
            "train_loss": train_loss,
            "seconds": round(time.time() - started, 1),
        }
        rows.append(row)
        write_metrics(rows, out_dir)
        print(
            f"centralized | step {step}/{steps} | accuracy {result.accuracy:.3f} | {row['seconds']:.0f} s", flush=True
        )

    record(0, None)
    schedule = dataclasses.replace(
        TrainSettings.from_config(cfg, steps, cfg.seed), learning_rate=cfg.baseline_learning_rate
    )
    train(model, train_batch, schedule, device, every=per_round, callback=record)
    save_peft_adapter(out_dir / "adapter", get_adapter(model), settings.rank, cfg, cfg.model)
    plot_metrics(rows, out_dir / "metrics.png", f"centralized LoRA r={settings.rank}")
    lines = [
        f"centralized LoRA r={settings.rank} on the pooled data of {nodes} nodes, {steps} steps",
        f"round-0 accuracy: {rows[0]['eval_accuracy']:.4f}",
        f"final accuracy:   {rows[-1]['eval_accuracy']:.4f}",
        f"wall time: {time.time() - started:.0f} s",
    ]
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def centralized(args: argparse.Namespace) -> int:
    """``fedlora centralized``."""
    cfg, _, nodes = resolve_run(args)
    rows = run_centralized(cfg, nodes, Path(cfg.out_dir))
    print((Path(cfg.out_dir) / "summary.txt").read_text(encoding="utf-8"), end="")
    return 0 if rows else 1


def add_parser(subparsers: Any) -> None:
    """Register ``centralized``."""
    parser = subparsers.add_parser("centralized", help="train one LoRA on the pooled data (baseline)")
    add_run_flags(parser)
    parser.add_argument("--nodes", type=int, help="pool the shares of this many nodes (default: as simulate)")
    parser.set_defaults(handler=centralized)
