"""Benchmark the factored ``svd_reproject`` against the dense FlexLoRA-style reference, on CPU.

Run ``python -m simulations.bench_aggregation`` (1.5 to 3.5 minutes on a busy 2-core machine; ``--quick``: seconds).

1. out = in = 1024 and 2048, 10 clients with ranks {4, 8, 16, 32, 64} twice (R = Σ r_i = 248), float32: the dense
   reference (what FlexLoRA's code does: materialise ΔW̄ = Σ p_i s_i B_i A_i, ``torch.linalg.svd``, truncate for
   each client; here one SVD serves all ten) against ``svd_reproject`` on the same inputs, interleaved and repeated.
   The ratio of the medians is taken in CPU time of the process, which on a shared machine counts only the time
   this run held a core; wall-clock medians and their ratio are printed too. Also the largest relative Frobenius
   difference of the reconstructed s·B·A between the two.
2. A LLaMA-7B-shaped round: q, k, v, o of 32 layers (4096 × 4096) with the same 10 clients. The coordinator holds
   every client's upload, aggregates module by module and keeps every client's new factors (it has to send them);
   reported are the total aggregation time (wall clock) and the peak resident memory above the level before the
   round, over the bytes of the uploads. Resident memory is read from ``/proc/self/statm`` before and from the
   process's high-water mark after (``tracemalloc`` would not see torch's allocations).

Both sides run on one torch thread by default (``--threads`` to change it), so the ratios compare work rather than
how well OpenMP spreads small LAPACK calls, and because on a shared machine OpenMP threads that lose their core
stall: at a load average of 7 on 2 cores, 2 threads made the dense 1024 SVD 40x slower than 1 thread did.

The last line is ``ratio_vs_dense_1024=… ratio_vs_dense_2048=… llama7b_round_s=… peak_extra_over_input=…
max_rel_diff=…`` (with ``--quick``, smaller sizes and keys named after them).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.rules.factored_svd import svd_reproject
from common.rules.factors import FactorPair

CLIENT_RANKS = (4, 8, 16, 32, 64) * 2
LORA_ALPHA = 16.0
LLAMA_7B_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

Clients = list[tuple[torch.Tensor, torch.Tensor, float]]
Targets = list[tuple[int, float]]


@dataclass(frozen=True)
class Setup:
    """Sizes of one benchmark run."""

    sizes: tuple[int, int]
    """out = in of the two head-to-head comparisons."""
    repeats: tuple[int, int]
    """Dense runs per size (the factored rule runs ``FACTORED_PER_DENSE`` times per dense run)."""
    round_layers: int
    """Transformer layers in the LLaMA-shaped round (4 modules each)."""
    round_dim: int
    """out = in of every module of the round."""


FULL = Setup(sizes=(1024, 2048), repeats=(7, 5), round_layers=32, round_dim=4096)
QUICK = Setup(sizes=(256, 512), repeats=(3, 3), round_layers=2, round_dim=1024)
FACTORED_PER_DENSE = 5


def make_round(dim: int, generator: torch.Generator) -> tuple[Clients, list[float], Targets]:
    """10 clients of one dim × dim module: Kaiming-like A, trained-looking B, α/r and α/√r (rsLoRA) alternating."""
    clients: Clients = []
    targets: Targets = []
    for i, r in enumerate(CLIENT_RANKS):
        scaling = LORA_ALPHA / (math.sqrt(r) if i % 2 else r)
        lora_A = torch.randn(r, dim, generator=generator) / math.sqrt(dim)  # (r, in)
        lora_B = torch.randn(dim, r, generator=generator) * 0.01  # (out, r)
        clients.append((lora_A, lora_B, scaling))
        targets.append((r, scaling))
    weights = [float(n) for n in torch.randint(50, 500, (len(CLIENT_RANKS),), generator=generator)]
    return clients, weights, targets


def dense_reproject(clients: Clients, weights: Sequence[float], targets: Targets) -> list[FactorPair]:
    """FlexLoRA's way: build ΔW̄ (out × in), full SVD, truncate and split B = U Σ^½ / √s, A = Σ^½ Vᵀ / √s."""
    total = sum(weights)
    lora_A0, lora_B0, _ = clients[0]
    delta = torch.zeros(lora_B0.shape[0], lora_A0.shape[1], dtype=lora_A0.dtype)  # (out, in)
    for w, (lora_A, lora_B, scaling) in zip(weights, clients, strict=True):
        delta.addmm_(lora_B, lora_A, alpha=w / total * scaling)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    pairs = []
    for rank, scaling in targets:
        root = torch.sqrt(s[:rank] / scaling)
        pairs.append((root[:, None] * vh[:rank], u[:, :rank] * root))
    return pairs


def max_rel_diff(x: list[FactorPair], y: list[FactorPair], targets: Targets) -> float:
    """max over targets of ‖s·B_x·A_x − s·B_y·A_y‖_F / ‖s·B_y·A_y‖_F, in float64."""
    worst = 0.0
    for (a_x, b_x), (a_y, b_y), (_, scaling) in zip(x, y, targets, strict=True):
        ref = scaling * (b_y.double() @ a_y.double())
        worst = max(worst, float((scaling * (b_x.double() @ a_x.double()) - ref).norm() / ref.norm()))
    return worst


