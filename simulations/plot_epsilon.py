"""Accuracy against ε from finished ``simulations.compare`` cells: a PNG and a CSV of DP runs at full scale.

``simulations.bench_privacy`` sweeps ε itself on the tiny task; at the default task's scale every DP run is a
``simulations.compare`` cell of its own (minutes to an hour each, resumable), and this draws them together::

    python -m simulations.plot_epsilon --out docs/privacy_default_task.png \\
        --baseline local=runs/compare/full/inprocess/svd-heterogeneous-dirichlet-s0 \\
        local:8=runs/dp/local-eps8/svd-heterogeneous-dirichlet-s0 \\
        local:3=runs/dp/local-eps3/svd-heterogeneous-dirichlet-s0 \\
        central:8=runs/dp/central-100/svd-heterogeneous-dirichlet-s0

Each ``MODE:EPSILON=CELL`` names a cell folder (its ``result.json``) run with ``dp = MODE`` and ``target-epsilon =
EPSILON``; ``--baseline MODE=CELL`` is the same setting without DP, drawn at ε = ∞ on that mode's line (a mode
without one, e.g. central DP at a node count never run without DP, has no ∞ point). Plotted: the final
global accuracy and loss (the exported adapter on the run's fixed held-out set). The CSV next to the PNG has one
row per cell, with its accuracy after every round.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.bench_privacy import Result, plot

MODES = ("local", "central")


def parse_cell(text: str) -> tuple[str, float, Path]:
    """``local:8=DIR`` → ("local", 8.0, DIR)."""
    try:
        head, folder = text.split("=", 1)
        mode, epsilon = head.split(":", 1)
        value = float(epsilon)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MODE:EPSILON=CELL (e.g. local:8=runs/dp/cell), got {text!r}"
        ) from None
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"unknown DP mode {mode!r} in {text!r}; choose from {', '.join(MODES)}")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"ε must be a positive number, got {epsilon!r} in {text!r}")
    return mode, value, Path(folder)


def parse_baseline(text: str) -> tuple[str, Path]:
    """``local=DIR`` → ("local", DIR)."""
    mode, _, folder = text.partition("=")
    if mode not in MODES or not folder:
        raise argparse.ArgumentTypeError(f"expected MODE=CELL with MODE in {', '.join(MODES)}, got {text!r}")
    return mode, Path(folder)


def read_cell(folder: Path) -> dict[str, Any]:
    """A finished cell's ``result.json``; one clear error if it is missing or has no global metric."""
    path = folder / "result.json"
    if not path.is_file():
        raise SystemExit(f"plot_epsilon: {path} does not exist (is the cell finished?)")
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("metric") != "global" or not result.get("rows"):
        raise SystemExit(f"plot_epsilon: {path} has no global metric per round; rerun the cell with this version")
    return dict(result)


def to_result(mode: str, epsilon: float, cell: dict[str, Any]) -> Result:
    """The cell as one point of :func:`simulations.bench_privacy.plot` (its line: the mode, rule and node count)."""
    last = cell["rows"][-1]
    return Result(
        mode=mode,
        rule=f"{cell.get('method', '?')}, {cell.get('overlay', {}).get('num-nodes', '?')} nodes",
        target_epsilon=epsilon,
        epsilon=None,
        accuracy=last.get("global_accuracy"),
        eval_loss=last.get("global_loss"),
        seconds=float(cell.get("seconds", 0.0)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.plot_epsilon", description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=parse_cell, metavar="MODE:EPSILON=CELL")
    parser.add_argument(
        "--baseline", type=parse_baseline, action="append", default=[], help="MODE=CELL: without DP (at ε = ∞)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the PNG; the CSV goes next to it")
    args = parser.parse_args(argv)
    cells = [(mode, math.inf, folder, read_cell(folder)) for mode, folder in args.baseline]
    cells += [(mode, epsilon, folder, read_cell(folder)) for mode, epsilon, folder in args.cells]
    plot([to_result(mode, epsilon, cell) for mode, epsilon, _, cell in cells], args.out)
    table = args.out.with_suffix(".csv")
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dp", "target_epsilon", "cell", "final_global_accuracy", "global_accuracy_per_round"])
        for mode, epsilon, folder, cell in cells:
            per_round = " ".join(f"{row.get('global_accuracy', float('nan')):.4f}" for row in cell["rows"])
            dp = f"off ({mode}'s baseline)" if math.isinf(epsilon) else mode
            where = f"{folder.parent.name}/{folder.name}"
            writer.writerow([dp, epsilon, where, cell["rows"][-1].get("global_accuracy"), per_round])
    print(f"plot_epsilon: wrote {args.out} and {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
