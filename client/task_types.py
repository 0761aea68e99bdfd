"""What differs between the kinds of task a node trains: model, LoRA targets, data, training step, metric.

The rest of a node's work (serve → load at its rank → train, with DP-SGD or not → reply with factors) is one path,
:mod:`client.node`, parameterised by a :class:`TaskType`:

- :class:`Classification`: a sequence classifier (a preset encoder or a local folder) with a new head
  (peft ``modules_to_save``); packaged tasks split over simulated nodes, or a node's own JSONL/CSV file; metric:
  held-out loss and accuracy.
- :class:`CausalLM`: a causal language model (SmolLM2, ``tiny-llama`` or a local folder) on lines of text (the
  Friends transcripts, one node per main character) or instruction chats (the chatterbot corpus, categories split
  over nodes, or a node's own JSONL file; the loss on the responses only, :mod:`client.instruct`); metric: held-out
  perplexity over all target tokens and over content tokens.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from client.causal_lm import (
    CAUSAL_TARGETS,
    IGNORE_INDEX,
    MAIN_CHARACTERS,
    CharacterLines,
    attach_causal_lora,
    line_perplexities,
    load_causal_lm,
    read_friends,
    resolve_causal_model,
    split_characters,
    tokenize_lines,
    use_causal_rank,
)
from client.data import is_local_file, node_data, num_labels_for, tokenize
from client.instruct import chatterbot_categories, chatterbot_split, read_examples, split_examples, tokenize_examples
from client.model import (
    LOADS,
    LoRASettings,
    attach_lora,
    default_targets,
    load_classifier,
    reset_adapter_inplace,
    resolve_model,
)
from client.node_settings import NodeSettings
from client.tasks import load_local_file, load_task, stratified_indices
from client.train import Batch, TrainResult, TrainSettings, evaluate, train
from common.config import RunConfig
from common.task_kind import is_causal_task


@dataclass(frozen=True)
class GlobalSet:
    """The fixed held-out examples the coordinator evaluates the global adapter on, and where they came from."""

    batch: Batch
    source: str
    """What the examples are, in words (the task, the split, how they were drawn)."""
    indices: tuple[int, ...] = ()
    """Positions of the examples in that source, so that anyone can rebuild the set."""


@dataclass(frozen=True)
class NodeBatches:
    """A node's tokenised training and held-out examples."""

    train: Batch
    test: Batch
    num_train: int
    """Training examples (the node's FedAvg weight)."""


class TaskType(ABC):
    """One kind of task, as the node path needs it."""

    name: ClassVar[str]

    @abstractmethod
    def model(self, cfg: RunConfig, node: NodeSettings) -> tuple[PeftModel, LoRASettings]:
        """The base model with LoRA at the node's rank, at the public start (lora_A the shared init, lora_B 0)."""

    @abstractmethod
    def data(self, cfg: RunConfig, node: NodeSettings) -> NodeBatches:
        """The node's tokenised examples."""

    @abstractmethod
    def train(self, model: PeftModel, data: Batch, settings: TrainSettings, device: torch.device) -> TrainResult:
        """One round's local steps (without DP; DP-SGD is the node path's, for every task type)."""

    @abstractmethod
    def evaluate(
        self, model: PeftModel, data: Batch, cfg: RunConfig, device: torch.device
    ) -> tuple[int, dict[str, float]]:
        """Held-out examples evaluated, and the metrics (``eval-loss`` and the task's own)."""

    @abstractmethod
    def global_set(self, cfg: RunConfig) -> GlobalSet | None:
        """The coordinator's fixed held-out set (``global-eval-examples``), or None when the task offers none."""


