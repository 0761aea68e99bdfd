"""What a node does for one message, as plain functions of plain types (the ClientApp only decodes and encodes)."""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from client.data import node_data, num_labels_for, tokenize
from client.dp_train import LocalDPSettings, train_private
from client.model import (
    LoRASettings,
    attach_lora,
    default_targets,
    freeze_lora_A_inplace,
    get_adapter,
    load_adapter_inplace,
    load_classifier,
    resolve_model,
)
from client.privacy import NodePrivacyState, ledger_path, state_dir
from client.train import Batch, TrainSettings, evaluate, pick_device, train
from common.aggregation import svd_reproject
from common.config import RunConfig
from common.updates import AdapterFactors, EvaluateReply, Instruction, NodeInfo, TrainReply
from common.validation import Layout, check_instruction


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

        Keys: ``lora-rank``, ``model``, ``data``, ``partition-id``, ``num-partitions``, ``node-name``, ``state-dir``.
        """
        partition_id = int(node_config.get("partition-id", 0))
        num_partitions = int(node_config.get("num-partitions", 1))
        raw_rank = node_config.get("lora-rank", cfg.rank_for_partition(partition_id))
        try:
            rank = int(raw_rank)
        except (TypeError, ValueError):
            raise ValueError(f"node-config lora-rank must be an integer, got {raw_rank!r}") from None
        if not 1 <= rank <= cfg.max_rank:
            raise ValueError(f"node-config lora-rank must be in 1..{cfg.max_rank} (max-rank), got {rank}")
        return cls(
            rank=rank,
            model=str(node_config.get("model", cfg.model)),
            data=str(node_config.get("data", cfg.task)),
            partition_id=partition_id,
            num_partitions=num_partitions,
            name=str(node_config.get("node-name", f"partition-{partition_id}")),
            state_dir=str(node_config.get("state-dir", "")),
        )


def device_summary(device: torch.device) -> str:
    """A short description of the compute this node trains on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {os.cpu_count()} cores"


def lora_settings(cfg: RunConfig, rank: int, base: torch.nn.Module) -> LoRASettings:
    """LoRA settings of this node (targets from the config or the model family's default)."""
    targets = cfg.target_modules or default_targets(base)  # type: ignore[arg-type]
    return LoRASettings(rank, cfg.lora_alpha, cfg.use_rslora, tuple(targets), cfg.max_rank, cfg.seed)


def node_info(cfg: RunConfig, node: NodeSettings) -> NodeInfo:
    """Rank, scaling, name and device of this node."""
    from common.lora import lora_scaling

    scaling = lora_scaling(cfg.lora_alpha, node.rank, cfg.use_rslora)
    return NodeInfo(node.rank, scaling, node.name, device_summary(pick_device()))


@functools.lru_cache(maxsize=16)
def _tokenized(cfg: RunConfig, node: NodeSettings, model_path: str) -> tuple[Batch, Batch, int]:
    from transformers import AutoTokenizer

    data = node_data(cfg, node.data, node.partition_id, node.num_partitions)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return (
        tokenize(tokenizer, data.train, cfg.max_length),
        tokenize(tokenizer, data.test, cfg.max_length),
        len(data.train),
    )


def build_model(cfg: RunConfig, node: NodeSettings, ins: Instruction | None) -> tuple[PeftModel, LoRASettings]:
    """Base model + LoRA at this node's rank, loaded with the global factors of ``ins`` (if any)."""
    path = resolve_model(node.model)
    base, _ = load_classifier(path, num_labels_for(cfg, node.data), cfg.seed)
    settings = lora_settings(cfg, node.rank, base)
    model = attach_lora(base, settings)
    if ins is not None and ins.adapter is not None:
        load_global_inplace(model, ins, settings, node.name)
    return model, settings


def load_global_inplace(model: PeftModel, ins: Instruction, settings: LoRASettings, node_name: str) -> None:
    """Check the global factors of ``ins`` against this model, then load them at this node's rank.

    The same checks the coordinator runs on replies (keys, shapes at the sent rank, dtype, finite values); a node
    refuses damaged factors with the reason instead of loading them.
    """
    assert ins.adapter is not None
    reason = check_instruction(ins, ins.rank, Layout.from_adapter(get_adapter(model)))
    if reason is not None:
        raise ValueError(f"node {node_name} refuses the global factors of round {ins.server_round}: {reason}")
    load_adapter_inplace(model, fit_to_rank(ins, settings), settings)


