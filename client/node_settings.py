"""A node's own settings (Flower node-config), resolved against the run config."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.common.logger import log

from common.config import RunConfig


@dataclass(frozen=True)
class NodeSettings:
    """This node's own settings (Flower node-config), resolved against the run config."""

    rank: int
    """LoRA rank r of this node."""
    model: str
    """Model preset or local folder."""
    data: str
    """Packaged task name or a local JSONL/CSV file."""
    partition_id: int
    """Which share of a packaged task this node holds."""
    num_partitions: int
    """How many shares the packaged task is split into."""
    name: str
    """Display name."""
    state_dir: str = ""
    """Folder for state that must outlive the process (the privacy ledger); node-config ``state-dir``."""

    @classmethod
    def from_node_config(cls, cfg: RunConfig, node_config: Mapping[str, Any]) -> NodeSettings:
        """Settings from this node's node-config.

        Keys: ``lora-rank``, ``model``, ``data``, ``partition-id``, ``num-partitions``, ``node-name``, ``state-dir``,
        and ``auto-rank`` (``fedlora client --rank auto``: the rank is chosen for this run, :func:`rank_for_run`).
        """
        partition_id = int(node_config.get("partition-id", 0))
        num_partitions = int(node_config.get("num-partitions", 1))
        raw_rank = node_config.get("lora-rank", cfg.lora.rank_for_partition(partition_id))
        try:
            rank = int(raw_rank)
        except (TypeError, ValueError):
            raise ValueError(f"node-config lora-rank must be an integer, got {raw_rank!r}") from None
        if node_config.get("auto-rank"):
            rank = rank_for_run(str(node_config["auto-rank"]), cfg)
        if not 1 <= rank <= cfg.lora.max_rank:
            raise ValueError(f"node-config lora-rank must be in 1..{cfg.lora.max_rank} (max-rank), got {rank}")
        return cls(
            rank=rank,
            model=str(node_config.get("model", cfg.model)),
            data=str(node_config.get("data", cfg.task)),
            partition_id=partition_id,
            num_partitions=num_partitions,
            name=str(node_config.get("node-name", f"partition-{partition_id}")),
            state_dir=str(node_config.get("state-dir", "")),
        )


@functools.cache
def rank_for_run(measured: str, cfg: RunConfig) -> int:
    """``--rank auto`` for this run: the largest rank that training at the run's batch, length, ``max-rank`` and DP
    mode fits in what the device measured when it started (the same answer for every message of the run; logged
    once)."""
    from client.device_memory import AutoRank

    try:
        rank, why = AutoRank.from_json(measured).rank_for(
            cfg.training.batch_size, cfg.training.max_length, cfg.lora.max_rank, per_sample=cfg.privacy.dp == "local"
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"node-config auto-rank: {err}") from None
    log(INFO, "--rank auto for this run: %s", why)
    return rank