@dataclass
class Timings:
    """Wall-clock and CPU seconds of repeated runs of one function."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self, fn: Callable[[], object]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)

    def median_ms(self, last: int | None = None) -> tuple[float, float]:
        """Median (wall, CPU) milliseconds, of the ``last`` runs only if given."""
        wall, cpu = (self.wall, self.cpu) if last is None else (self.wall[-last:], self.cpu[-last:])
        return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def head_to_head(dim: int, repeats: int, generator: torch.Generator) -> tuple[float, float]:
    """Return (dense / factored median CPU time, max relative difference) at out = in = ``dim``."""
    clients, weights, targets = make_round(dim, generator)
    dense, factored = dense_reproject(clients, weights, targets), svd_reproject(clients, weights, targets)  # warm-up
    diff = max_rel_diff(factored, dense, targets)
    dense_t, factored_t = Timings(), Timings()
    for i in range(repeats):  # interleaved, so a burst of load on this shared machine hits both
        dense_t.run(lambda: dense_reproject(clients, weights, targets))
        for _ in range(FACTORED_PER_DENSE):
            factored_t.run(lambda: svd_reproject(clients, weights, targets))
        (d_wall, d_cpu), (f_wall, f_cpu) = dense_t.median_ms(last=1), factored_t.median_ms(last=FACTORED_PER_DENSE)
        print(
            f"  {dim}: repeat {i + 1}/{repeats}: dense {d_wall:.0f} ms wall / {d_cpu:.0f} ms CPU, "
            f"factored {f_wall:.1f} / {f_cpu:.1f} ms",
            flush=True,
        )
    (d_wall, d_cpu), (f_wall, f_cpu) = dense_t.median_ms(), factored_t.median_ms()
    print(
        f"{dim} x {dim} (medians): dense {d_wall:.0f} ms wall / {d_cpu:.0f} ms CPU, factored {f_wall:.1f} / "
        f"{f_cpu:.1f} ms: {d_wall / f_wall:.1f}x by wall clock, {d_cpu / f_cpu:.1f}x by CPU time; "
        f"max rel diff {diff:.2e}",
        flush=True,
    )
    return d_cpu / f_cpu, diff


class PeakRSS:
    """Peak resident set size inside a ``with`` block, from the process's high-water mark ``ru_maxrss``.

    Exact when the block sets a new high-water mark, which the LLaMA round does when it runs first: it adds the
    replies to the uploads it holds. A sampling thread would be the alternative, but on 2 cores it steals time from
    torch's 2 OpenMP threads and slowed the round it measured several times over.
    """

    def __enter__(self) -> PeakRSS:
        self.start = current_rss()
        self._maxrss_before = max_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        self.new_high = max_rss() > self._maxrss_before
        self.peak = max_rss() if self.new_high else max(self._maxrss_before, current_rss())  # else: an upper bound


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the high-water mark so far stands in for the current level
        return max_rss()


def max_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def llama_round(layers: int, dim: int, generator: torch.Generator) -> tuple[float, float]:
    """Aggregate every module of a LLaMA-shaped round; return (seconds, peak extra RSS / upload bytes)."""
    uploads = {
        f"layers.{layer}.{name}": make_round(dim, generator) for layer in range(layers) for name in LLAMA_7B_MODULES
    }
    input_bytes = sum(
        a.numel() * a.element_size() + b.numel() * b.element_size()
        for clients, _, _ in uploads.values()
        for a, b, _ in clients
    )
    print(f"round: {len(uploads)} modules of {dim} x {dim}, uploads {input_bytes / 2**20:.0f} MiB", flush=True)
    replies: dict[str, list[FactorPair]] = {}
    with PeakRSS() as memory:
        start, start_cpu = time.perf_counter(), time.process_time()
        for k, (key, (clients, weights, targets)) in enumerate(uploads.items(), 1):
            replies[key] = svd_reproject(clients, weights, targets)
            if k % 16 == 0 or k == len(uploads):
                print(f"  {k}/{len(uploads)} modules, {time.perf_counter() - start:.1f} s", flush=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    extra = (memory.peak - memory.start) / input_bytes
    if not memory.new_high:
        print("round: the process peaked before the round; the memory figure is an upper bound")
    print(
        f"round: {seconds:.1f} s wall ({cpu_seconds:.1f} s CPU), peak extra RSS "
        f"{(memory.peak - memory.start) / 2**20:.0f} MiB = {extra:.2f}x uploads (the replies alone are 1x)",
        flush=True,
    )
    return seconds, extra


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the summary line last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run of a few seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random factors")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else FULL
    generator = torch.Generator().manual_seed(args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, load average "
        f"{load:.1f}, client ranks {list(CLIENT_RANKS)}",
        flush=True,
    )
    if load > (os.cpu_count() or 1):
        print("warning: the machine is busy, so every timing here is noisy (the ratios less so: they are interleaved)")

    round_s, extra = llama_round(setup.round_layers, setup.round_dim, generator)  # first: a clean memory baseline
    results = [head_to_head(dim, n, generator) for dim, n in zip(setup.sizes, setup.repeats, strict=True)]

    (small, large), diff = setup.sizes, max(d for _, d in results)
    round_key = "llama7b_round_s" if setup == FULL else f"round_{setup.round_layers * 4}x{setup.round_dim}_s"
    targets_met = {
        f"ratio_vs_dense_{small} >= 15": results[0][0] >= 15,
        f"ratio_vs_dense_{large} >= 30": results[1][0] >= 30,
        f"{round_key} < 120": round_s < 120,
        "peak_extra_over_input <= 3": extra <= 3,
        "max_rel_diff <= 1e-4": diff <= 1e-4,
    }
    if setup == FULL:
        print("targets: " + ", ".join(f"{name}: {'ok' if ok else 'MISSED'}" for name, ok in targets_met.items()))
    else:
        print("smoke run: the targets are for the full sizes (run without --quick)")
    print(
        f"ratio_vs_dense_{small}={results[0][0]:.1f} ratio_vs_dense_{large}={results[1][0]:.1f} "
        f"{round_key}={round_s:.2f} peak_extra_over_input={extra:.2f} max_rel_diff={diff:.2e}"
    )


if __name__ == "__main__":
    main()
