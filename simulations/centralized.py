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
    """Train on the pooled data, evaluate after every round-equivalent, write the outputs; return the rows."""
    # Imported here so that `fedlora --help` and input errors do not pay for torch and transformers.
    from client.data import pooled_data, tokenize
    from client.global_eval import GlobalEvaluator
    from client.model import attach_lora, default_targets, get_adapter, load_classifier, resolve_model
    from client.task_types import lora_settings
    from client.train import TrainSettings, evaluate, pick_device, train
    from common.atomic_file import write_json_atomic
    from server.export import plot_metrics, save_peft_adapter, write_metrics

    started = time.time()
    write_json_atomic(out_dir / "config.json", {"mode": "centralized", "num-nodes": nodes, **cfg.to_mapping()})
    data, evaluator = pooled_data(cfg, cfg.task, nodes), GlobalEvaluator.from_config(cfg)
    base, tokenizer = load_classifier(resolve_model(cfg.model), data.num_labels, cfg.seed)
    rank = max(cfg.lora.node_ranks[:nodes] or cfg.lora.node_ranks)
    settings = lora_settings(cfg, rank, cfg.lora.target_modules or default_targets(base))
    model = attach_lora(base, settings)
    train_batch, test_batch = (tokenize(tokenizer, d, cfg.training.max_length) for d in (data.train, data.test))
    device = pick_device()
    per_round, steps = total_steps(cfg, nodes)
    rows: list[dict[str, Any]] = []

    def record(step: int, train_loss: float | None) -> None:
        result = evaluate(model, test_batch, max(cfg.training.batch_size, 32), device)
        row = {
            "round": step // per_round,
            "step": step,
            **({k.replace("-", "_"): v for k, v in evaluator.evaluate_model(model).items()} if evaluator else {}),
            "eval_accuracy": result.accuracy,
            "eval_loss": result.loss,
            "train_loss": train_loss,
            "seconds": round(time.time() - started, 1),
        }
        rows.append(row)
        write_metrics(rows, out_dir)
        shown = row.get("global_accuracy", result.accuracy)
        print(f"centralized | step {step}/{steps} | accuracy {shown:.3f} | {row['seconds']:.0f} s", flush=True)

    record(0, None)
    schedule = dataclasses.replace(
        TrainSettings.from_config(cfg, steps, cfg.seed), learning_rate=cfg.training.baseline_learning_rate
    )
    train(model, train_batch, schedule, device, every=per_round, callback=record)
    save_peft_adapter(out_dir / "adapter", get_adapter(model), settings.rank, cfg, cfg.model)
    plot_metrics(rows, out_dir / "metrics.png", f"centralized LoRA r={settings.rank}")
    write_summary(
        out_dir, rows, f"centralized LoRA r={settings.rank} on the pooled data of {nodes} nodes, {steps} steps", started
    )
    return rows


def write_summary(out_dir: Path, rows: list[dict[str, Any]], title: str, started: float) -> None:
    """``summary.txt``: what ran, the accuracy before and after (on the global set and on the pooled node shares),
    the wall time."""
    lines = [title]
    if "global_accuracy" in rows[-1]:
        lines.append(
            f"global accuracy ({rows[-1]['global_examples']:.0f} held-out examples, the federated run's set): "
            f"round 0 {rows[0]['global_accuracy']:.4f}, final {rows[-1]['global_accuracy']:.4f}"
        )
    lines += [
        f"pooled held-out shares accuracy: round 0 {rows[0]['eval_accuracy']:.4f}, "
        f"final {rows[-1]['eval_accuracy']:.4f}",
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