class Classification(TaskType):
    """Sequence classification: a fresh model per message, tokenised data cached per process."""

    name: ClassVar[str] = "classification"

    def model(self, cfg: RunConfig, node: NodeSettings) -> tuple[PeftModel, LoRASettings]:
        """Base classifier (its new head seeded, so every node starts from the same one) + LoRA at the node's rank."""
        base, _ = load_classifier(resolve_model(node.model), num_labels_for(cfg, node.data), cfg.seed)
        targets = cfg.lora.target_modules or default_targets(base)
        settings = lora_settings(cfg, node.rank, targets)
        return attach_lora(base, settings), settings

    def data(self, cfg: RunConfig, node: NodeSettings) -> NodeBatches:
        """The node's share (or file), tokenised to ``max-length``."""
        return _classification_batches(cfg, node, str(resolve_model(node.model)))

    def train(self, model: PeftModel, data: Batch, settings: TrainSettings, device: torch.device) -> TrainResult:
        """AdamW on the LoRA factors and the head."""
        return train(model, data, settings, device)

    def evaluate(
        self, model: PeftModel, data: Batch, cfg: RunConfig, device: torch.device
    ) -> tuple[int, dict[str, float]]:
        """Held-out cross-entropy and accuracy."""
        result = evaluate(model, data, max(cfg.training.batch_size, 32), device)
        return result.num_examples, {"eval-loss": result.loss, "eval-accuracy": result.accuracy}

    def global_set(self, cfg: RunConfig) -> GlobalSet | None:
        """``global-eval-examples`` of the task's test split, or of ``server-eval-data``, stratified by label."""
        count = cfg.data.global_eval_examples
        if count == 0 or (is_local_file(cfg.task) and not cfg.data.server_eval_data):
            return None
        if cfg.data.server_eval_data:
            path = Path(cfg.data.server_eval_data)
            data, name = load_local_file(path, cfg.data.labels), str(path)
        else:
            data, name = load_task(cfg.task).test, f"the {cfg.task} test split"
        indices = stratified_indices(data.labels, count, cfg.seed)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
        batch = tokenize(tokenizer, data.subset(indices), cfg.training.max_length)
        source = f"{len(indices)} examples of {name}, stratified by label (seed {cfg.seed})"
        return GlobalSet(batch, source, tuple(indices))


class CausalLM(TaskType):
    """Causal language modelling: one base model per process, one peft adapter per rank on it."""

    name: ClassVar[str] = "causal-lm"

    def model(self, cfg: RunConfig, node: NodeSettings) -> tuple[PeftModel, LoRASettings]:
        """The process's shared model, switched to the node's rank and reset to the public start."""
        model, _ = _shared_causal_model(node.model, cfg)
        settings = lora_settings(cfg, node.rank, cfg.lora.target_modules or CAUSAL_TARGETS)
        use_causal_rank(model, settings)
        reset_adapter_inplace(model, settings)
        set_gradient_checkpointing(model, cfg.training.gradient_checkpointing)
        return model, settings

    def data(self, cfg: RunConfig, node: NodeSettings) -> NodeBatches:
        """The node's lines (Friends: its character's) or instruction chats, with the loss on the responses."""
        _, tokenizer = _shared_causal_model(node.model, cfg)
        return _causal_batches(cfg, node, tokenizer)

    def train(self, model: PeftModel, data: Batch, settings: TrainSettings, device: torch.device) -> TrainResult:
        """AdamW on the LoRA factors, bf16 autocast on CUDA."""
        return train(model, data, settings, device, bf16_on_cuda=True)

    def evaluate(
        self, model: PeftModel, data: Batch, cfg: RunConfig, device: torch.device
    ) -> tuple[int, dict[str, float]]:
        """Perplexity over every predicted token and over content tokens, with the sums that combine across nodes."""
        everything, content = line_perplexities(model, data, max(cfg.training.batch_size, 16), device)
        metrics = {
            "eval-loss": everything.loss,
            "eval-perplexity": everything.value,
            "eval-nll-sum": everything.nll_sum,
            "eval-tokens": float(everything.tokens),
            "eval-content-perplexity": content.value,
            "eval-content-nll-sum": content.nll_sum,
            "eval-content-tokens": float(content.tokens),
        }
        return len(data["input_ids"]), metrics

    def global_set(self, cfg: RunConfig) -> GlobalSet | None:
        """Every node's held-out examples together (Friends: each character's; chatterbot: each category's), or
        ``server-eval-data``, up to ``global-eval-examples``."""
        count = cfg.data.global_eval_examples
        if count == 0 or (cfg.task.endswith((".jsonl", ".txt")) and not cfg.data.server_eval_data):
            return None
        _, tokenizer = _shared_causal_model(cfg.model, cfg)
        max_length = cfg.training.max_length
        if cfg.data.server_eval_data:
            examples = read_examples(Path(cfg.data.server_eval_data))[:count]
            return GlobalSet(tokenize_examples(tokenizer, examples, max_length), f"{len(examples)} examples of "
                             f"{cfg.data.server_eval_data}")  # fmt: skip
        if cfg.task == "chatterbot":
            held = [e for name, chats in sorted(chatterbot_categories().items())
                    for e in split_examples(name, chats, cfg.data.eval_examples, cfg.seed).test][:count]  # fmt: skip
            source = f"{len(held)} held-out chats of the chatterbot categories (seed {cfg.seed})"
            return GlobalSet(tokenize_examples(tokenizer, held, max_length), source)
        lines = [line for i in range(len(MAIN_CHARACTERS)) for line in character_data(cfg, i).test][:count]
        batch = tokenize_lines(tokenizer, lines, max_length)
        return GlobalSet(batch, f"{len(lines)} held-out lines of the {len(MAIN_CHARACTERS)} characters")


