"""``python -m simulations.bench_comm``: what travels, what aggregation costs, and what the simulation adds.

1. **Bytes per node per round** for each rank: the node's factors and head, float32, in each direction (a bf16
   transport halves them), against the bytes of the full model (float32 parameters), for MiniLM-L6 (the default
   task) and SmolLM2-135M (the LLM preset). Computed from the models' real module shapes.
2. **Aggregation time per round** of each rule with those shapes and the heterogeneous ranks (2…32, 8 nodes),
   through the coordinator's ``GlobalAdapter.aggregate`` (median of a few repetitions).
3. **A measured run** at a small scale: a real Flower simulation (bytes per node and aggregation seconds as
   recorded by the coordinator, wall time), the same rounds in one process with float32 and with bf16 transport
   (the accuracy difference), and the same number of optimizer steps back to back in one process.
   Simulation overhead ratio = Flower wall time / back-to-back steps time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.compare import cell_overlay
from simulations.compare_cells import Cell, quiet_warnings, resolved, run_federated, say, set_threads
from simulations.launcher import PROJECT_DIR
from simulations.simulate import parse_set

HETEROGENEOUS = (2, 4, 4, 8, 8, 16, 16, 32)
MiB = 1024 * 1024


def model_shapes(name: str) -> tuple[dict[str, tuple[int, int]], int, int]:
    """(LoRA target module → (out, in), head parameters, all parameters) of a preset, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    targets: tuple[str, ...]
    if name == "smollm2":
        from client.causal_lm import CAUSAL_TARGETS, SMOLLM2_DISTRIBUTION, SMOLLM2_GGUF
        from client.tasks import packaged_file

        gguf = packaged_file(SMOLLM2_DISTRIBUTION, SMOLLM2_GGUF)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        targets, head = CAUSAL_TARGETS, 0
    else:
        from client.model import DEFAULT_TARGETS, resolve_model

        config = AutoConfig.from_pretrained(resolve_model(name), num_labels=20)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        targets = DEFAULT_TARGETS[config.model_type]
        head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("classifier", "score")))
    shapes = {
        n: (int(m.out_features), int(m.in_features))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    }
    return shapes, int(head), int(sum(p.numel() for p in model.parameters()))


def bytes_table(name: str, ranks: Sequence[int]) -> dict[str, Any]:
    """Bytes per node per round (each direction) at each rank, float32 and bf16, against the full model."""
    shapes, head, total = model_shapes(name)
    per_rank = {r: (r * sum(o + i for o, i in shapes.values()) + head) for r in sorted(set(ranks))}
    return {
        "model": name,
        "modules": len(shapes),
        "full_model_bytes": total * 4,
        "values_per_rank": per_rank,
        "rows": [
            {"rank": r, "fp32": v * 4, "bf16": v * 2, "fraction": v * 4 / (total * 4)} for r, v in per_rank.items()
        ],
    }


def aggregation_times(name: str, ranks: Sequence[int], repeats: int = 3) -> dict[str, float]:
    """Median seconds of one ``GlobalAdapter.aggregate`` per rule, random factors with the model's shapes."""
    from common.lora import lora_scaling, seeded_lora_a
    from common.rules.registry import RULE_NAMES, get_rule
    from common.updates import AdapterFactors, NodeInfo, TrainReply
    from server.global_adapter import GlobalAdapter

    shapes, _, _ = model_shapes(name)
    rng = np.random.default_rng(0)
    replies = []
    for i, r in enumerate(ranks):
        lora = {
            m: (seeded_lora_a(0, m, r, inn, 64), (0.01 * rng.standard_normal((out, r))).astype(np.float32))
            for m, (out, inn) in shapes.items()
        }
        replies.append(TrainReply(AdapterFactors(lora), 100 + i, NodeInfo(r, lora_scaling(16.0, r))))
    times = {}
    for name in RULE_NAMES:
        runs = [
            GlobalAdapter(get_rule(name), 64).aggregate(replies, sorted(set(ranks))).seconds for _ in range(repeats)
        ]
        times[name] = statistics.median(runs)
    return times


