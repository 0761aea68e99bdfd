"""``python -m simulations.llm``: federated LoRA of SmolLM2-135M-Instruct on the Friends transcripts.

One node per main character (Chandler, Joey, Monica, Phoebe, Rachel, Ross: a natural non-IID split); each node
trains LoRA on q/k/v/o projections on its character's lines and reports the perplexity of its held-out lines
before (round 0: the base model, since lora_B = 0) and after federated training, per node and overall
(exp(Σ NLL / Σ tokens) over every node's held-out tokens).

The rounds run in this process (``simulations.inprocess``): the coordinator's real round engine and aggregation
rule, the one node path of ``client.node`` (task type ``client.task_types.CausalLM``), and no Flower transport.
Device: CUDA with bf16 autocast when present (and ``llm-friends-gpu.toml`` unless ``--config`` is given), else the
CPU in float32.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.compare import EXPERIMENTS
from simulations.compare_cells import quiet_warnings, say, set_threads
from simulations.launcher import PROJECT_DIR
from simulations.simulate import merged_config, parse_set, read_overlay

CPU_CONFIG = EXPERIMENTS / "llm-friends.toml"
GPU_CONFIG = EXPERIMENTS / "llm-friends-gpu.toml"


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m simulations.llm``."""
    parser = argparse.ArgumentParser(prog="python -m simulations.llm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="overlay (default: llm-friends.toml, or -gpu on CUDA)")
    parser.add_argument("--rounds", type=int, help="federated rounds (num-rounds)")
    parser.add_argument("--rule", help="aggregation rule: svd, fedavg or ffa")
    parser.add_argument("--seed", type=int, help="seed of the line split, LoRA init and batches")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "runs" / "llm-friends", help="run folder")
    parser.add_argument("--results", type=Path, default=PROJECT_DIR / "docs" / "results", help="report folder")
    parser.add_argument("--every-round", action="store_true", help="evaluate after every round, not only the last")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser


def resolve(args: argparse.Namespace) -> tuple[Any, Path]:
    """The typed run config and the overlay file it came from."""
    from client.train import pick_device
    from common.config import RunConfig

    config = args.config or (GPU_CONFIG if pick_device().type == "cuda" else CPU_CONFIG)
    flags = parse_set(args.set)
    for key, value in (("num-rounds", args.rounds), ("rule", args.rule), ("seed", args.seed)):
        if value is not None:
            flags[key] = value
    merged, _ = merged_config(read_overlay(config), flags)
    merged["out-dir"] = str(args.out.resolve())
    return RunConfig.from_mapping(merged), config


def overall(evaluations: Sequence[Any], kind: str = "") -> float:
    """Perplexity over every node's held-out tokens, exp(Σ NLL / Σ tokens); ``kind="content-"``: content tokens."""
    tokens = sum(e.metrics[f"eval-{kind}tokens"] for e in evaluations)
    nll = sum(e.metrics[f"eval-{kind}nll-sum"] for e in evaluations)
    return math.exp(nll / tokens) if tokens else float("nan")


def node_rows(before: Sequence[Any], after: Sequence[Any], train_lines: Sequence[int]) -> list[dict[str, Any]]:
    """Per node: character, rank, lines, held-out tokens, perplexity before and after."""
    return [
        {
            "character": b.node.name,
            "rank": b.node.rank,
            "train_lines": n,
            "test_lines": b.num_examples,
            "test_tokens": int(b.metrics["eval-tokens"]),
            "perplexity_before": b.metrics["eval-perplexity"],
            "perplexity_after": a.metrics["eval-perplexity"],
            "content_perplexity_before": b.metrics["eval-content-perplexity"],
            "content_perplexity_after": a.metrics["eval-content-perplexity"],
        }
        for b, a, n in zip(before, after, train_lines, strict=True)
    ]


def cells(before: float, after: float, bold: bool = False) -> str:
    """``before | after | change%`` table cells."""
    mark = "**" if bold else ""
    change = 100 * (after / before - 1)
    return f"{mark}{before:.2f}{mark} | {mark}{after:.2f}{mark} | {mark}{change:+.1f}%{mark}"


