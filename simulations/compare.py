"""``python -m simulations.compare``: the aggregation-rule matrix, resumable, with a table and plots.

Cells: rules {svd, fedavg, ffa} × ranks {homogeneous r = 8, heterogeneous 2…32} × data {IID, Dirichlet α = 0.5,
two labels per node} × seeds, plus two baselines per (ranks, data, seed) at the same total optimizer steps:

- ``centralized``: one LoRA (the largest node rank) on the pooled data (``fedlora centralized``'s code);
- ``local``: each node trains alone at its own rank with the federated node recipe (rounds × local steps, the same
  optimizer restarts) and no aggregation; each node's own adapter is evaluated on the fixed held-out set, averaged
  over nodes.

Every cell is composed from the overlays in ``simulations/experiments/`` (scale ← ranks ← data ← rule and seed)
and writes ``runs/compare/<scale>/<engine>/<cell>/result.json`` when it completes. A cell whose result exists
with the same configuration is not run again, so an interrupted matrix continues where it stopped; the time left
is estimated from the measured times of finished cells of the same kind. Federated cells are real Flower
simulations (``fedlora simulate`` in a subprocess; ``--engine flower``, the default) or in-process rounds with the
same node and aggregation code (``--engine inprocess``); baselines run in this process.

Examples::

    python -m simulations.compare --scale tiny --engine inprocess --threads 1   # the committed results
    python -m simulations.compare --scale full                                  # hours on a CPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.rules.registry import RULE_NAMES
from simulations.compare_cells import (
    BASELINES,
    VARIANTS,
    Cell,
    format_duration,
    quiet_warnings,
    run_cell,
    say,
    set_threads,
)
from simulations.launcher import PROJECT_DIR
from simulations.simulate import parse_set, read_overlay

EXPERIMENTS = PROJECT_DIR / "simulations" / "experiments"
RANK_SETTINGS = ("homogeneous", "heterogeneous")
DATA_SPLITS = ("iid", "dirichlet", "two-labels")
SCALES = ("tiny", "small", "full")
RESULT_FILE = "result.json"
ENGINES = ("flower", "inprocess")


def plan(
    seeds: Sequence[int],
    methods: Sequence[str] = (*RULE_NAMES, *BASELINES),
    ranks: Sequence[str] = RANK_SETTINGS,
    data: Sequence[str] = DATA_SPLITS,
) -> list[Cell]:
    """Every cell, seed-major so that a partial matrix has whole seeds of every configuration."""
    for method in methods:
        if method not in (*RULE_NAMES, *VARIANTS, *BASELINES):
            known = ", ".join((*RULE_NAMES, *VARIANTS, *BASELINES))
            raise ValueError(f"unknown method {method!r}; choose from {known}")
    return [Cell(m, r, d, s) for s in seeds for r in ranks for d in data for m in methods]


def cell_overlay(
    scale: str, cell: Cell, experiments: Path = EXPERIMENTS, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The cell's run config overlay: scale ← ranks ← data ← extra ← rule and seed."""
    overlay: dict[str, Any] = {}
    for name in (f"scale-{scale}", f"ranks-{cell.ranks}", f"data-{cell.data}"):
        overlay.update(read_overlay(experiments / f"{name}.toml"))
    overlay.update(extra or {})
    overlay["seed"] = cell.seed
    if cell.method in RULE_NAMES:
        overlay["rule"] = cell.method
    overlay.update(VARIANTS.get(cell.method, {}))
    return overlay


def fingerprint(cell: Cell, overlay: dict[str, Any], engine: str = "flower") -> str:
    """A short hash of what determines the cell's result (a changed overlay or engine makes an old result stale)."""
    key = {"method": cell.method, "overlay": overlay, "engine": engine if cell.kind == "federated" else "-"}
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_result(cell_dir: Path, expected: str) -> dict[str, Any] | None:
    """The cell's saved result when it is complete and was produced by the same configuration, else None."""
    path = cell_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return result if result.get("fingerprint") == expected else None


def eta_seconds(durations: dict[str, list[float]], remaining: Sequence[Cell]) -> float | None:
    """Time left: each remaining cell at the mean measured time of its kind (else of all cells); None if unknown."""
    every = [s for times in durations.values() for s in times]
    if not every:
        return None
    fallback = statistics.fmean(every)
    return sum(statistics.fmean(durations[c.kind]) if durations.get(c.kind) else fallback for c in remaining)


Runner = Callable[["Cell", dict[str, Any], Path, Callable[[str], None], str], list[dict[str, Any]]]
"""Runs one cell: (cell, overlay, cell folder, echo, engine) → per-round rows."""


def summarise_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the report needs from a cell's rows (accuracy per round, final accuracy, and traffic/time if present)."""
    keep: tuple[str, ...] = ("round", "global_accuracy", "global_loss", "eval_accuracy", "eval_loss")
    keep += ("bytes_up_per_node", "aggregation_seconds", "round_seconds", "global_eval_seconds", "mean_min_rank_energy")
    keep += ("epsilon",)
    final = rows[-1] if rows else {}
    return {
        "rows": [{k: r[k] for k in keep if k in r} for r in rows],
        "final_accuracy": final.get("global_accuracy", final.get("eval_accuracy")),
        "final_nodes_accuracy": final.get("eval_accuracy"),
        "metric": "global" if "global_accuracy" in final else "nodes",
    }


