"""Which examples a node trains and evaluates on, and their tokenisation."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from client.tasks import TextData, load_local_file, load_task, partition_indices, shuffled_prefix
from common.config import RunConfig

LOCAL_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class NodeData:
    """A node's training share and held-out split."""

    train: TextData
    test: TextData
    num_labels: int


def is_local_file(data: str) -> bool:
    """True when ``data`` names a local JSONL/CSV file rather than a packaged task."""
    return data.endswith(LOCAL_SUFFIXES)


def num_labels_for(cfg: RunConfig, data: str) -> int:
    """Number of classes: the packaged task's, or the ``labels`` run-config key for a local file (required there)."""
    if not is_local_file(data):
        return load_task(data).num_labels
    if not cfg.data.labels:
        raise ValueError(
            f"local data file {data} needs its class names in the run config: set labels = 'neg,pos' "
            "(one name per class; an integer label indexes into them)"
        )
    return len(cfg.data.labels)


@functools.lru_cache(maxsize=8)
def _partitions(
    data: str, split: str, num_partitions: int, partitioner: str, seed: int, alpha: float, labels_per_node: int
) -> list[list[int]]:
    task = load_task(data)
    labels = task.train.labels if split == "train" else task.test.labels
    return partition_indices(labels, num_partitions, partitioner, seed, alpha, labels_per_node)


def partition_sizes(cfg: RunConfig, data: str, num_partitions: int) -> dict[str, list[int]]:
    """Examples per node of a packaged task, per split, as the nodes will draw them (before any cap)."""
    split_args = (num_partitions, cfg.data.partitioner, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.labels_per_node)
    return {split: [len(part) for part in _partitions(data, split, *split_args)] for split in ("train", "test")}


def node_data(cfg: RunConfig, data: str, partition_id: int, num_partitions: int) -> NodeData:
    """The node's share of a packaged task (non-IID split of train and test), or its own local file."""
    if is_local_file(data):
        examples = load_local_file(Path(data), cfg.data.labels)
        order = shuffled_prefix(range(len(examples)), 0, cfg.seed)
        n_test = min(cfg.data.eval_examples, max(1, len(order) // 5))
        train = examples.subset(shuffled_prefix(order[n_test:], cfg.data.train_examples, cfg.seed))
        return NodeData(train, examples.subset(order[:n_test]), num_labels_for(cfg, data))
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    task = load_task(data)
    split_args = (num_partitions, cfg.data.partitioner, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.labels_per_node)
    train_idx = _partitions(data, "train", *split_args)[partition_id]
    test_idx = _partitions(data, "test", *split_args)[partition_id]
    return NodeData(
        task.train.subset(shuffled_prefix(train_idx, cfg.data.train_examples, cfg.seed + partition_id)),
        task.test.subset(shuffled_prefix(test_idx, cfg.data.eval_examples, cfg.seed + partition_id)),
        task.num_labels,
    )


def pooled_data(cfg: RunConfig, data: str, num_partitions: int) -> NodeData:
    """The union of every node's shares: what a centralized baseline trains and evaluates on."""
    shares = [node_data(cfg, data, i, num_partitions) for i in range(num_partitions)]
    train = TextData(sum((s.train.texts for s in shares), ()), sum((s.train.labels for s in shares), ()))
    test = TextData(sum((s.test.texts for s in shares), ()), sum((s.test.labels for s in shares), ()))
    return NodeData(train, test, shares[0].num_labels)


def tokenize(tokenizer: object, data: TextData, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise to fixed-length tensors: ``input_ids``, ``attention_mask``, ``labels``."""
    encoded = tokenizer(  # type: ignore[operator]
        list(data.texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor(data.labels, dtype=torch.long),
    }