def set_gradient_checkpointing(model: PeftModel, on: bool) -> None:
    """Turn transformers' gradient checkpointing on (non-reentrant, so frozen inputs need no grad) or off."""
    base: Any = model.get_base_model()
    if on == bool(base.is_activation_checkpointing):
        return  # the shared model is already so: nothing to redo on every message
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Rows of several batches in one, right-padded to the widest (padding: id 0, mask 0, label -100)."""
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}

    def widen(key: str, value: torch.Tensor) -> torch.Tensor:
        if value.ndim < 2 or value.shape[1] == width:
            return value
        return torch.nn.functional.pad(value, (0, width - value.shape[1]), value=fill.get(key, 0))

    return {key: torch.cat([widen(key, b[key]) for b in batches]) for key in batches[0]}


def task_type_for(task: str) -> TaskType:
    """The task type of a task name or data file (:func:`common.task_kind.is_causal_task`)."""
    return CausalLM() if is_causal_task(task) else Classification()


def lora_settings(cfg: RunConfig, rank: int, targets: tuple[str, ...] | list[str]) -> LoRASettings:
    """LoRA settings of a node at ``rank`` with these target modules."""
    return LoRASettings(rank, cfg.lora.lora_alpha, cfg.lora.use_rslora, tuple(targets), cfg.lora.max_rank, cfg.seed)


@functools.lru_cache(maxsize=16)
def _classification_batches(cfg: RunConfig, node: NodeSettings, model_path: str) -> NodeBatches:
    from transformers import AutoTokenizer

    data = node_data(cfg, node.data, node.partition_id, node.num_partitions)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    LOADS["data"] += 1
    max_length = cfg.training.max_length
    return NodeBatches(
        tokenize(tokenizer, data.train, max_length), tokenize(tokenizer, data.test, max_length), len(data.train)
    )


@functools.lru_cache(maxsize=1)
def _shared_causal_model(model: str, cfg: RunConfig) -> tuple[PeftModel, object]:
    """One base model per process, wrapped once; each rank gets its own adapter on it (see use_causal_rank)."""
    base, tokenizer = load_causal_lm(resolve_causal_model(model))
    LOADS["model"] += 1
    settings = lora_settings(cfg, min(cfg.lora.node_ranks), cfg.lora.target_modules or CAUSAL_TARGETS)
    return attach_causal_lora(base, settings), tokenizer


@functools.lru_cache(maxsize=16)
def _causal_batches(cfg: RunConfig, node: NodeSettings, tokenizer: object) -> NodeBatches:
    max_length = cfg.training.max_length
    LOADS["data"] += 1
    if node.data == "friends" or node.data.endswith(".tab"):
        lines = character_data(cfg, node.partition_id)
        train, test = (
            tokenize_lines(tokenizer, lines.train, max_length),
            tokenize_lines(tokenizer, lines.test, max_length),
        )
        return NodeBatches(train, test, len(lines.train))
    if node.data == "chatterbot":
        split = chatterbot_split(cfg.data.eval_examples, cfg.seed, node.partition_id, node.num_partitions)
    else:
        split = split_examples(node.name, read_examples(Path(node.data)), cfg.data.eval_examples, cfg.seed)
    if not split.test:
        raise ValueError(f"node {node.name}: {split.name} has too few examples to hold any out (4 at least)")
    train, test = (
        tokenize_examples(tokenizer, split.train, max_length),
        tokenize_examples(tokenizer, split.test, max_length),
    )
    return NodeBatches(train, test, len(split.train))


@functools.lru_cache(maxsize=16)
def character_data(cfg: RunConfig, partition_id: int) -> CharacterLines:
    """The lines of node ``partition_id``: ``eval-examples`` held out, ``train-examples`` (0: all) for training."""
    if not 0 <= partition_id < len(MAIN_CHARACTERS):
        raise ValueError(f"partition-id {partition_id} is outside 0..{len(MAIN_CHARACTERS) - 1} (one per character)")
    lines = read_friends(Path(cfg.task) if cfg.task.endswith(".tab") else None)
    split = split_characters(lines, cfg.data.eval_examples, cfg.data.train_examples, cfg.seed)
    return split[partition_id]