def back_to_back_seconds(cfg: Any, num_nodes: int, steps: int) -> float:
    """Seconds of ``steps`` optimizer steps in one process (rank 8, pooled data), with no evaluation."""
    from transformers import AutoTokenizer

    from client.data import pooled_data, tokenize
    from client.model import resolve_model
    from client.node import build_model
    from client.node_settings import NodeSettings
    from client.train import TrainSettings, pick_device, train

    node = NodeSettings.from_node_config(cfg, {"partition-id": 0, "num-partitions": num_nodes, "lora-rank": 8})
    model, _ = build_model(cfg, node, None)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    batch = tokenize(tokenizer, pooled_data(cfg, cfg.task, num_nodes).train, cfg.training.max_length)
    started = time.perf_counter()
    train(
        model,
        batch,
        TrainSettings.from_config(cfg, steps),
        pick_device(),
    )
    return time.perf_counter() - started


def measured_run(scale: str, extra: dict[str, Any], out: Path) -> dict[str, Any]:
    """A real Flower run, the same rounds in process (float32, bf16), and the steps back to back."""
    from client.node import evaluate_node, train_node
    from simulations.inprocess import bf16_transport, float32_transport, run_rounds, simulated_nodes

    overlay = cell_overlay(scale, Cell("svd", "heterogeneous", "iid", 0), extra=extra)
    cfg, num_nodes = resolved(overlay, out / "run")
    out.mkdir(parents=True, exist_ok=True)
    say(f"bench: Flower simulation, {num_nodes} nodes, {cfg.num_rounds} rounds × {cfg.training.local_steps} steps")
    started = time.perf_counter()
    rows = run_federated(overlay, out, lambda line: say(f"    {line}"))
    flower = time.perf_counter() - started
    nodes = simulated_nodes(cfg, num_nodes)
    inprocess: dict[str, Any] = {}
    for label, transport in (("float32", float32_transport), ("bf16", bf16_transport)):
        say(f"bench: the same rounds in one process, {label} transport")
        started = time.perf_counter()
        rounds = run_rounds(cfg, nodes, train_node, evaluate_node, transport=transport)
        inprocess[label] = {
            "seconds": time.perf_counter() - started,
            "accuracy": [r.weighted("eval-accuracy") for r in rounds],
        }
    steps = cfg.num_rounds * num_nodes * cfg.training.local_steps
    say(f"bench: {steps} optimizer steps back to back")
    return {
        "settings": {**overlay, "steps": steps},
        "flower_seconds": flower,
        "flower_rows": rows,
        "inprocess": inprocess,
        "steps_seconds": back_to_back_seconds(cfg, num_nodes, steps),
    }


def report(tables: Sequence[dict[str, Any]], agg: dict[str, dict[str, float]], run: dict[str, Any] | None) -> str:
    """The markdown (also printed): bytes, aggregation times, and the measured run."""
    from simulations.compare_report import commit, machine

    lines = ["# Communication, aggregation time and simulation overhead", "", f"- Machine: {machine()}."]
    lines += [f"- Commit: {commit()}.", ""]
    for t in tables:
        lines += [
            f"## {t['model']}: bytes per node per round ({t['modules']} LoRA modules; full model "
            f"{t['full_model_bytes'] / MiB:.1f} MiB in float32)",
            "",
            "| rank | float32, each direction | bf16, each direction | float32 / full model |",
            "|---:|---:|---:|---:|",
            *[
                f"| {r['rank']} | {r['fp32'] / MiB:.3f} MiB | {r['bf16'] / MiB:.3f} MiB | {100 * r['fraction']:.2f}% |"
                for r in t["rows"]
            ],
            "",
        ]
    lines += ["## Aggregation time per round (8 nodes at ranks 2…32, `GlobalAdapter.aggregate`, median)", ""]
    lines += ["| model | svd | fedavg | ffa |", "|---|---:|---:|---:|"]
    lines += [
        f"| {m} | " + " | ".join(f"{1e3 * t[k]:.1f} ms" for k in ("svd", "fedavg", "ffa")) + " |"
        for m, t in agg.items()
    ]
    if run is not None:
        lines += ["", *measured_lines(run)]
    return "\n".join(lines) + "\n"


