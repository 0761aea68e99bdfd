"""Accuracy against ε: the same federated task under local DP and central DP at several privacy budgets.

Run ``python -m simulations.bench_privacy`` (writes ``docs/privacy.md`` and ``docs/privacy_accuracy.png``).
For every ``MODE:RULE`` of ``--configs`` and every ε of ``--epsilons``, one real ``fedlora simulate`` run with
``dp = MODE``, ``target-epsilon = ε`` and no fixed ``noise-multiplier`` (so z is calibrated for the planned rounds);
ε = ∞ is the same run with ``dp = "off"``. Reported: the final held-out accuracy (example-weighted over the nodes),
and the ε actually spent at δ = 1e-5 (under local DP, the largest over the nodes; each node has its own).

Defaults are the tiny task (what finishes in reasonable time on 2 CPU cores); ``--task newsgroups --model
minilm-l6`` runs the default MiniLM task instead (about 1 s per local step here, so keep ``--local-steps`` small).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_privacy:start -->", "<!-- bench_privacy:end -->"
"""The region of ``docs/privacy.md`` that the benchmark rewrites."""


@dataclass(frozen=True)
class Result:
    """One run of the sweep."""

    mode: str
    rule: str
    target_epsilon: float
    """math.inf for the non-private run."""
    epsilon: float | None
    """ε spent at the end (None without DP)."""
    accuracy: float | None
    eval_loss: float | None
    seconds: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The sweep's flags."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bench_privacy", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="local:svd,central:svd,central:ffa", help="MODE:RULE, comma separated")
    parser.add_argument("--epsilons", default="1,3,8", help="target ε values (∞ is always added)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--task", default="tiny")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--node-ranks", default="2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--head-lr-ratio", type=float, default=1.0, help="head learning rate / learning-rate")
    parser.add_argument(
        "--schedule-span", default="round", help="run or round (docs/privacy.md was measured with round)"
    )
    parser.add_argument("--clip-norm", type=float, default=0.5, help="central DP: bound C on each client's change")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="local DP: per-example gradient bound")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-privacy"), help="where the runs go")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "docs", help="where privacy.md and the plot go")
    return parser.parse_args(argv)


def run_settings(args: argparse.Namespace, mode: str, rule: str, epsilon: float) -> dict[str, Any]:
    """Run-config keys of one run of the sweep."""
    settings: dict[str, Any] = {
        "model": args.model,
        "task": args.task,
        "rule": rule,
        "node-ranks": args.node_ranks,
        "num-rounds": args.rounds,
        "local-steps": args.local_steps,
        "learning-rate": args.learning_rate,
        "head-lr-ratio": args.head_lr_ratio,
        "schedule-span": args.schedule_span,
        "max-length": args.max_length,
        "dp": "off" if math.isinf(epsilon) else mode,
    }
    if not math.isinf(epsilon):
        settings.update({"target-epsilon": epsilon, "clip-norm": args.clip_norm, "max-grad-norm": args.max_grad_norm})
    return settings


def simulate(settings: dict[str, Any], nodes: int, folder: Path) -> tuple[list[dict[str, Any]], float]:
    """One ``fedlora simulate`` run (its own node-state folder, so no two runs share a privacy ledger).

    A finished run of the same settings in ``folder`` is read back instead of run again (extending a sweep).
    """
    done_file = folder / "bench.json"
    if done_file.is_file():
        done_before = json.loads(done_file.read_text(encoding="utf-8"))
        if done_before["settings"] == settings and done_before["nodes"] == nodes:
            rows = json.loads((folder / "run" / "metrics.json").read_text(encoding="utf-8"))
            return rows, float(done_before["seconds"])
    flags = [f for key, value in settings.items() for f in ("--set", f"{key}={json.dumps(value)}")]
    command = [str(Path(sys.executable).parent / "fedlora"), "simulate", "--nodes", str(nodes), "--out"]
    command += [str(folder / "run"), "--store", str(folder / "fedlora.db"), *flags]
    started = time.monotonic()
    env = {**os.environ, "FEDLORA_STATE_DIR": str(folder / "node-state")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"run in {folder} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    rows = json.loads((folder / "run" / "metrics.json").read_text(encoding="utf-8"))
    seconds = time.monotonic() - started
    done_file.write_text(json.dumps({"settings": settings, "nodes": nodes, "seconds": seconds}), encoding="utf-8")
    return rows, seconds


def sweep(args: argparse.Namespace) -> list[Result]:
    """Every configured run, the non-private ones once per rule."""
    configs = [tuple(item.split(":")) for item in args.configs.split(",") if item]
    epsilons = [float(e) for e in args.epsilons.split(",") if e] + [math.inf]
    results: list[Result] = []
    baselines: dict[str, Result] = {}
    for mode, rule in configs:
        for epsilon in epsilons:
            if math.isinf(epsilon) and rule in baselines:
                results.append(replace(baselines[rule], mode=mode))
                continue
            name = f"{mode}-{rule}-eps{epsilon:g}" if not math.isinf(epsilon) else f"off-{rule}"
            print(f"bench_privacy: {name} …", flush=True)
            rows, seconds = simulate(run_settings(args, mode, rule, epsilon), args.nodes, args.work / name)
            last = rows[-1]
            accuracy, loss = last.get("eval_accuracy"), last.get("eval_loss")
            result = Result(mode, rule, epsilon, last.get("epsilon"), accuracy, loss, seconds)
            print(f"bench_privacy: {name}: accuracy {result.accuracy}, ε {result.epsilon}, {seconds:.0f} s", flush=True)
            results.append(result)
            if math.isinf(epsilon):
                baselines[rule] = result
    return results


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


def table(results: Sequence[Result], args: argparse.Namespace) -> list[str]:
    """The Markdown table, with the settings that produced it."""
    lines = [
        f"Task: model `{args.model}`, data `{args.task}`, {args.nodes} nodes at ranks {args.node_ranks}, "
        f"{args.rounds} rounds of {args.local_steps} local steps, learning rate {args.learning_rate}; "
        f"central DP clip-norm C = {args.clip_norm}, local DP max-grad-norm C = {args.max_grad_norm}; δ = 1e-5, "
        "RDP accountant, noise calibrated to each target ε for the planned rounds. Generated by "
        f"`python -m simulations.bench_privacy --configs {args.configs} --epsilons {args.epsilons} "
        f"--model {args.model} --task {args.task} --nodes {args.nodes} --rounds {args.rounds} "
        f"--local-steps {args.local_steps}`.",
        "",
        "| DP | rule | target ε | ε spent | final accuracy | final eval loss | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mode = "off" if math.isinf(r.target_epsilon) else r.mode
        lines.append(
            f"| {mode} | {r.rule} | {_fmt(r.target_epsilon, 0)} | {_fmt(r.epsilon, 2)} | {_fmt(r.accuracy)} | "
            f"{_fmt(r.eval_loss)} | {r.seconds:.0f} |"
        )
    return [
        *lines,
        "",
        "Local DP: ε is the largest over the nodes (each node's depends on its own sampling rate q = batch / n_i). "
        "Central DP: ε of the coordinator's releases, client level (all nodes sampled: q = 1).",
        "",
        "![accuracy against ε](privacy_accuracy.png)",
    ]


def write_table(lines: Sequence[str], path: Path) -> None:
    """Put ``lines`` between the bench_privacy markers of ``path`` (the whole file when it has none)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + START + "\n" + "\n".join(lines) + "\n" + END + rest.split(END, 1)[1]
    else:
        text = "\n".join(["# Accuracy against ε", "", START, *lines, END, ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def plot(results: Sequence[Result], path: Path) -> None:
    """Final accuracy and eval loss against target ε (log scale), one line per mode and rule; ∞ at the right edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r.target_epsilon for r in results if not math.isinf(r.target_epsilon)})
    at_infinity = finite[-1] * 3 if finite else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], "accuracy", "final held-out accuracy"), (axes[1], "eval_loss", "final eval loss"))
    for ax, field, label in panels:
        for mode, rule in dict.fromkeys((r.mode, r.rule) for r in results):
            points = sorted(
                (at_infinity if math.isinf(r.target_epsilon) else r.target_epsilon, getattr(r, field))
                for r in results
                if (r.mode, r.rule) == (mode, rule) and getattr(r, field) is not None
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{mode} DP, {rule}")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([*finite, at_infinity], [*(f"{e:g}" for e in finite), "∞ (no DP)"])
        ax.set(xlabel="target ε (δ = 1e-5)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylim(0, 1)
    fig.suptitle("Accuracy and loss against ε")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; write the table, the plot and the raw results."""
    args = parse_args(argv)
    results = sweep(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    write_table(table(results, args), args.out / "privacy.md")
    plot(results, args.out / "privacy_accuracy.png")
    print(f"bench_privacy: wrote {args.out / 'privacy.md'} and {args.out / 'privacy_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
