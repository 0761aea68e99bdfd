"""Write a synthetic run into a run store through the public ``RunStore`` API, optionally slowly.

For previewing the dashboard without training anything, and for the fast API tests (a deterministic store with ε
and a rejected update in seconds). The browser test and ``docs/dashboard.png`` use a real ``fedlora simulate``
instead. Everything here is made up and labelled so (``"synthetic": true`` in the config); the numbers only look
like MiniLM + LoRA on 20 Newsgroups with three nodes at ranks 4, 8 and 16.

    python -m server.dashboard.demo --db /tmp/demo.db --rounds 8 [--interval 1.0]

With ``--interval`` the rounds arrive that many seconds apart, to watch the pages follow a run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.run_store import RoundRecord, RunStore

MODULES = [
    f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "key", "value")
]
"""Target modules as peft names them (and as the coordinator's diagnostics key them)."""
HIDDEN = 384
BYTES_PER_FLOAT = 4
DEFAULT_RANKS = (4, 8, 16)


def factor_bytes(rank: int) -> int:
    """Bytes of one node's lora_A (r × 384) and lora_B (384 × r) over every target module, float32."""
    return len(MODULES) * 2 * HIDDEN * rank * BYTES_PER_FLOAT


def energy_kept(rank: int, server_round: int, module_index: int) -> float:
    """A plausible, monotone-in-rank fraction of ‖ΔW̄‖²_F kept at ``rank``."""
    spread = 4.0 + 0.5 * server_round + 0.2 * (module_index % 5)
    return 1.0 - 0.85 * math.exp(-rank / spread)


def demo_round(
    server_round: int, node_ids: Sequence[int], ranks: Sequence[int], dp: bool, seed: int = 0
) -> RoundRecord:
    """The synthetic record for one round (round 0: evaluation of the untrained model only); ``seed`` shifts the
    curves a little, so that demo runs differ."""
    progress = (1.0 - math.exp(-server_round / 3.0)) * (1.0 - 0.04 * (seed % 5))
    metrics = {
        "eval_accuracy": 0.05 + 0.70 * progress,
        "eval_loss": 3.0 - 2.0 * progress,
        "global_accuracy": 0.05 + 0.66 * progress,
        "global_loss": 3.0 - 1.9 * progress,
    }
    if server_round == 0:
        return RoundRecord(server_round=0, metrics=metrics, participants=list(node_ids))
    metrics["train_loss"] = 2.9 - 2.1 * progress
    rejected = [(node_ids[-1], "lora_B has non-finite values (nan)")] if server_round == 3 else []
    refused = {n for n, _ in rejected}
    participants = [n for n in node_ids if n not in refused]
    diagnostics = {
        module: {
            **{f"energy_kept_r{r}": energy_kept(r, server_round, i) for r in sorted(set(ranks))},
            "min_rank_energy": energy_kept(min(ranks), server_round, i),
        }
        for i, module in enumerate(MODULES)
    }
    return RoundRecord(
        server_round=server_round,
        metrics=metrics,
        bytes_down={n: factor_bytes(r) for n, r in zip(node_ids, ranks, strict=True)},
        bytes_up={n: factor_bytes(r) for n, r in zip(node_ids, ranks, strict=True) if n not in refused},
        participants=participants,
        aggregation_seconds=0.01 * len(participants) + 0.001 * server_round,
        diagnostics=diagnostics,
        epsilon=0.6 * math.sqrt(server_round) if dp else None,
        rejected=rejected,
        checkpoint_path=None,
    )


def write_adapter(folder: Path, rank: int) -> None:
    """A loadable-shaped PEFT folder (zero lora_B, so a no-op adapter) for the download link."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["query", "key", "value"],
        "base_model_name_or_path": "all-MiniLM-L6-v2",
        "synthetic": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for module in MODULES:
        tensors[f"{module}.lora_A.weight"] = rng.standard_normal((rank, HIDDEN)).astype(np.float32) / HIDDEN
        tensors[f"{module}.lora_B.weight"] = np.zeros((HIDDEN, rank), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


class DemoClock:
    """A clock the writer moves forward itself, so an instant demo still shows plausible times and durations."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def write_demo_run(
    db: Path,
    run_id: str = "demo",
    rounds: int = 8,
    interval_s: float = 0.0,
    ranks: Sequence[int] = DEFAULT_RANKS,
    dp: bool = True,
    seed: int = 0,
    round_s: float = 41.0,
) -> None:
    """Write a whole synthetic run (rounds 0..``rounds``) into the store at ``db``, ending "completed"."""
    rng = random.Random(seed)
    node_ids = [rng.getrandbits(64) for _ in ranks]  # Flower node ids are uint64
    out_dir = db.resolve().parent / run_id
    config = {
        "synthetic": True,
        "task": "newsgroups",
        "model": "minilm-l6",
        "rule": "svd",
        "num-rounds": rounds,
        "node-ranks": ",".join(map(str, ranks)),
        "local-steps": 20,
        "learning-rate": 1e-3,
        "dp": "central" if dp else "off",
        "seed": seed,
    }
    # Written instantly, the run is back-dated to look as if each round took round_s seconds.
    clock = DemoClock(time.time() - (rounds + 1) * round_s) if interval_s == 0 else None
    store = RunStore(db, clock=clock) if clock is not None else RunStore(db)
    store.start_run(run_id, config, rounds_planned=rounds, out_dir=str(out_dir))
    for i, (node_id, rank) in enumerate(zip(node_ids, ranks, strict=True)):
        store.upsert_node(run_id, node_id, rank, device=f"cpu: {2 * (i + 1)} cores", name=f"node-{i}", server_round=0)
    for server_round in range(rounds + 1):
        if server_round > 0:
            time.sleep(interval_s)
        if clock is not None:
            clock.now += round_s
        store.record_round(run_id, demo_round(server_round, node_ids, ranks, dp, seed))
    write_adapter(out_dir / "adapter", max(ranks))
    store.finish_run(run_id, "completed", str(out_dir / "adapter"))


def main(argv: list[str] | None = None) -> int:
    """``python -m server.dashboard.demo --db PATH``: write one synthetic run."""
    parser = argparse.ArgumentParser(prog="python -m server.dashboard.demo", description=__doc__)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--run-id", default="demo")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between rounds")
    parser.add_argument("--no-dp", action="store_true", help="record no ε")
    args = parser.parse_args(argv)
    write_demo_run(args.db, args.run_id, args.rounds, args.interval, dp=not args.no_dp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
