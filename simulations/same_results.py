"""``python -m simulations.same_results``: show that two checkouts give the same runs (a refactor changed nothing).

``run`` executes a fixed matrix of ``fedlora simulate`` runs with a given ``fedlora`` executable (this checkout's by
default, or another checkout's, e.g. ``/tmp/old/.venv/bin/fedlora``) into one folder per cell:

- the tiny task (3 nodes, ranks 2/4/8, 3 rounds) with every rule (``svd`` with and without keep-residual,
  ``fedavg``, ``ffa``), every rule under central DP, the linear rules under SecAgg+, and ``svd`` under local DP
  (DP noise from a fixed ``noise-seed``, so runs repeat);
- with ``--demo``, the default demo (``fedlora simulate`` with no overrides: MiniLM on 20 Newsgroups, about 10 min).

``compare A B`` reads both folders and checks, cell by cell, that every ``metrics.csv`` accuracy and loss agrees to
4 decimals and that every tensor of the exported adapter agrees within 1e-5 relative (to the tensor's largest
magnitude). It prints one line per cell and exits 1 when any cell differs or is missing.

::

    python -m simulations.same_results run /tmp/before --fedlora /tmp/old/.venv/bin/fedlora --demo
    python -m simulations.same_results run /tmp/after --demo
    python -m simulations.same_results compare /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TINY: dict[str, Any] = {
    "model": "tiny",
    "task": "tiny",
    "node-ranks": "2,4,8",
    "local-steps": 15,
    "learning-rate": 0.02,
    "baseline-learning-rate": 0.02,
    "head-lr-ratio": 1.0,
    "max-length": 16,
    "num-rounds": 3,
}
"""The tiny task of the tests, one round longer."""
CENTRAL_DP = {"dp": "central", "noise-multiplier": 0.3, "clip-norm": 5.0, "noise-seed": 7}
LOCAL_DP = {"dp": "local", "noise-multiplier": 0.5, "max-grad-norm": 1.0, "noise-seed": 7}
CELLS: dict[str, dict[str, Any]] = {
    "svd": {"rule": "svd"},
    "svd-plain": {"rule": "svd", "keep-residual": False},
    "fedavg": {"rule": "fedavg"},
    "ffa": {"rule": "ffa"},
    "svd-central-dp": {"rule": "svd", **CENTRAL_DP},
    "fedavg-central-dp": {"rule": "fedavg", **CENTRAL_DP},
    "ffa-central-dp": {"rule": "ffa", **CENTRAL_DP},
    "fedavg-secagg": {"rule": "fedavg", "secure-aggregation": True},
    "ffa-secagg": {"rule": "ffa", "secure-aggregation": True},
    "svd-local-dp": {"rule": "svd", **LOCAL_DP},
}
"""Tiny-task cells: overrides on top of :data:`TINY`."""
COMPARED_COLUMNS = ("eval_accuracy", "eval_loss", "train_loss")
DECIMALS = 4
ADAPTER_RTOL = 1e-5


def run_cell(fedlora: str, out: Path, settings: dict[str, Any], nodes: int | None) -> int:
    """One ``fedlora simulate`` into ``out/run``; its output goes to ``out/simulate.log``."""
    out.mkdir(parents=True, exist_ok=True)
    command = [fedlora, "simulate", "--out", str(out / "run"), "--store", str(out / "fedlora.db")]
    if nodes is not None:
        command += ["--nodes", str(nodes)]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    with (out / "simulate.log").open("w", encoding="utf-8") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def run(folder: Path, fedlora: str, demo: bool, only: list[str]) -> int:
    """Run every cell (and the demo) that has no finished run in ``folder`` yet; resumable."""
    cells = {name: {**TINY, **over} for name, over in CELLS.items() if not only or name in only}
    if demo and (not only or "demo" in only):
        cells["demo"] = {}
    failed = 0
    for name, settings in cells.items():
        cell = folder / name
        if (cell / "run" / "summary.txt").is_file():
            print(f"{name}: done before, kept", flush=True)
            continue
        started = time.time()
        code = run_cell(fedlora, cell, settings, 3 if name != "demo" else None)
        failed += code != 0
        print(f"{name}: exit {code} in {time.time() - started:.0f} s", flush=True)
    return 1 if failed else 0


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv``."""
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def compare_metrics(a: Path, b: Path) -> list[str]:
    """Differences between two ``metrics.csv`` in the compared columns, rounded to :data:`DECIMALS`."""
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    if len(rows_a) != len(rows_b):
        return [f"{len(rows_a)} rows against {len(rows_b)}"]
    problems = []
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for column in COMPARED_COLUMNS:
            x, y = _rounded(row_a.get(column)), _rounded(row_b.get(column))
            if x != y:
                problems.append(f"round {row_a['round']} {column}: {x} against {y}")
    return problems


