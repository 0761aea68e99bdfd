"""``fedlora simulate`` and ``fedlora resume``: the default federated task on Flower's simulation engine."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.config import RunConfig
from server.checkpoint import load_latest_checkpoint
from server.run_lock import check_free
from simulations.launcher import PROJECT_DIR, run_simulation

MAX_NODES = 10_000
"""Most simulated nodes a run may ask for."""
LAUNCHER_KEYS = ("num-nodes",)
"""Overlay keys that configure the launcher rather than the Flower run."""
STARTUP_ALLOWANCE_S = 900.0
"""Seconds a run may spend starting (SuperLink, Ray, the app) and exporting, on top of its rounds."""
ROUND_SLACK_S = 300.0
"""Seconds per round for work that is not a wait: aggregation, checkpoint, run store."""


class UsageError(ValueError):
    """Bad command-line input; the CLI prints the message on one line and exits 2."""


def app_defaults() -> dict[str, Any]:
    """The run config declared in ``[tool.flwr.app.config]`` of the project's pyproject.toml."""
    with (PROJECT_DIR / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def read_overlay(path: Path) -> dict[str, Any]:
    """A flat TOML file of kebab-case keys (an experiment overlay); every problem with it names the file."""
    if not path.exists():
        raise UsageError(f"config file {path} does not exist")
    if not path.is_file():
        raise UsageError(f"config file {path} is not a file (a TOML file of key = value lines is expected)")
    try:
        values = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text: is it the TOML file you meant?") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None
    tables = [key for key, value in values.items() if isinstance(value, dict)]
    if tables:
        raise UsageError(f"config file {path} has a table [{tables[0]}]; an overlay is flat key = value lines")
    return values


def merged_config(overlay: dict[str, Any], flags: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Defaults ← overlay ← flags; returns the run config and the launcher's node count (if set)."""
    defaults = app_defaults()
    merged = dict(defaults)
    num_nodes = None
    for source in (overlay, flags):
        for key, value in source.items():
            if key in LAUNCHER_KEYS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise UsageError(f"num-nodes must be an integer, got {value!r}")
                num_nodes = value
            elif key not in defaults:
                raise UsageError(f"unknown config key {key!r}; known keys: {', '.join(sorted(defaults))}")
            else:
                merged[key] = value
    return merged, num_nodes


def check_inputs(cfg: RunConfig, num_nodes: int) -> None:
    """Fail fast, before any process starts, on what would make every node fail (:mod:`client.preflight`), and
    say how the data is split."""
    from client.preflight import check_run

    for line in check_run(cfg, num_nodes):
        print(f"fedlora: {line}", flush=True)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``simulate`` and ``centralized``."""
    parser.add_argument("--config", type=Path, help="TOML overlay of run-config keys (see simulations/experiments/)")
    parser.add_argument("--rounds", type=int, help="federated rounds (num-rounds)")
    parser.add_argument("--rule", help="aggregation rule: svd, fedavg or ffa")
    parser.add_argument("--seed", type=int, help="seed for partitions, initialisation and sampling")
    parser.add_argument("--out", type=Path, help="output folder (default runs/<timestamp>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run-config key")


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys set by flags."""
    flags: dict[str, Any] = {}
    for key, name in (("num-rounds", "rounds"), ("rule", "rule"), ("seed", "seed")):
        if getattr(args, name, None) is not None:
            flags[key] = getattr(args, name)
    if getattr(args, "nodes", None) is not None:
        flags["num-nodes"] = args.nodes
    flags.update(parse_set(args.set))
    return flags


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` overrides, the value read as TOML (a bare word that is not TOML becomes a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def resolve_run(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any], int]:
    """Parse and validate everything a run needs; returns the typed config, the raw mapping and the node count."""
    overlay = read_overlay(args.config) if args.config else {}
    merged, num_nodes = merged_config(overlay, flag_values(args))
    out = args.out or Path(time.strftime("runs/%Y%m%d-%H%M%S"))
    merged["out-dir"] = str(out.resolve())
    if getattr(args, "store", None):
        merged["store"] = str(Path(args.store).resolve())
    cfg = RunConfig.from_mapping(merged)
    nodes = num_nodes if num_nodes is not None else len(cfg.lora.node_ranks)
    if not 1 <= nodes <= MAX_NODES:
        raise UsageError(f"--nodes must be in 1..{MAX_NODES}, got {nodes}")
    if nodes < cfg.reliability.min_nodes:
        raise UsageError(f"--nodes {nodes} is fewer than min-nodes {cfg.reliability.min_nodes}")
    check_free(Path(cfg.output.out_dir))
    check_inputs(cfg, nodes)
    return cfg, merged, nodes


def run_deadline(cfg: RunConfig) -> float:
    """The longest a run can take when every wait in it runs out (the launcher stops it after that).

    Per round the coordinator waits at most: ``round-timeout`` for nodes to connect, before training and again
    before evaluation; ``min(round-timeout, 120)`` for nodes it has not met to tell their rank, up to twice per
    phase (before sampling a subset, before sending factors); ``round-timeout`` for the train replies and again for
    the evaluate replies. Round 0 (evaluation only) counts as a round.
    """
    per_round = 4 * cfg.reliability.round_timeout + 4 * min(cfg.reliability.round_timeout, 120.0) + ROUND_SLACK_S
    return STARTUP_ALLOWANCE_S + (cfg.num_rounds + 1) * per_round


def launch(cfg: RunConfig, nodes: int, verbose: bool, cpus_per_node: int = 1, gpus_per_node: float = 0.0) -> int:
    """Run the federation, echoing per-round progress; 0 when the run completed."""
    if cpus_per_node < 1:
        raise UsageError(f"--cpus-per-node must be at least 1, got {cpus_per_node}")
    if not 0.0 <= gpus_per_node <= 64.0:
        raise UsageError(f"--gpus-per-node must be in [0, 64], got {gpus_per_node}")
    if gpus_per_node > 0 and not _cuda_available():
        raise UsageError(f"--gpus-per-node {gpus_per_node}: torch sees no CUDA GPU on this machine")
    out_dir = Path(cfg.output.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    launch_info = {"num-nodes": nodes, "cpus-per-node": cpus_per_node, "gpus-per-node": gpus_per_node}
    (out_dir / "launch.json").write_text(json.dumps(launch_info) + "\n", encoding="utf-8")
    print(f"fedlora: {nodes} nodes, rule {cfg.rule}, {cfg.num_rounds} rounds, model {cfg.model}, task {cfg.task}")
    print(f"fedlora: outputs in {out_dir} (Flower logs: {out_dir / 'flwr.log'})", flush=True)

    last: list[str] = [""]

    def on_line(line: str) -> None:
        if verbose:
            print(line, flush=True)
        elif "fedlora |" in line or "ERROR" in line or "Traceback" in line:
            text = line.split("fedlora | ", 1)[-1]
            if text != last[0]:  # Flower and the root logger may both echo a line
                print(text, flush=True)
            last[0] = text

    outcome = run_simulation(
        cfg.to_mapping(), nodes, out_dir, on_line, cpus_per_node, run_deadline(cfg), gpus_per_node=gpus_per_node
    )
    summary = out_dir / "summary.txt"
    if summary.is_file():
        print(summary.read_text(encoding="utf-8"), end="")
    print(f"fedlora: run {outcome.run_id} {outcome.status} in {outcome.seconds:.0f} s", flush=True)
    return 0 if outcome.ok else 1


def simulate(args: argparse.Namespace) -> int:
    """``fedlora simulate``."""
    if args.cpus_per_node < 1:
        raise UsageError(f"--cpus-per-node must be at least 1, got {args.cpus_per_node}")
    cfg, _, nodes = resolve_run(args)
    return launch(cfg, nodes, args.verbose, args.cpus_per_node, args.gpus_per_node)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object written by a run (``config.json``, ``launch.json``), or a UsageError naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not the {what} a run writes: {err}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__}, not the {what} a run writes")
    return value


def resume(args: argparse.Namespace) -> int:
    """``fedlora resume RUN_DIR``: continue a run from its last complete checkpoint."""
    run_dir = Path(args.run_dir).resolve()
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise UsageError(f"{run_dir} is not a fedlora run folder (no config.json)")
    merged = read_json_object(saved, "run config")
    merged.pop("run-id", None)
    merged.update({"resume": True, "out-dir": str(run_dir)})
    cfg = RunConfig.from_mapping(merged)
    if not any((run_dir / "checkpoints").glob("round-*.ckpt")):
        raise UsageError(f"{run_dir} has no checkpoint to resume from")
    check_free(run_dir)
    # the coordinator makes the same choice; checking here names a bad file on the console and fails fast
    checkpoint = load_latest_checkpoint(run_dir / "checkpoints", required=True)
    print(f"fedlora: resuming from {checkpoint.path.name} (after round {checkpoint.server_round})", flush=True)
    launch_file = run_dir / "launch.json"
    previous = read_json_object(launch_file, "launch record") if launch_file.is_file() else {}
    nodes = args.nodes or _count(previous, "num-nodes", len(cfg.lora.node_ranks))
    cpus = args.cpus_per_node or _count(previous, "cpus-per-node", DEFAULT_CPUS_PER_NODE)
    gpus = previous.get("gpus-per-node", 0.0) if args.gpus_per_node is None else args.gpus_per_node
    if isinstance(gpus, bool) or not isinstance(gpus, int | float):
        raise UsageError(f"launch.json has gpus-per-node = {gpus!r}; expected a number")
    check_inputs(cfg, nodes)
    return launch(cfg, nodes, args.verbose, cpus, float(gpus))


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _count(record: dict[str, Any], key: str, default: int) -> int:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"launch.json has {key} = {value!r}; expected a positive integer")
    return value


DEFAULT_CPUS_PER_NODE = 1
GPUS_HELP = (
    "GPUs per simulated node (Flower's client resources; default 0): on a CUDA machine give each node a share, e.g. "
    "0.25 for four nodes on one GPU; with 0 the simulation engine hides the GPU from the nodes"
)
CPUS_HELP = (
    "CPU cores per simulated node (Flower's client resources; default 1): as many nodes train at once as the machine "
    "has cores, each on one torch thread, which on CPUs is faster than one node on all of them"
)


def add_parsers(subparsers: Any) -> None:
    """Register ``simulate`` and ``resume``."""
    sim = subparsers.add_parser("simulate", help="run a federated simulation on this machine")
    add_run_flags(sim)
    sim.add_argument("--nodes", type=int, help="simulated nodes (default: one per entry of node-ranks)")
    sim.add_argument("--store", help="SQLite run store (default: fedlora.db next to the run folder)")
    sim.add_argument("--resume", dest="resume_dir", type=Path, help="continue this run folder instead")
    sim.add_argument("--verbose", action="store_true", help="show Flower's full log")
    sim.add_argument("--cpus-per-node", type=int, default=DEFAULT_CPUS_PER_NODE, help=CPUS_HELP)
    sim.add_argument("--gpus-per-node", type=float, default=0.0, help=GPUS_HELP)
    sim.set_defaults(handler=lambda a: resume_from(a) if a.resume_dir else simulate(a))
    res = subparsers.add_parser("resume", help="continue a run from its last complete checkpoint")
    res.add_argument("run_dir", help="the run folder (it holds config.json and checkpoints/)")
    res.add_argument("--nodes", type=int, help="simulated nodes (default: as before)")
    res.add_argument("--verbose", action="store_true", help="show Flower's full log")
    res.add_argument("--cpus-per-node", type=int, help=CPUS_HELP.replace("default 1", "default: as before"))
    res.add_argument("--gpus-per-node", type=float, help=GPUS_HELP.replace("default 0", "default: as before"))
    res.set_defaults(handler=resume)


def resume_from(args: argparse.Namespace) -> int:
    """``fedlora simulate --resume RUN_DIR``."""
    args.run_dir = args.resume_dir
    return resume(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `fedlora simulate` command")