def fit_to_rank(ins: Instruction, settings: LoRASettings) -> AdapterFactors:
    """Global factors at this node's rank; re-projected locally when the coordinator used another rank."""
    assert ins.adapter is not None
    if ins.rank == settings.rank and abs(ins.scaling - settings.scaling) <= 1e-9 * settings.scaling:
        return ins.adapter
    lora = {}
    for module, (lora_A, lora_B) in ins.adapter.lora.items():
        ((a, b),) = svd_reproject([(lora_A, lora_B, ins.scaling)], [1.0], [(settings.rank, settings.scaling)])
        lora[module] = (a.numpy().astype(np.float32), b.numpy().astype(np.float32))
    return AdapterFactors(lora, ins.adapter.head)


def round_seed(seed: int, server_round: int, node: NodeSettings) -> int:
    """A seed of its own for every (run seed, round, node): batch order, and DP noise when a test fixes it."""
    return seed * 100_003 + server_round * 1_009 + node.partition_id


def privacy_state(cfg: RunConfig, node: NodeSettings) -> NodePrivacyState:
    """This node's ledger for this run: one file per (node name, seed, coordinator out-dir) in the state folder.

    The out-dir is only hashed (nodes cannot see coordinator paths); it tells runs apart and is the same when a
    run is resumed, so ε continues across node and coordinator restarts.
    """
    run_key = hashlib.sha256(f"{cfg.seed}|{cfg.out_dir}".encode()).hexdigest()[:12]
    path = ledger_path(state_dir(node.state_dir), node.name, run_key)
    return NodePrivacyState(path, delta=cfg.delta, mechanism=cfg.accountant)


def local_dp_settings(cfg: RunConfig, node: NodeSettings, server_round: int) -> LocalDPSettings:
    """DP-SGD settings of this node; a fixed noise seed (tests only) differs per node and round."""
    seed = None if cfg.noise_seed < 0 else round_seed(cfg.noise_seed, server_round, node)
    return LocalDPSettings(
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        delta=cfg.delta,
        target_epsilon=cfg.target_epsilon,
        accountant=cfg.accountant,
        planned_steps=cfg.num_rounds * cfg.local_steps,
        seed=seed,
    )


def train_node(cfg: RunConfig, node: NodeSettings, ins: Instruction) -> TrainReply:
    """Load the global adapter at this node's rank, train locally (DP-SGD under local DP), return factors and head.

    Under ``dp = "local"`` the reply's ``epsilon`` is this node's cumulative ε; a node whose budget is spent raises
    :class:`client.dp_train.PrivacyBudgetExhausted`, which Flower turns into an error reply with the reason.
    """
    model, settings = build_model(cfg, node, ins)
    if ins.freeze_lora_A:
        freeze_lora_A_inplace(model)
    train_batch, _, num_examples = _tokenized(cfg, node, str(resolve_model(node.model)))
    train_settings = TrainSettings.from_config(
        cfg, cfg.local_steps, round_seed(cfg.seed, ins.server_round, node), ins.server_round
    )
    privacy: dict[str, float] = {}
    if cfg.dp == "local":
        dp = local_dp_settings(cfg, node, ins.server_round)
        private = train_private(model, train_batch, train_settings, dp, privacy_state(cfg, node), pick_device())
        result = private.result
        privacy = {"epsilon": private.epsilon, "noise-multiplier": private.noise_multiplier}
    else:
        result = train(model, train_batch, train_settings, pick_device())
    losses = {
        "train-loss": result.mean_loss,
        "train-loss-first": result.first_loss,
        "train-loss-last": result.last_loss,
    }
    metrics = {k: v for k, v in losses.items() if math.isfinite(v)} | privacy
    return TrainReply(get_adapter(model), num_examples, node_info(cfg, node), metrics)


def evaluate_node(cfg: RunConfig, node: NodeSettings, ins: Instruction) -> EvaluateReply:
    """Evaluate the global adapter (at this node's rank) on the node's held-out split."""
    model, _ = build_model(cfg, node, ins)
    _, test_batch, _ = _tokenized(cfg, node, str(resolve_model(node.model)))
    result = evaluate(model, test_batch, max(cfg.batch_size, 32), pick_device())
    metrics = {"eval-loss": result.loss, "eval-accuracy": result.accuracy}
    return EvaluateReply(result.num_examples, node_info(cfg, node), metrics)
