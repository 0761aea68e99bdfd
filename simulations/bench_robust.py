"""How far hostile nodes move the model a user exports, by rule: ``docs/results/robustness.md`` and a PNG.

Run ``python -m simulations.bench_robust --scale full`` (the default task: MiniLM-L6, 20 Newsgroups, 8 nodes at ranks
2…32, Dirichlet α = 0.5, 10 rounds; minutes per cell on a CPU) or ``--scale tiny`` (seconds per cell). Every cell
is one run of in-process rounds (:mod:`simulations.inprocess`: the coordinator's round engine, validation and
aggregation, and the nodes' real training, without Flower's transport) in which the last ``attackers`` nodes by
partition (the highest ranks) send :func:`simulations.attacks.attacked` replies from round 1 on. Methods:

- ``svd``: the default rule (keep-residual, ``weighting = examples-capped``);
- ``svd-trusting``: the same trusting the reported example counts (``weighting = examples``), what fedlora did
  before the cap;
- ``svd-bounded``: ``svd`` with ``norm-bound = "median"`` (Sun et al. 2019);
- ``rfa`` (geometric median) and ``multikrum`` (f = ``byzantine-nodes`` = the number of attackers, at least 1).

Reported: the exported adapter's accuracy on the run's fixed held-out set after the last round (each cell's
``result.json`` also keeps round 0's and the rounds skipped because no update passed validation). Each finished
cell is saved under ``--runs`` and not rerun; several processes can share the cells (a live pid in a cell's folder
marks it taken); the report is rewritten after every cell, with the machine, the commit and the time
(``--report-only`` rewrites it from the finished cells).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.attacks import ATTACKS, attacked
from simulations.compare import EXPERIMENTS
from simulations.compare_cells import format_duration, resolved
from simulations.compare_report import commit, machine
from simulations.simulate import read_overlay

METHODS: dict[str, dict[str, Any]] = {
    "svd": {"rule": "svd"},
    "svd-trusting": {"rule": "svd", "weighting": "examples"},
    "svd-bounded": {"rule": "svd", "norm-bound": "median"},
    "rfa": {"rule": "rfa"},
    "multikrum": {"rule": "multikrum"},
}


SCALE_TEXT = {"full": "MiniLM-L6 on 20 Newsgroups, 10 rounds", "tiny": "the tiny model on the synthetic 4-topic task"}


def cell_name(method: str, attack: str, attackers: int, seed: int) -> str:
    return f"{method}-{attack}-{attackers}-s{seed}" if attackers else f"{method}-none-0-s{seed}"


def run_cell(scale: str, method: str, attack: str, attackers: int, seed: int, out: Path) -> dict[str, Any]:
    """One in-process run; returns its summary (also written to ``out / "result.json"``)."""
    from client.global_eval import GlobalEvaluator
    from client.node import evaluate_node, train_node
    from simulations.inprocess import run_rounds, simulated_nodes

    overlay: dict[str, Any] = {}
    for name in (f"scale-{scale}", "ranks-heterogeneous", "data-dirichlet"):
        overlay.update(read_overlay(EXPERIMENTS / f"{name}.toml"))
    overlay.update({**METHODS[method], "seed": seed})
    if method == "multikrum":
        overlay["byzantine-nodes"] = max(1, attackers)
    cfg, num_nodes = resolved(overlay, out / "run")
    nodes = simulated_nodes(cfg, num_nodes)
    hostile = {node.partition_id for node in nodes[len(nodes) - attackers :]} if attackers else set()

    def train(cfg_: Any, node: Any, ins: Any) -> Any:
        reply = train_node(cfg_, node, ins)
        return attacked(reply, attack, seed=ins.server_round) if node.partition_id in hostile else reply

    started = time.time()
    results = run_rounds(
        cfg, nodes, train, evaluate_node, evaluate_every_round=False, evaluator=GlobalEvaluator.from_config(cfg)
    )
    final = results[-1].global_metrics
    summary = {
        "method": method,
        "attack": attack if attackers else "none",
        "attackers": attackers,
        "seed": seed,
        "final_accuracy": final.get("global-accuracy"),
        "round0_accuracy": results[0].global_metrics.get("global-accuracy"),
        "skipped_rounds": sum(1 for r in results[1:] if r.skipped),
        "seconds": round(time.time() - started, 1),
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def write_report(results: Sequence[dict[str, Any]], folder: Path, command: str, scale: str) -> Path:
    """``robustness.md`` (a table: attack × attackers, one column per method) and ``robustness.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    rows = sorted({(r["attack"], r["attackers"], r["seed"]) for r in results}, key=lambda k: (k[1] > 0, *k))
    table = ["| attack | attackers | seed | " + " | ".join(methods) + " |", "|---|---:|---:|" + "---:|" * len(methods)]
    for attack, count, seed in rows:
        cells = [_accuracy(results, m, attack, count, [seed]) for m in methods]
        table.append(f"| {attack} | {count} | {seed} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in results if r["attackers"] == 0})
    if len(seeds) > 1:
        cells = [_accuracy(results, m, "none", 0, seeds) for m in methods]
        table.append(f"| none, mean | 0 | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    total = sum(float(r["seconds"]) for r in results)
    first = min(r["seed"] for r in results)
    lines = [
        "# Robustness: hostile nodes against each rule",
        "",
        f"Scale **{scale}** ({SCALE_TEXT[scale]}), 8 nodes at ranks 2…32, Dirichlet α = 0.5;",
        "the last nodes by partition (the highest ranks) attack from round 1 on. Final accuracy of the exported",
        "adapter on the run's fixed held-out set. Methods and attacks: `simulations/bench_robust.py`,",
        "`simulations/attacks.py`.",
        "",
        f"- Command: `{command}` ({len(results)} cells; — in the table: a cell not run yet). Each cell is run by",
        f"  `python -m simulations.bench_robust --scale {scale} --methods M --attacks A --attackers N` and kept;",
        "  `--report-only` writes this report from the cells finished so far.",
        f"- Machine: {machine()}.",
        f"- Commit: {commit()}; {format_duration(total)} of cell runs.",
        "",
        *table,
        "",
        f"![robustness](robustness.png) (seed {first})",
        "",
    ]
    path = folder / "robustness.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    shown = [r for r in results if r["seed"] == first]  # the plot: one seed, the one every cell has
    plot(
        shown,
        methods,
        sorted({(a, c) for a, c, seed in rows if seed == first}, key=lambda k: (k[1] > 0, *k)),
        folder / "robustness.png",
    )
    return path


def _accuracy(results: Sequence[dict[str, Any]], method: str, attack: str, count: int, seeds: Sequence[int]) -> str:
    """The table cell of ``method`` under ``attack`` × ``count`` over ``seeds``: a mean (± std and n when > 1)."""
    values = [
        r["final_accuracy"]
        for r in results
        if (r["method"], r["attack"], r["attackers"]) == (method, attack, count) and r["seed"] in seeds
    ]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def plot(results: Sequence[dict[str, Any]], methods: list[str], rows: list[tuple[str, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 4.5))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        values = []
        for attack, count in rows:
            got = [
                r["final_accuracy"] for r in results if (r["method"], r["attack"], r["attackers"]) == (m, attack, count)
            ]
            values.append(statistics.fmean(got) if got else np.nan)
        ax.bar(np.arange(len(rows)) + j * width, values, width, label=m)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, [_label(a, c) for a, c in rows], fontsize=8)
    ax.set_ylabel("global accuracy (exported adapter)")
    ax.legend(fontsize=8, ncol=len(methods))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label(attack: str, count: int) -> str:
    """The plot's label of a row: the attack and how many attackers (not "×2", which reads as a scale)."""
    return f"{attack}\n{count} attacker{'s' if count > 1 else ''}" if count else "no attack"


def _running_elsewhere(out: Path) -> bool:
    """Whether another live process is running this cell (its pid in ``out/running``): cells can be shared out."""
    try:
        pid = int((out / "running").read_text(encoding="utf-8"))
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scale", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help="comma-separated; 'none' alone runs only the no-attack row"
    )
    parser.add_argument(
        "--attackers", default="1,2", help="comma-separated counts (0, the no-attack row, is always run)"
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--runs", type=Path, default=Path("runs/robust"))
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the cells finished under --runs; run none"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    attacks = [a for a in args.attacks.split(",") if a and a != "none"]  # the no-attack row is always run
    for name, known in (("method", METHODS), ("attack", ATTACKS)):
        for value in methods if name == "method" else attacks:
            if value not in known:
                parser.error(f"unknown {name} {value!r}; choose from {', '.join(known)}")
    counts = sorted({int(c) for c in args.attackers.split(",") if c} - {0})
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cells = [(m, "none", 0, s) for s in seeds for m in methods]
    cells += [(m, a, c, s) for s in seeds for c in counts for a in attacks for m in methods]
    command = "python -m simulations.bench_robust " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    if args.report_only:
        saved = sorted((args.runs / args.scale).glob("*/result.json"))
        finished = [json.loads(path.read_text(encoding="utf-8")) for path in saved]
        report = write_report(finished, args.results, command, args.scale)
        print(f"bench_robust: report of {len(finished)} cells in {report}")
        return
    results = run_cells(cells, args, command)
    print(f"bench_robust: report in {write_report(results, args.results, command, args.scale)}")


def run_cells(cells: Sequence[tuple[str, str, int, int]], args: argparse.Namespace, command: str) -> list[Any]:
    """Run the cells not finished (nor taken by another process) yet; return the results of the finished ones."""
    results = []
    for i, (method, attack, count, seed) in enumerate(cells, 1):
        out = args.runs / args.scale / cell_name(method, attack, count, seed)
        saved = out / "result.json"
        if saved.is_file():
            results.append(json.loads(saved.read_text(encoding="utf-8")))
            continue
        if _running_elsewhere(out):
            print(f"bench_robust: [{i}/{len(cells)}] {out.name} is being run by another process; skipped", flush=True)
            continue
        out.mkdir(parents=True, exist_ok=True)
        (out / "running").write_text(str(os.getpid()), encoding="utf-8")
        print(f"bench_robust: [{i}/{len(cells)}] {out.name}", flush=True)
        try:
            result = run_cell(args.scale, method, attack, count, seed, out)
        finally:  # no mark left by a cell that raised (a killed process's mark is read as free: its pid is gone)
            (out / "running").unlink(missing_ok=True)
        print(
            f"bench_robust: {out.name}: accuracy {result['final_accuracy']:.3f} in {result['seconds']:.0f} s",
            flush=True,
        )
        results.append(result)
        write_report(results, args.results, command, args.scale)
    return results


if __name__ == "__main__":
    main()
