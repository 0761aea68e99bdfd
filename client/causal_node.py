"""Causal-LM node functions with the signatures of ``client.node.train_node`` / ``evaluate_node``.

A ClientApp (or ``simulations.inprocess``) calls :func:`train_causal_node` and :func:`evaluate_causal_node` for
``task = "friends"``: node ``partition-id`` i is the i-th main character of the Friends transcripts
(``client.causal_lm.MAIN_CHARACTERS``). ``eval-examples`` is the number of held-out lines per character and
``train-examples`` caps the training lines (0: all). One base model is loaded per process and kept; each rank gets
its own peft adapter on it, so nodes of different ranks in one process share the base weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

from peft import PeftModel

from client.causal_lm import (
    CAUSAL_TARGETS,
    MAIN_CHARACTERS,
    CharacterLines,
    attach_causal_lora,
    line_perplexities,
    load_causal_lm,
    read_friends,
    resolve_causal_model,
    split_characters,
    tokenize_lines,
    train_causal,
    use_causal_rank,
)
from client.model import LoRASettings, freeze_lora_A_inplace, get_adapter, reset_adapter_inplace
from client.node import NodeSettings, load_global_inplace, node_info, round_seed
from client.train import Batch, TrainSettings, pick_device
from common.config import RunConfig
from common.updates import EvaluateReply, Instruction, TrainReply


def causal_settings(cfg: RunConfig, rank: int) -> LoRASettings:
    """LoRA settings of a causal-LM node (targets: the config's, else q/k/v/o projections)."""
    targets = cfg.target_modules or CAUSAL_TARGETS
    return LoRASettings(rank, cfg.lora_alpha, cfg.use_rslora, tuple(targets), cfg.max_rank, cfg.seed)


@functools.lru_cache(maxsize=1)
def _shared_model(model: str, cfg: RunConfig) -> tuple[PeftModel, object]:
    """One base model per process, wrapped once; each rank gets its own adapter on it (see use_causal_rank)."""
    base, tokenizer = load_causal_lm(resolve_causal_model(model))
    return attach_causal_lora(base, causal_settings(cfg, min(cfg.node_ranks))), tokenizer


@functools.lru_cache(maxsize=16)
def character_data(cfg: RunConfig, partition_id: int) -> CharacterLines:
    """The lines of node ``partition_id``: ``eval-examples`` held out, ``train-examples`` (0: all) for training."""
    if not 0 <= partition_id < len(MAIN_CHARACTERS):
        raise ValueError(f"partition-id {partition_id} is outside 0..{len(MAIN_CHARACTERS) - 1} (one per character)")
    lines = read_friends(Path(cfg.task) if cfg.task.endswith(".tab") else None)
    split = split_characters(lines, cfg.eval_examples, cfg.train_examples, cfg.seed)
    return split[partition_id]


def _node_model(cfg: RunConfig, node: NodeSettings, ins: Instruction) -> tuple[PeftModel, Batch, Batch, int]:
    """The shared model at this node's rank, loaded with the global factors (or reset), and the node's data."""
    model, tokenizer = _shared_model(node.model, cfg)
    settings = causal_settings(cfg, node.rank)
    use_causal_rank(model, settings)
    reset_adapter_inplace(model, settings)
    if ins.adapter is not None:
        load_global_inplace(model, ins, settings, node.name)
    data = character_data(cfg, node.partition_id)
    train = tokenize_lines(tokenizer, data.train, cfg.max_length)
    test = tokenize_lines(tokenizer, data.test, cfg.max_length)
    return model, train, test, len(data.train)


def train_causal_node(cfg: RunConfig, node: NodeSettings, ins: Instruction) -> TrainReply:
    """Load the global adapter at this node's rank, train on the character's lines, return the factors."""
    model, train_batch, _, num_examples = _node_model(cfg, node, ins)
    if ins.freeze_lora_A:
        freeze_lora_A_inplace(model)
    settings = TrainSettings.from_config(
        cfg, cfg.local_steps, round_seed(cfg.seed, ins.server_round, node), ins.server_round
    )
    result = train_causal(model, train_batch, settings, pick_device())
    metrics = {
        "train-loss": result.mean_loss,
        "train-loss-first": result.first_loss,
        "train-loss-last": result.last_loss,
    }
    return TrainReply(get_adapter(model), num_examples, node_info(cfg, node), metrics)


def evaluate_causal_node(cfg: RunConfig, node: NodeSettings, ins: Instruction) -> EvaluateReply:
    """Perplexity of the global adapter (at this node's rank) on the character's held-out lines."""
    model, _, test_batch, _ = _node_model(cfg, node, ins)
    everything, content = line_perplexities(model, test_batch, max(cfg.batch_size, 16), pick_device())
    metrics = {
        "eval-loss": everything.loss,
        "eval-perplexity": everything.value,
        "eval-nll-sum": everything.nll_sum,
        "eval-tokens": float(everything.tokens),
        "eval-content-perplexity": content.value,
        "eval-content-nll-sum": content.nll_sum,
        "eval-content-tokens": float(content.tokens),
    }
    return EvaluateReply(len(test_batch["input_ids"]), node_info(cfg, node), metrics)
