"""Plain types for what travels between the coordinator and a node (no Flower types here).

An adapter is keyed exactly as ``peft.get_peft_model_state_dict`` keys it, so the coordinator can write the global
adapter as a standard PEFT folder without a base model:

- ``<module>.lora_A.weight`` (r × in) and ``<module>.lora_B.weight`` (out × r) for every LoRA target module;
- every other key is a trainable head tensor (peft's ``modules_to_save``, e.g. ``base_model.model.classifier.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class AdapterFactors:
    """LoRA factors of every target module plus the trainable head."""

    lora: dict[str, tuple[np.ndarray, np.ndarray]]
    """Module path → (lora_A (r × in), lora_B (out × r))."""
    head: dict[str, np.ndarray] = field(default_factory=dict)
    """peft state-dict key → tensor of a trainable head (new weights, not base weights)."""

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> AdapterFactors:
        """Split a peft-style state dict into LoRA pairs and head tensors; every module needs both factors."""
        lora_a: dict[str, np.ndarray] = {}
        lora_b: dict[str, np.ndarray] = {}
        head: dict[str, np.ndarray] = {}
        for key, value in state.items():
            if key.endswith(LORA_A_SUFFIX):
                lora_a[key[: -len(LORA_A_SUFFIX)]] = value
            elif key.endswith(LORA_B_SUFFIX):
                lora_b[key[: -len(LORA_B_SUFFIX)]] = value
            else:
                head[key] = value
        unpaired = sorted(set(lora_a) ^ set(lora_b))
        if unpaired:
            raise ValueError(f"module {unpaired[0]!r} has only one of lora_A / lora_B")
        return cls({m: (lora_a[m], lora_b[m]) for m in sorted(lora_a)}, head)

    def to_state_dict(self) -> dict[str, np.ndarray]:
        """The inverse of ``from_state_dict``: peft-style keys, modules in sorted order, then the head."""
        state: dict[str, np.ndarray] = {}
        for module in sorted(self.lora):
            lora_A, lora_B = self.lora[module]
            state[module + LORA_A_SUFFIX] = lora_A
            state[module + LORA_B_SUFFIX] = lora_B
        state.update({k: self.head[k] for k in sorted(self.head)})
        return state

    @property
    def ranks(self) -> set[int]:
        """The set of ranks over modules (one element for a well-formed adapter)."""
        return {int(a.shape[0]) for a, _ in self.lora.values()}

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays."""
        return sum(int(v.nbytes) for v in self.to_state_dict().values())


@dataclass(frozen=True)
class NodeInfo:
    """What a node tells the coordinator about itself."""

    rank: int
    """The node's LoRA rank r."""
    scaling: float
    """The node's LoRA scaling s = α/r (or α/√r)."""
    name: str = ""
    """A display name (node-config ``node-name``, or the simulated partition)."""
    device: str = ""
    """A short device summary, e.g. ``cpu, 24 GiB`` or ``cuda:NVIDIA H200``."""


@dataclass(frozen=True)
class Instruction:
    """What the coordinator sends a node for one train or evaluate message."""

    server_round: int
    """The round this message belongs to."""
    rank: int
    """The rank the factors were re-projected to (the node's own rank; 0 when no global factors exist yet)."""
    scaling: float
    """The scaling s_j the factors were split for (s_j·B·A is the global update)."""
    adapter: AdapterFactors | None
    """Global factors at this node's rank, or None before the first aggregation."""
    freeze_lora_A: bool = False
    """True under the ``ffa`` rule: the node trains lora_B only."""


@dataclass(frozen=True)
class TrainReply:
    """A node's answer to a train message."""

    adapter: AdapterFactors
    """The node's trained factors and head."""
    num_examples: int
    """Training examples behind the update (the FedAvg weight)."""
    node: NodeInfo
    """Who sent it, at which rank and scaling."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Train loss and friends."""


@dataclass(frozen=True)
class EvaluateReply:
    """A node's answer to an evaluate message."""

    num_examples: int
    """Held-out examples evaluated."""
    node: NodeInfo
    """Who sent it."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``eval-loss`` and ``eval-accuracy`` (classification) or ``eval-perplexity`` with its sums (causal LM)."""


class Reported(Protocol):
    """A reply that reports metrics over a number of examples (train, evaluate, or SecAgg+ clear metadata)."""

    @property
    def num_examples(self) -> int: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


def weighted_metric(replies: Iterable[Reported], key: str) -> float | None:
    """The example-weighted mean of metric ``key`` over the replies that report it (None when none do)."""
    pairs = [(r.metrics[key], r.num_examples) for r in replies if key in r.metrics]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total > 0 else None


def pooled_perplexity(replies: Iterable[Reported]) -> float | None:
    """exp(Σ NLL / Σ tokens) over the replies that report ``eval-nll-sum`` and ``eval-tokens``: the perplexity of
    every node's held-out tokens together (None when none do). Not the mean of the nodes' perplexities, which
    would weigh a node of ten tokens like a node of ten thousand."""
    pairs = [(r.metrics["eval-nll-sum"], r.metrics["eval-tokens"]) for r in replies if "eval-tokens" in r.metrics]
    tokens = sum(t for _, t in pairs)
    return math.exp(sum(nll for nll, _ in pairs) / tokens) if tokens > 0 else None