def _rounded(value: str | None) -> str:
    if value in (None, ""):
        return ""
    number = float(value)
    return f"{number:.{DECIMALS}f}" if math.isfinite(number) else str(number)


def compare_adapters(a: Path, b: Path) -> tuple[list[str], float]:
    """Differences between two exported adapters, and the largest relative difference of any tensor."""
    from safetensors.numpy import load_file

    tensors_a, tensors_b = load_file(str(a)), load_file(str(b))
    if set(tensors_a) != set(tensors_b):
        return [f"keys differ: {sorted(set(tensors_a) ^ set(tensors_b))[:3]}"], math.inf
    worst, problems = 0.0, []
    for key, x in tensors_a.items():
        y = tensors_b[key]
        if x.shape != y.shape:
            problems.append(f"{key}: shape {x.shape} against {y.shape}")
            continue
        scale = max(float(abs(x).max()), float(abs(y).max()), 1e-30)
        relative = float(abs(x.astype("float64") - y.astype("float64")).max()) / scale
        worst = max(worst, relative)
        if relative > ADAPTER_RTOL:
            problems.append(f"{key}: relative difference {relative:.2e}")
    return problems, worst


def compare(first: Path, second: Path) -> int:
    """Compare every cell present in either folder; 0 when all agree."""
    names = sorted({p.name for p in first.iterdir() if p.is_dir()} | {p.name for p in second.iterdir() if p.is_dir()})
    bad = 0
    for name in names:
        runs = [first / name / "run", second / name / "run"]
        missing = [str(r) for r in runs if not (r / "metrics.csv").is_file()]
        if missing:
            print(f"{name}: MISSING {', '.join(missing)}")
            bad += 1
            continue
        problems = compare_metrics(runs[0] / "metrics.csv", runs[1] / "metrics.csv")
        adapters = [r / "adapter" / "adapter_model.safetensors" for r in runs]
        worst = 0.0
        if all(p.is_file() for p in adapters):
            adapter_problems, worst = compare_adapters(*adapters)
            problems += adapter_problems
        elif any(p.is_file() for p in adapters):
            problems.append("only one run exported an adapter")
        rows = len(read_metrics(runs[0] / "metrics.csv"))
        verdict = "same" if not problems else "DIFFERENT"
        print(f"{name}: {verdict} ({rows} rounds in metrics.csv, adapter max relative difference {worst:.1e})")
        for problem in problems[:10]:
            print(f"    {problem}")
        bad += bool(problems)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m simulations.same_results", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run the matrix into a folder (resumable)")
    run_parser.add_argument("folder", type=Path)
    run_parser.add_argument("--fedlora", default=str(Path(sys.executable).parent / "fedlora"), help="executable")
    run_parser.add_argument("--demo", action="store_true", help="also the default demo (about 10 min)")
    run_parser.add_argument("--only", action="append", default=[], metavar="CELL", help="run only these cells")
    compare_parser = sub.add_parser("compare", help="compare two folders written by `run`")
    compare_parser.add_argument("first", type=Path)
    compare_parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.folder, args.fedlora, args.demo, args.only)
    return compare(args.first, args.second)


if __name__ == "__main__":
    sys.exit(main())