def markdown(summary: dict[str, Any]) -> str:
    """The report: settings, the per-node table, and where the numbers came from."""
    from simulations.compare_report import commit, machine

    s = summary["settings"]
    lines = [
        "# LLM preset: SmolLM2-135M-Instruct on the Friends transcripts, one node per character",
        "",
        f"- Command: `{summary['command']}` (overlay `{summary['config']}`).",
        f"- Settings: rule {s['rule']}, node ranks {s['node-ranks']}, {s['num-rounds']} rounds × {s['local-steps']} "
        f"local steps, batch {s['batch-size']}, learning rate {s['learning-rate']}, lora-alpha {s['lora-alpha']}, "
        f"≤ {s['max-length']} tokens per line, {s['eval-examples']} held-out lines per character; LoRA on "
        "q_proj, k_proj, v_proj, o_proj.",
        f"- Device: {summary['device']}. Machine: {machine()}.",
        f"- Commit: {commit()}. Time: {summary['seconds']:.0f} s in all (model load {summary['load_seconds']:.0f} s"
        f"{', from the cached HF folder' if summary['cache_hit'] else ', including the one-off GGUF conversion'}).",
        "",
        "Held-out perplexity (exp of the mean token NLL of each character's held-out lines) of the base model",
        "(before) and of the federated global adapter served at the node's rank (after):",
        "",
        "| character | rank | train lines | held-out lines (tokens) | perplexity before | after | change "
        "| content tokens: before | after | change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["nodes"]:
        lines.append(
            f"| {r['character']} | {r['rank']} | {r['train_lines']} | {r['test_lines']} ({r['test_tokens']}) | "
            + cells(r["perplexity_before"], r["perplexity_after"])
            + " | "
            + cells(r["content_perplexity_before"], r["content_perplexity_after"])
            + " |"
        )
    lines += [
        "| **all** | | | | "
        + cells(summary["overall_before"], summary["overall_after"], bold=True)
        + " | "
        + cells(summary["overall_content_before"], summary["overall_content_after"], bold=True)
        + " |",
        "",
        "Content tokens leave out each line's first word and its end-of-line token, where part of the drop is the",
        "model learning the one-line-per-example format rather than the character's language.",
        "",
        "Rounds run in one process with the coordinator's round engine (`server.engine.RoundEngine`) and the one node",
        "path of `client/node.py` (task type `client.task_types.CausalLM`); the numbers are as measured.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preset, print the per-node table, write ``llm-friends.md`` and ``.json``."""
    from client.causal_lm import MAIN_CHARACTERS, resolve_causal_model, smollm2_cache_folder
    from client.node import device_summary, evaluate_node, train_node
    from client.task_types import character_data
    from client.train import pick_device
    from simulations.inprocess import RoundResult, run_rounds, simulated_nodes

    args = build_parser().parse_args(argv)
    quiet_warnings()
    if args.threads:
        set_threads(args.threads)
    cfg, config = resolve(args)
    started = time.monotonic()
    cache_hit = cfg.model != "smollm2" or (smollm2_cache_folder() / "config.json").is_file()
    resolve_causal_model(cfg.model)  # builds the cached HF folder on the first run
    load_seconds = time.monotonic() - started
    say(f"llm: model {cfg.model} ready in {load_seconds:.0f} s on {device_summary(pick_device())}")
    nodes = simulated_nodes(cfg, len(MAIN_CHARACTERS), MAIN_CHARACTERS)

    def progress(result: RoundResult) -> None:
        if result.evaluations:
            per_node = ", ".join(f"{e.node.name} {e.metrics['eval-perplexity']:.1f}" for e in result.evaluations)
            say(f"llm: round {result.round}: perplexity {overall(result.evaluations):.2f} ({per_node})")
        else:
            say(f"llm: round {result.round} trained in {result.seconds:.0f} s")

    rounds = run_rounds(cfg, nodes, train_node, evaluate_node, on_round=progress, evaluate_every_round=args.every_round)
    before, after = rounds[0].evaluations, rounds[-1].evaluations
    summary = {
        "command": " ".join(["python -m simulations.llm", *(argv if argv is not None else sys.argv[1:])]),
        "config": str(config.relative_to(PROJECT_DIR)) if config.is_relative_to(PROJECT_DIR) else str(config),
        "settings": cfg.to_mapping(),
        "device": device_summary(pick_device())
        + (" (bf16 autocast)" if pick_device().type == "cuda" else " (float32)"),
        "seconds": time.monotonic() - started,
        "load_seconds": load_seconds,
        "cache_hit": cache_hit,
        "overall_before": overall(before),
        "overall_after": overall(after),
        "overall_content_before": overall(before, "content-"),
        "overall_content_after": overall(after, "content-"),
        "nodes": node_rows(before, after, [len(character_data(cfg, n.partition_id).train) for n in nodes]),
        "rounds": [
            {"round": r.round, "seconds": r.seconds, "perplexity": overall(r.evaluations) if r.evaluations else None}
            for r in rounds
        ],
    }
    write_outputs(summary, args.out, args.results)
    return 0 if summary["overall_after"] < summary["overall_before"] else 1


def write_outputs(summary: dict[str, Any], out: Path, results: Path | None) -> None:
    """``summary.json`` in the run folder; ``llm-friends.md`` and ``.json`` in the report folder; the report printed."""
    from common.atomic_file import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    text = markdown(summary)
    if results:
        results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(results / "llm-friends.json", summary)
        (results / "llm-friends.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
