"""The coordinator's cost per round at 10 to 1,000 nodes, without training: memory, time, and how they grow.

Run ``python -m simulations.bench_scale`` (a few minutes; ``--nodes 10,100`` for a quick one). For each node count N
a fresh process runs the coordinator's whole round loop — the real :class:`server.engine.RoundEngine` (sampling,
serving every sampled node its rank, validation, aggregation with the run's rule) and the real
:class:`server.recorder.RunRecorder` (metrics files, checkpoint, SQLite run store) — for ``--rounds`` rounds, with
``fraction-train`` = 10 / N (10 nodes per round, as ``fedlora simulate`` would sample them); the replies are the
served factors plus noise, shaped like MiniLM-L6's (18 modules of 384 × 384 at ranks 2, 4, 8, 16 and 32 in turn, and
a 20 × 384 head), so no node trains. Then the same process aggregates all N replies at once.

Printed per N: the peak resident memory of that process, the median time of a round outside training, the time to
aggregate N replies, and each as a ratio to the smallest N: linear growth shows as ratios near N / N_min, a
quadratic one far above. The last line is ``nodes=… peak_rss_mib=… round_s=… aggregate_all_s=…`` per N.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODULES = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "key", "value")]
HIDDEN = 384
LABELS = 20
RANKS = (2, 4, 8, 16, 32)


def reply_for(ins: Any, info: Any, rng: np.random.Generator) -> Any:
    """A node's reply: what it was served (random factors before the first aggregate) plus noise."""
    from common.updates import AdapterFactors, TrainReply

    lora = {}
    for module in MODULES:
        if ins.adapter is not None:
            a, b = ins.adapter.lora[module]
        else:
            a, b = rng.normal(0, 0.05, (info.rank, HIDDEN)), np.zeros((HIDDEN, info.rank))
        lora[module] = (
            (a + rng.normal(0, 1e-3, a.shape)).astype(np.float32),
            (b + rng.normal(0, 1e-3, b.shape)).astype(np.float32),
        )
    head = {"classifier.weight": rng.normal(0, 0.02, (LABELS, HIDDEN)).astype(np.float32)}
    return TrainReply(AdapterFactors(lora, head), int(rng.integers(500, 1500)), info)


def measure(nodes: int, rounds: int, rule: str) -> dict[str, float]:
    """One node count, in this process: rounds through engine and recorder, then one aggregate of every node."""
    import torch

    from common.config import RunConfig
    from common.lora import lora_scaling
    from common.updates import NodeInfo
    from server.engine import RoundEngine
    from server.recorder import RunRecorder

    torch.set_num_threads(1)  # as the benchmarks do: on a shared machine OpenMP threads that lose their core stall
    rng = np.random.default_rng(0)
    settings = {"rule": rule, "num-rounds": rounds, "fraction-train": min(1.0, 10 / nodes), "max-rank": 32}
    cfg = RunConfig.from_mapping(settings)
    infos = {
        n: NodeInfo(r, lora_scaling(cfg.lora.lora_alpha, r), f"node-{n}")
        for n, r in ((n, RANKS[n % len(RANKS)]) for n in range(1, nodes + 1))
    }
    with tempfile.TemporaryDirectory() as tmp:
        engine = RoundEngine(cfg)
        recorder = RunRecorder(cfg, Path(tmp) / "run", "bench", Path(tmp) / "fedlora.db")
        engine.begin(0)
        for node_id, info in infos.items():
            engine.remember(node_id, info, 0)
        recorder.record_round(engine.outcome, engine.checkpoint_state())
        seconds = []
        for rnd in range(1, rounds + 1):
            started = time.perf_counter()
            engine.begin(rnd).available = nodes
            sampled = engine.sample(sorted(infos), cfg.reliability.fraction_train)
            instructions = engine.instructions(sampled, rnd, train=True)
            building = time.perf_counter()
            replies = {n: reply_for(ins, infos[n], rng) for n, ins in instructions.items()}
            built = time.perf_counter() - building
            engine.aggregate_train(replies, [])
            recorder.record_round(engine.outcome, engine.checkpoint_state())
            engine.drain()
            seconds.append(time.perf_counter() - started - built)
        recorder.finish(None, 32, status="completed", reason="")
        everyone = {n: reply_for(engine.instructions([n], rounds + 1, train=True)[n], infos[n], rng) for n in infos}
        engine.begin(rounds + 1)
        started = time.perf_counter()
        engine.aggregate_train(everyone, [])
        aggregate_all = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "nodes": nodes,
        "peak_rss_mib": peak,
        "round_s": statistics.median(seconds),
        "aggregate_all_s": aggregate_all,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--nodes", default="10,100,1000", help="comma-separated node counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rule", default="svd")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: measure one node count
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.rounds, args.rule)))
        return
    results = []
    for n in sorted(int(x) for x in args.nodes.split(",") if x):
        command = [sys.executable, "-m", "simulations.bench_scale", "--one", str(n), "--rounds", str(args.rounds)]
        done = subprocess.run([*command, "--rule", args.rule], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench_scale: {n} nodes failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{n:5d} nodes: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['round_s']:.3f} s per round outside training "
            f"(10 sampled), {r['aggregate_all_s']:.2f} s to aggregate all {n} replies",
            flush=True,
        )
    base = results[0]
    for r in results[1:]:
        scale = r["nodes"] / base["nodes"]
        rss, round_ratio = r["peak_rss_mib"] / base["peak_rss_mib"], r["round_s"] / base["round_s"]
        aggregate = r["aggregate_all_s"] / base["aggregate_all_s"]
        print(
            f"{r['nodes']} vs {base['nodes']} nodes ({scale:g}x): RSS {rss:.2f}x, round {round_ratio:.2f}x, "
            f"aggregate-all {aggregate:.1f}x"
        )
    print(" ".join(f"nodes={r['nodes']} peak_rss_mib={r['peak_rss_mib']:.0f} round_s={r['round_s']:.3f} "
                   f"aggregate_all_s={r['aggregate_all_s']:.2f}" for r in results))  # fmt: skip


if __name__ == "__main__":
    main()
