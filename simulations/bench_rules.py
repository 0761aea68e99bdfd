"""The cost of every aggregation rule on LLaMA-7B-shaped modules, measured against ``svd`` in the same run.

Run ``python -m simulations.bench_rules`` (a few minutes on 2 cores; ``--quick``: seconds). The round is
``simulations.bench_aggregation``'s: 10 clients at ranks {4, 8, 16, 32, 64} twice, 4096 × 4096 modules (q, k, v, o
of ``--layers`` layers; the full model has 32, and every rule's cost is the same per module, so the ratios hold for
it), after one earlier round so that a global exists to serve from (keep-residual and the robust rules' changes
need it). Each rule aggregates the whole adapter (:meth:`common.rules.base.Rule.aggregate_adapter`) ``--repeats``
times, the rules interleaved; reported are the median wall seconds per module, the projected seconds for the 128
modules of LLaMA-7B, and the ratio to ``svd`` (with keep-residual, the default) of the same run. One torch thread
(see ``bench_aggregation``). The last line is ``<rule>_over_svd=…`` for every rule.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from common.rules.base import Rule
from common.rules.raflora import RaFLoRA
from common.rules.robust import RFA, MultiKrum
from common.rules.svd import SVD
from common.updates import AdapterFactors, NodeInfo, TrainReply
from simulations.bench_aggregation import CLIENT_RANKS, LLAMA_7B_MODULES, make_round

LLAMA_7B_LAYERS = 32
STORE_RANK = 64


def rules() -> dict[str, Rule]:
    """The rules measured, by the name the report uses (fedavg and ffa cost a fraction of svd: bench_comm)."""
    return {
        "svd": SVD(keep_residual=True),
        "svd-plain": SVD(keep_residual=False),
        "raflora": RaFLoRA(),
        "rfa": RFA(keep_residual=True),
        "multikrum": MultiKrum(keep_residual=True, byzantine_nodes=2),
    }


def make_replies(layers: int, dim: int, generator: torch.Generator) -> list[TrainReply]:
    """One reply per client over ``layers`` × (q, k, v, o) modules of dim × dim."""
    lora: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in CLIENT_RANKS]
    scalings: list[float] = []
    counts: list[float] = []
    for layer in range(layers):
        for name in LLAMA_7B_MODULES:
            clients, weights, _ = make_round(dim, generator)
            for i, (a, b, _) in enumerate(clients):
                lora[i][f"layers.{layer}.{name}"] = (a.numpy(), b.numpy())
            scalings, counts = [s for _, _, s in clients], weights
    return [
        TrainReply(AdapterFactors(lora[i], {}), int(counts[i]), NodeInfo(r, scalings[i], f"client-{i}"))
        for i, r in enumerate(CLIENT_RANKS)
    ]


def measure(layers: int, dim: int, repeats: int, seed: int) -> dict[str, float]:
    """Median wall seconds per module of every rule's aggregate, interleaved over ``repeats`` rounds."""
    generator = torch.Generator().manual_seed(seed)
    previous = SVD().aggregate_adapter(None, make_replies(layers, dim, generator), STORE_RANK)
    replies = make_replies(layers, dim, generator)
    modules = layers * len(LLAMA_7B_MODULES)
    seconds: dict[str, list[float]] = {name: [] for name in rules()}
    for repeat in range(repeats):
        for name, rule in rules().items():
            start = time.perf_counter()
            rule.aggregate_adapter(previous, replies, STORE_RANK)
            seconds[name].append((time.perf_counter() - start) / modules)
        print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()))
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the ratio line last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1024 × 1024 modules, for a smoke run of seconds")
    parser.add_argument("--layers", type=int, default=1, help="transformer layers measured (4 modules each)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per rule (interleaved; the median is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dim = 1024 if args.quick else 4096
    per_module = measure(args.layers, dim, args.repeats, args.seed)
    base = per_module["svd"]
    print(f"{args.layers * 4} modules of {dim} x {dim}, ranks {list(CLIENT_RANKS)}, median of {args.repeats} rounds")
    for name, value in per_module.items():
        projected = value * LLAMA_7B_LAYERS * len(LLAMA_7B_MODULES)
        print(f"  {name:10s} {value:7.3f} s per module, {projected:7.1f} s for LLaMA-7B's 128, {value / base:.2f}x svd")
    print(" ".join(f"{name}_over_svd={value / base:.2f}" for name, value in per_module.items()))


if __name__ == "__main__":
    main()
