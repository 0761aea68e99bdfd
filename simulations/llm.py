"""``python -m simulations.llm``: run an LLM preset through ``fedlora simulate`` and write its report.

Presets (``simulations/experiments/``): ``llm-friends.toml`` (SmolLM2-135M-Instruct on the Friends transcripts, one
node per main character) and ``llm-chatterbot.toml`` (SmolLM2 instruction-tuned on the chatterbot chats, categories
grouped over seven nodes, the loss on the responses). The run is an ordinary ``fedlora simulate`` run on Flower's
simulation engine (checkpoints, run store, dashboard); this command only starts it and turns its ``metrics.json``
into ``docs/results/<preset>.md`` and ``.json``: the held-out perplexity of the exported adapter on the coordinator's
fixed set after every round, the nodes' pooled perplexity, the wall time. On CUDA the nodes train under bf16 autocast
(``llm-friends-gpu.toml`` is the larger setting for a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.compare import EXPERIMENTS
from simulations.compare_cells import say
from simulations.launcher import PROJECT_DIR

PRESETS = ("llm-friends", "llm-chatterbot", "llm-friends-gpu")


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m simulations.llm``."""
    parser = argparse.ArgumentParser(prog="python -m simulations.llm", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="llm-friends", help="overlay in simulations/experiments")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")
    parser.add_argument("--out", type=Path, help="run folder (default runs/<preset>)")
    parser.add_argument("--results", type=Path, default=PROJECT_DIR / "docs" / "results", help="report folder")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="as for fedlora simulate")
    return parser


def simulate_command(args: argparse.Namespace, out: Path) -> list[str]:
    """The ``fedlora simulate`` command line of the preset."""
    config = EXPERIMENTS / f"{args.preset}.toml"
    command = ["fedlora", "simulate", "--config", str(config.relative_to(PROJECT_DIR)), "--out", str(out)]
    command += ["--cpus-per-node", str(args.cpus_per_node)]
    for item in args.set:
        command += ["--set", item]
    return command


def change(before: float, after: float) -> str:
    """``-61.0%``."""
    return f"{100 * (after / before - 1):+.1f}%"


def markdown(summary: dict[str, Any]) -> str:
    """The report: command, settings, per-round perplexities and where the numbers came from."""
    from simulations.compare_report import machine

    s, rows = summary["settings"], summary["rounds"]
    first, last = rows[0], rows[-1]
    lines = [
        f"# {summary['title']}",
        "",
        f"- Command: `{summary['command']}` ({summary['seconds'] / 60:.1f} min wall time here).",
        f"- Settings: model {s['model']}, task {s['task']}, rule {s['rule']}, node ranks {s['node-ranks']} over "
        f"{summary['nodes']} nodes, {s['num-rounds']} rounds × {s['local-steps']} local steps, batch "
        f"{s['batch-size']}, learning rate {s['learning-rate']}, lora-alpha {s['lora-alpha']}, ≤ {s['max-length']} "
        f"tokens per example; LoRA on {s['target-modules'] or 'q_proj, k_proj, v_proj, o_proj'}.",
        f"- Machine: {machine()}. Commit: {summary['commit']}.",
        f"- Fixed held-out set: {summary['global_set']}.",
        "",
        f"Held-out perplexity of the exported adapter (rank {summary['export_rank']}) on that set: "
        f"**{first['global_perplexity']:.2f} → {last['global_perplexity']:.2f} "
        f"({change(first['global_perplexity'], last['global_perplexity'])})**.",
        "",
        "| round | global perplexity | global content perplexity | nodes' pooled perplexity | train loss | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loss = f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else ""
        lines.append(
            f"| {r['round']} | {r['global_perplexity']:.2f} | {r.get('global_content_perplexity', float('nan')):.2f} "
            f"| {r.get('eval_perplexity', float('nan')):.2f} | {loss} | {r['round_seconds']:.0f} |"
        )
    lines += [
        "",
        "Round 0 is the base model (lora_B = 0). Global: the adapter a user exports, on the coordinator's fixed set;",
        "content perplexity leaves out each example's first and last target (the format, not the language). Nodes:",
        "each node's held-out share at its own rank, pooled over their tokens. Every number is from the run's",
        "`metrics.json`, as `fedlora simulate` wrote it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preset through ``fedlora simulate``; write the report when the run completed."""
    from simulations.compare_report import commit

    args = build_parser().parse_args(argv)
    out = (args.out or PROJECT_DIR / "runs" / args.preset).resolve()
    command = simulate_command(args, out)
    say(f"llm: {' '.join(command)}")
    started = time.monotonic()
    fedlora = str(Path(sys.executable).parent / "fedlora")
    done = subprocess.run([fedlora, *command[1:]], cwd=PROJECT_DIR, check=False)
    if done.returncode != 0:
        say(f"llm: fedlora simulate exited {done.returncode}; no report written (outputs in {out})")
        return done.returncode
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    rows = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    summary = {
        "title": f"{args.preset}: federated LoRA of {config['model']} on {config['task']}, through Flower",
        "command": "python -m simulations.llm " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": config,
        "nodes": json.loads((out / "launch.json").read_text(encoding="utf-8"))["num-nodes"],
        "export_rank": max(int(r) for r in config["node-ranks"].split(",")),
        "global_set": json.loads((out / "global_eval_set.json").read_text(encoding="utf-8"))["source"],
        "seconds": time.monotonic() - started,
        "commit": commit(),
        "rounds": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.preset}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    text = markdown(summary)
    (args.results / f"{args.preset}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0 if rows[-1]["global_perplexity"] < rows[0]["global_perplexity"] else 1


if __name__ == "__main__":
    sys.exit(main())