# --- the matrix --------------------------------------------------------------------------------------------------
def run_matrix(
    cells: Sequence[Cell],
    scale: str,
    runs_dir: Path,
    extra: dict[str, Any] | None = None,
    engine: str = "flower",
    runner: Runner = run_cell,
    echo: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the cells that have no current result; return every result (old and new) and the failures."""
    from common.atomic_file import write_json_atomic

    echo = echo or say
    results: dict[str, dict[str, Any]] = {}
    todo: list[Cell] = []
    durations: dict[str, list[float]] = {}
    overlays = {c.name: cell_overlay(scale, c, extra=extra) for c in cells}
    for cell in cells:
        found = load_result(runs_dir / cell.name, fingerprint(cell, overlays[cell.name], engine))
        if found is None:
            todo.append(cell)
        else:
            results[cell.name] = found
            durations.setdefault(cell.kind, []).append(float(found["seconds"]))
    echo(f"compare: {len(cells)} cells at scale {scale!r}: {len(results)} done before, {len(todo)} to run")
    echo(f"compare: estimated time left {format_duration(eta_seconds(durations, todo) if todo else 0.0)}")
    failures = []
    for i, cell in enumerate(todo):
        echo(f"compare: [{i + 1}/{len(todo)}] {cell.name}")
        started = time.monotonic()
        try:
            rows = runner(cell, overlays[cell.name], runs_dir / cell.name, lambda line: echo(f"    {line}"), engine)
        except (RuntimeError, ValueError, FileNotFoundError, FloatingPointError) as err:
            failures.append(f"{cell.name}: {err}")
            echo(f"compare: {cell.name} FAILED: {err}")
            continue
        seconds = time.monotonic() - started
        durations.setdefault(cell.kind, []).append(seconds)
        result = {
            **{"cell": cell.name, "method": cell.method, "ranks": cell.ranks, "data": cell.data, "seed": cell.seed},
            **{"scale": scale, "overlay": overlays[cell.name], "seconds": round(seconds, 1), "engine": engine},
            **{"fingerprint": fingerprint(cell, overlays[cell.name], engine), **summarise_rows(rows)},
        }
        write_json_atomic(runs_dir / cell.name / RESULT_FILE, result)
        results[cell.name] = result
        left = eta_seconds(durations, todo[i + 1 :])
        echo(f"compare: {cell.name} done in {format_duration(seconds)}; about {format_duration(left)} left")
    return [results[c.name] for c in cells if c.name in results], failures


def seed_list(text: str) -> list[int]:
    """``3`` → [0, 1, 2]; ``0,2,3`` → [0, 2, 3]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects N or a comma-separated list, got {text!r}") from None
    if not values or (len(values) == 1 and "," not in text and values[0] < 1):
        raise argparse.ArgumentTypeError(
            f"--seeds needs at least one seed, got {text!r} (N counts seeds 0..N-1; seed {text.strip()} alone is "
            f"'{text.strip()},')"
        )
    return values if "," in text else list(range(values[0]))


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m simulations.compare``."""
    parser = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=SCALES, default="tiny", help="overlay simulations/experiments/scale-*.toml")
    parser.add_argument(
        "--seeds", type=seed_list, default="3", help="N (seeds 0..N-1, default 3) or a list: 0,2,3 (seed 2 alone: 2,)"
    )
    parser.add_argument(
        "--methods", default=",".join((*RULE_NAMES, *BASELINES)), help="comma-separated rules/baselines"
    )
    parser.add_argument("--ranks", default=",".join(RANK_SETTINGS), help="comma-separated rank settings")
    parser.add_argument("--data", default=",".join(DATA_SPLITS), help="comma-separated data splits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="flower",
        help="federated cells as real Flower simulations (default) or in-process rounds with the same node and "
        "aggregation code (no per-message processes; much faster on a small CPU)",
    )
    parser.add_argument("--threads", type=int, help="torch threads per process (1 is fastest for tiny models)")
    parser.add_argument("--runs", type=Path, help="cell folders (default runs/compare/<scale>/<engine>)")
    parser.add_argument("--results", type=Path, default=PROJECT_DIR / "docs" / "results", help="report folder")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished cells only")
    return parser


def finished(
    cells: Sequence[Cell], scale: str, runs_dir: Path, extra: dict[str, Any], engine: str
) -> list[dict[str, Any]]:
    """The current results of ``cells`` that exist (for ``--report-only``): a federated cell run with ``engine``, or
    else with the other engine (the report says which cells ran how)."""
    found = []
    for cell in cells:
        overlay = cell_overlay(scale, cell, extra=extra)
        tries = (engine, *[e for e in ENGINES if e != engine])
        found.append(
            next(filter(None, (load_result(runs_dir / cell.name, fingerprint(cell, overlay, e)) for e in tries)), None)
        )
    return [r for r in found if r is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the matrix, then write ``aggregation.md`` and its plots."""
    from simulations.compare_report import write_report

    args = build_parser().parse_args(argv)
    quiet_warnings()
    if args.threads:
        set_threads(args.threads)
    cells = plan(args.seeds, args.methods.split(","), args.ranks.split(","), args.data.split(","))
    extra = parse_set(args.set)
    runs_dir = args.runs or PROJECT_DIR / "runs" / "compare" / args.scale / args.engine
    started = time.monotonic()
    failures: list[str] = []
    if args.report_only:
        results = finished(cells, args.scale, runs_dir, extra, args.engine)
    else:
        results, failures = run_matrix(cells, args.scale, runs_dir, extra, args.engine)
    report = write_report(
        results,
        args.scale,
        cell_overlay(args.scale, cells[0], extra=extra),
        args.results,
        wall_seconds=time.monotonic() - started,
        planned=len(cells),
        command=" ".join(["python -m simulations.compare", *(argv if argv is not None else sys.argv[1:])]),
        failures=failures,
    )
    print(f"compare: wrote {report} ({len(results)}/{len(cells)} cells)")
    for failure in failures:
        print(f"compare: failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
