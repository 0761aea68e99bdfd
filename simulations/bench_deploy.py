"""What a real deployment costs per round over Flower's simulation engine, for the same rounds.

``python -m simulations.bench_deploy`` runs each task three ways on this machine: simulated (``fedlora simulate``,
2 nodes), deployed with warm nodes (a TLS SuperLink with node authentication and two ``fedlora client`` processes on
127.0.0.1, :mod:`simulations.local_deploy`; they take the next message within 0.2 s of a reply,
:mod:`client.supernode_poll`), and deployed cold (``fedlora client --cold --prompt-window 0``: Flower's default, a
fresh ClientApp process per message that loads the model and data again, and a SuperNode that polls every 3 s).
A round's time is the coordinator's ``round_seconds`` (metrics.json), averaged over rounds 1.. (round 0 also pays
each side's start-up). Tasks:

- ``tiny``: the tiny model on the synthetic 4-topic task, ranks 2 and 8 (what ``tests/test_deploy_run.py`` runs);
- ``minilm``: the default task's node recipe (MiniLM-L6 on 20 Newsgroups, 10 local steps of 16 posts at 64 tokens,
  held-out evaluation of 100 posts per node every round), ranks 4 and 8, without the coordinator's global evaluation
  (``global-eval-examples = 0``), so the ratio compares the nodes' work and its transport only.

It writes ``bench-deploy.json`` under ``--out`` and prints, last, ``ratio_minilm=X overhead_tiny_s=Y``: X the warm
deployed/simulated time per round on MiniLM, Y the warm deployed round's extra seconds over the simulated one on the
tiny task.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.local_deploy import local_federation

PROJECT_DIR = Path(__file__).resolve().parents[1]
RANKS = (2, 8)
TASKS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": "tiny", "task": "tiny", "node-ranks": "2,8", "local-steps": 15, "learning-rate": 0.02,
        "baseline-learning-rate": 0.02, "head-lr-ratio": 1.0, "max-length": 16,
    },
    "minilm": {
        "model": "minilm-l6", "task": "newsgroups", "node-ranks": "4,8", "local-steps": 10, "batch-size": 16,
        "max-length": 64, "eval-examples": 100, "global-eval-examples": 0,
    },
}  # fmt: skip
MODES = ("simulated", "warm", "cold")
THREADS = max(1, (os.cpu_count() or 1) // len(RANKS))
"""CPU threads per device: this machine's cores shared by the two devices, as Flower's simulation shares them (Ray
gives each node ``--cpus-per-node`` 1 core and sets ``OMP_NUM_THREADS`` to match)."""


def install_size(site_packages: Path) -> dict[str, float]:
    """MiB installed in ``site_packages``: torch with what it requires, transformers with what it requires beyond
    that, and the rest (fedlora, peft, flwr and their requirements; pip itself not counted)."""
    dists = {_norm(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(site_packages)])}

    def closure(name: str, seen: set[str]) -> set[str]:
        if name in dists and name not in seen:
            seen.add(name)
            for requirement in dists[name].requires or []:
                if "extra ==" not in requirement:
                    closure(_norm(re.split(r"[ ;<>=!~\[(]", requirement.strip())[0]), seen)
        return seen

    def mib(names: set[str]) -> float:
        files = [dists[n].locate_file(f) for n in names for f in dists[n].files or []]
        return round(sum(Path(str(f)).stat().st_size for f in files if Path(str(f)).is_file()) / 2**20, 1)

    torch = closure("torch", set())
    transformers = closure("transformers", set()) - torch
    rest = set(dists) - torch - transformers - {"pip"}
    return {"torch": mib(torch), "transformers": mib(transformers), "rest": mib(rest)}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def per_round(out_dir: Path) -> float:
    """Mean ``round_seconds`` of rounds 1.. in a run's metrics.json."""
    rows = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    return float(statistics.mean(row["round_seconds"] for row in rows if row["round"] > 0))


def simulated(settings: dict[str, Any], out: Path) -> float:
    """``fedlora simulate`` with 2 nodes; its time per round."""
    flags = [f"--set={key}={json.dumps(value)}" for key, value in settings.items()]
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--nodes", "2", "--out", str(out / "run")]
    done = subprocess.run([*command, "--store", str(out / "fedlora.db"), *flags], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the simulation failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return per_round(out / "run")


def deployed(settings: dict[str, Any], out: Path, cold: bool) -> float:
    """The same run on a local deployment of two ``fedlora client`` devices; its time per round."""
    ranks = [int(r) for r in str(settings["node-ranks"]).split(",")]
    with local_federation(out / "deployment", nodes=len(ranks)) as federation:
        devices = []
        for index, rank in enumerate(ranks):
            args = ["--model", settings["model"], "--data", settings["task"], "--rank", str(rank)]
            args += ["--partition-id", str(index), "--num-partitions", str(len(ranks)), "--name", f"node-{index}"]
            args += ["--threads", str(THREADS)]
            devices.append([*args, "--cold", "--prompt-window", "0"] if cold else args)
        federation.start_devices(devices)
        outputs = {"out-dir": str(out / "run"), "store": str(out / "fedlora.db"), "min-nodes": len(ranks)}
        status = federation.run(PROJECT_DIR, {**settings, **outputs}, timeout=3600)
    if status != "finished:completed":
        raise RuntimeError(f"the deployed run ended {status}; logs under {out / 'deployment' / 'logs'}")
    return per_round(out / "run")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-deploy"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (round 0, the start-up, not counted)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--install-size", type=Path, metavar="SITE_PACKAGES", help="only measure an install's size")
    args = parser.parse_args(argv)
    if args.install_size:
        print(json.dumps(install_size(args.install_size)))
        return 0
    tasks, modes = args.tasks.split(","), args.modes.split(",")
    if not set(tasks) <= set(TASKS) or not set(modes) <= set(MODES) or args.rounds < 2:
        parser.error(f"--tasks from {', '.join(TASKS)}, --modes from {', '.join(MODES)}, --rounds at least 2")
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        settings = {**TASKS[task], "num-rounds": args.rounds}
        for mode in modes:
            started, out = time.monotonic(), args.out / f"{task}-{mode}"
            seconds = simulated(settings, out) if mode == "simulated" else deployed(settings, out, mode == "cold")
            results.setdefault(task, {})[mode] = round(seconds, 2)
            print(f"bench_deploy: {task} {mode}: {seconds:.1f} s per round ({time.monotonic() - started:.0f} s in all)")
            (args.out / "bench-deploy.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    summary = []
    if {"simulated", "warm"} <= set(results.get("minilm", {})):
        summary.append(f"ratio_minilm={results['minilm']['warm'] / results['minilm']['simulated']:.2f}")
    if {"simulated", "warm"} <= set(results.get("tiny", {})):
        summary.append(f"overhead_tiny_s={results['tiny']['warm'] - results['tiny']['simulated']:.1f}")
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