def measured_lines(run: dict[str, Any]) -> list[str]:
    """The measured run's section."""
    s, rows = run["settings"], run["flower_rows"][1:]
    fp32, bf16 = run["inprocess"]["float32"], run["inprocess"]["bf16"]
    per_node = statistics.fmean(r["bytes_up_per_node"] for r in rows)
    agg = statistics.fmean(r["aggregation_seconds"] for r in rows)
    return [
        f"## Measured run: {s['model']} on {s['task']}, rule svd, {s['num-nodes']} nodes at ranks 2…32, IID, "
        f"{s['num-rounds']} rounds × {s['local-steps']} local steps ({s['steps']} optimizer steps)",
        "",
        f"- Bytes up per node per round (coordinator's record, mean): {per_node / MiB:.3f} MiB "
        f"(bf16 transport: {per_node / 2 / MiB:.3f} MiB).",
        f"- Aggregation time per round (coordinator's record, mean): {1e3 * agg:.1f} ms.",
        f"- Final accuracy: Flower run {run['flower_rows'][-1]['eval_accuracy']:.4f}; in process float32 "
        f"{fp32['accuracy'][-1]:.4f}, bf16 transport {bf16['accuracy'][-1]:.4f} "
        f"(difference {bf16['accuracy'][-1] - fp32['accuracy'][-1]:+.4f}).",
        f"- Wall time: Flower simulation {run['flower_seconds']:.0f} s; the same rounds in one process "
        f"{fp32['seconds']:.0f} s; the {s['steps']} optimizer steps back to back {run['steps_seconds']:.0f} s.",
        f"- **Simulation overhead ratio** (Flower wall time / back-to-back steps): "
        f"{run['flower_seconds'] / run['steps_seconds']:.1f}× (in-process rounds / steps: "
        f"{fp32['seconds'] / run['steps_seconds']:.1f}×; "
        f"Flower / in-process: {run['flower_seconds'] / fp32['seconds']:.1f}×).",
    ]


def plot(tables: Sequence[dict[str, Any]], agg: dict[str, dict[str, float]], path: Path) -> None:
    """Bytes per node per round against the full model (log scale), and aggregation time per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables) + 1, figsize=(5 * (len(tables) + 1), 4))
    for ax, t in zip(axes, tables, strict=False):
        labels = [str(r["rank"]) for r in t["rows"]]
        ax.bar(labels, [r["fp32"] / MiB for r in t["rows"]], label="LoRA factors, float32")
        ax.bar(labels, [r["bf16"] / MiB for r in t["rows"]], label="LoRA factors, bf16", alpha=0.8)
        ax.axhline(t["full_model_bytes"] / MiB, color="black", linestyle="--", label="full model, float32")
        ax.set(yscale="log", xlabel="node rank", ylabel="MiB per node per round, each direction", title=t["model"])
        ax.legend(fontsize=8)
    rules = ("svd", "fedavg", "ffa")
    width = 0.8 / len(agg)
    for k, (model, times) in enumerate(agg.items()):
        axes[-1].bar([i + k * width for i in range(3)], [1e3 * times[r] for r in rules], width, label=model)
    axes[-1].set_xticks([i + width * (len(agg) - 1) / 2 for i in range(3)], rules)
    axes[-1].set(ylabel="ms per round", title="aggregation time, 8 nodes, ranks 2…32")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the figures and write ``communication.md``."""
    from common.atomic_file import write_json_atomic

    parser = argparse.ArgumentParser(prog="python -m simulations.bench_comm", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("tiny", "small", "full"), default="small", help="scale of the measured run")
    parser.add_argument("--set", action="append", default=["num-rounds=2", "local-steps=5"], metavar="KEY=VALUE")
    parser.add_argument("--no-run", action="store_true", help="only the computed bytes and aggregation times")
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "runs" / "bench-comm", help="run folder")
    parser.add_argument("--results", type=Path, default=PROJECT_DIR / "docs" / "results", help="report folder")
    args = parser.parse_args(argv)
    quiet_warnings()
    if args.threads:
        set_threads(args.threads)
    tables = [bytes_table(m, HETEROGENEOUS) for m in ("minilm-l6", "smollm2")]
    agg = {t["model"]: aggregation_times(t["model"], HETEROGENEOUS) for t in tables}
    run = None if args.no_run else measured_run(args.scale, parse_set(args.set), args.out)
    text = report(tables, agg, run)
    command = " ".join(["python -m simulations.bench_comm", *(argv if argv is not None else sys.argv[1:])])
    text = text.replace("\n\n", f"\n\n- Command: `{command}`.\n", 1)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    plot(tables, agg, args.results / "communication.png")
    text += "\n![bytes per node per round and aggregation time](communication.png)\n"
    (args.results / "communication.md").write_text(text, encoding="utf-8")
    write_json_atomic(args.results / "communication.json", {"bytes": tables, "aggregation": agg, "run": run})
    return 0


if __name__ == "__main__":
    sys.exit(main())
