"""The sections of the run config: frozen dataclasses, one per concern, each validating its own values.

:class:`common.config.RunConfig` holds one of each; a field's flat key (what Flower's ``run_config``, the TOML
overlays and ``--set`` use) is its name in kebab-case unless its metadata names another.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.faults import parse_faults

MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""Longest round-timeout: a week (deadlines are sums of timeouts; a huge one would overflow the launcher's timer)."""
PARTITIONERS = ("dirichlet", "iid", "pathological")
SCHEDULES = ("cosine", "linear")
SCHEDULE_SPANS = ("run", "round")
DP_MODES = ("off", "local", "central")
WEIGHTINGS = ("examples-capped", "examples", "uniform")
NORM_BOUNDS = ("off", "median", "fixed")
ACCOUNTANTS = ("rdp", "prv")


def flat_key_of(name: str, meta: Mapping[str, Any]) -> str:
    """The flat key of a field: its metadata's ``key``, else its name in kebab-case."""
    return str(meta.get("key", name.replace("_", "-")))


def _flat_key(section: object, name: str) -> str:
    """The flat key of a section's field, for error messages."""
    (field_,) = (f for f in dataclasses.fields(section) if f.name == name)  # type: ignore[arg-type]
    return flat_key_of(name, field_.metadata)


def _positive(section: object, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{_flat_key(section, name)} must be a positive number, got {value}")


def _at_least_one(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ValueError(f"{_flat_key(section, name)} must be at least 1, got {getattr(section, name)}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class LoRASection:
    """LoRA on every node: ranks, scaling and target modules."""

    node_ranks: tuple[int, ...] = (2, 4, 4, 8, 8, 16, 16, 32)
    """Rank of simulated node i is ``node_ranks[i % len]`` unless the node's own config sets ``lora-rank``."""
    lora_alpha: float = 16.0
    """peft ``lora_alpha``; each node's scaling is α/r (or α/√r with rsLoRA)."""
    use_rslora: bool = False
    """Use rsLoRA scaling α/√r."""
    target_modules: tuple[str, ...] = ()
    """LoRA target modules; empty means the model family's default."""
    max_rank: int = 64
    """Largest rank any node may use; also the row count of the shared seeded lora_A init."""

    def __post_init__(self) -> None:
        _at_least_one(self, "max_rank")
        _positive(self, "lora_alpha")
        if max(self.node_ranks) > self.max_rank:
            raise ValueError(f"node-ranks {self.node_ranks} exceed max-rank {self.max_rank}")

    def rank_for_partition(self, partition_id: int) -> int:
        """The default rank of simulated node ``partition_id``."""
        return self.node_ranks[partition_id % len(self.node_ranks)]


@dataclass(frozen=True)
class TrainingSection:
    """How every node trains in a round (and ``fedlora centralized`` over the same steps)."""

    local_steps: int = 10
    """Optimizer steps per node per round."""
    batch_size: int = 16
    """Training batch size."""
    learning_rate: float = 8e-3
    """Peak AdamW learning rate of the LoRA factors on the nodes."""
    baseline_learning_rate: float = 2e-3
    """Peak learning rate of the LoRA factors in ``fedlora centralized`` (the head gets ``head-lr-ratio`` × this).
    One model taking all the steps in sequence needs a lower rate than nodes whose updates are averaged: on the
    default task 0.002 is the best centralized rate measured (0.003 is a point lower, 0.005 diverges)."""
    head_lr_ratio: float = 10.0
    """Learning rate of the new classification head relative to ``learning_rate`` (the head starts from random
    weights, the LoRA factors from a zero update)."""
    warmup_ratio: float = 0.1
    """Fraction of a node's steps spent in linear warm-up."""
    schedule: str = "cosine"
    """Learning-rate decay after warm-up: ``cosine`` or ``linear``."""
    schedule_span: str = "run"
    """What one warm-up-and-decay schedule spans on a node: ``run`` (all rounds; round t takes the schedule's steps
    (t-1)·local-steps … t·local-steps - 1, so warm-up happens once and the rate decays to 0 in the last round) or
    ``round`` (a full warm-up and decay in every round)."""
    max_length: int = 64
    """Tokens per example (truncation)."""
    gradient_checkpointing: bool = False
    """Causal LMs: recompute each layer's activations in the backward pass instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): less memory on a small device, about a third more compute."""
    server_learning_rate: float = 1.0
    """η of the coordinator's step on each round's aggregate, G_t = G_{t−1} + η·m_t (:mod:`server.server_optimizer`;
    1 with ``server-momentum = 0`` stores the rule's aggregate as it is)."""
    server_momentum: float = 0.0
    """β of FedAvgM's server momentum, m_t = β·m_{t−1} + (ΔW̄_t − G_{t−1}), in [0, 1)."""

    def __post_init__(self) -> None:
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("schedule-span", self.schedule_span, SCHEDULE_SPANS)
        _at_least_one(self, "local_steps", "batch_size", "max_length")
        _positive(self, "learning_rate", "baseline_learning_rate", "head_lr_ratio")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 < self.server_learning_rate <= 10.0:
            raise ValueError(f"server-learning-rate must be in (0, 10], got {self.server_learning_rate}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server-momentum must be in [0, 1), got {self.server_momentum}")


@dataclass(frozen=True)
class DataSection:
    """Which examples nodes train and evaluate on, and how a packaged task is split over simulated nodes."""

    train_examples: int = 0
    """Cap on training examples per node (0 = the node's whole share)."""
    eval_examples: int = 100
    """Held-out examples each node evaluates on."""
    partitioner: str = "dirichlet"
    """How packaged data is split over simulated nodes: ``dirichlet``, ``iid`` or ``pathological``."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet label partition."""
    labels_per_node: int = 2
    """Labels per node for the ``pathological`` partitioner."""
    labels: tuple[str, ...] = ()
    """Class names of a local data file (``labels = "neg,pos"``); an integer label indexes into them. Packaged
    tasks bring their own; a local file without them is refused."""
    global_eval_examples: int = 2000
    """Held-out examples the coordinator evaluates the exported global adapter on after every round (the metric a
    user takes away): drawn stratified by label (seeded) from the task's test split, or the lines of
    ``server-eval-data``; for a causal task, every node's held-out lines. 0 turns the global evaluation off."""
    server_eval_data: str = ""
    """A JSONL/CSV file on the coordinator to evaluate the global adapter on (a deployment whose nodes each bring
    their own data has no packaged test split); empty: the packaged task's test split."""

    def __post_init__(self) -> None:
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        _at_least_one(self, "eval_examples")
        _positive(self, "dirichlet_alpha")
        if self.train_examples < 0:
            raise ValueError(f"train-examples must be 0 (all) or a positive count, got {self.train_examples}")
        if self.global_eval_examples < 0:
            raise ValueError(
                f"global-eval-examples must be 0 (off) or a positive count, got {self.global_eval_examples}"
            )


@dataclass(frozen=True)
class PrivacySection:
    """Differential privacy: DP-SGD on the nodes (``local``) or clipping and noise on the coordinator (``central``)."""

    dp: str = "off"
    """``off``, ``local`` (DP-SGD on nodes) or ``central`` (clip + noise on the coordinator)."""
    noise_multiplier: float = 0.0
    """DP noise multiplier z (DP-SGD per step under ``local``, per round under ``central``); 0: from target-epsilon."""
    target_epsilon: float = 0.0
    """ε budget at ``delta``: calibrates z when noise-multiplier is 0, and no party spends beyond it; 0: no budget."""
    max_grad_norm: float = 1.0
    """Local DP: DP-SGD's bound C on each example's gradient norm (over the LoRA factors and the head)."""
    clip_norm: float = 1.0
    """Central DP: bound C on the L2 norm of each client's whole round update (every module's ΔW and the head)."""
    delta: float = 1e-5
    """δ of the (ε, δ) guarantee."""
    accountant: str = "rdp"
    """Privacy accountant that composes the steps: ``rdp`` (Rényi DP) or ``prv`` (privacy random variables)."""
    noise_seed: int = -1
    """Fixed seed for DP noise and Poisson sampling, for tests only; -1 seeds every generator from the OS's CSPRNG."""

    def __post_init__(self) -> None:
        _one_of("dp", self.dp, DP_MODES)
        _one_of("accountant", self.accountant, ACCOUNTANTS)
        for name in ("noise_multiplier", "target_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.dp != "off" and self.noise_multiplier == 0 and self.target_epsilon == 0:
            raise ValueError(f"dp={self.dp!r} needs noise-multiplier > 0 or target-epsilon > 0, got both 0")
        _positive(self, "max_grad_norm", "clip_norm")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.noise_seed < -1:
            raise ValueError(f"noise-seed must be -1 (OS randomness) or a seed >= 0, got {self.noise_seed}")


@dataclass(frozen=True)
class SecAggSection:
    """Secure aggregation with Flower's SecAgg+ (linear rules only)."""

    enabled: bool = field(default=False, metadata={"key": "secure-aggregation"})
    """Aggregate with SecAgg+ (only for the linear rules)."""
    num_shares: float = field(default=1.0, metadata={"key": "secagg-num-shares"})
    """Shares of each node's secret: a fraction (≤ 1) of the sampled nodes, or a count (an integer ≥ 3)."""
    reconstruction_threshold: float = field(default=0.67, metadata={"key": "secagg-reconstruction-threshold"})
    """Shares needed to reconstruct a secret: a fraction (≤ 1) of the shares, or a count (an integer ≥ 2)."""
    clipping_range: float = field(default=8.0, metadata={"key": "secagg-clipping-range"})
    """Every (weighted) entry is clipped to ±this before quantising; a node refuses to send an entry beyond it."""
    quantization_range: int = field(default=4194304, metadata={"key": "secagg-quantization-range"})
    """Quantisation levels (2^22): the sum is exact to m·2·clipping-range/this per entry for m nodes."""
    modulus_range: int = field(default=4294967296, metadata={"key": "secagg-modulus-range"})
    """Modulus of the masked integers (a power of 2, at most 2^32, above the quantisation range)."""
    max_weight: float = field(default=1000.0, metadata={"key": "secagg-max-weight"})
    """Each node is weighted by num-examples / this (≤ 1 required); larger weights lose precision, not privacy."""

    def __post_init__(self) -> None:
        _positive(self, "clipping_range", "max_weight")
        _check_share_setting("secagg-num-shares", self.num_shares, 3)
        _check_share_setting("secagg-reconstruction-threshold", self.reconstruction_threshold, 2)
        if 1 < self.num_shares <= self.reconstruction_threshold:
            raise ValueError(
                f"secagg-reconstruction-threshold must be below secagg-num-shares ({self.num_shares:g}), "
                f"got {self.reconstruction_threshold:g}"
            )
        if self.quantization_range < 2:
            raise ValueError(f"secagg-quantization-range must be at least 2, got {self.quantization_range}")
        modulus = self.modulus_range
        if modulus <= self.quantization_range or modulus > 2**32 or modulus & (modulus - 1):
            raise ValueError(
                f"secagg-modulus-range must be a power of 2 above secagg-quantization-range and at most 2^32, "
                f"got {modulus}"
            )


@dataclass(frozen=True)
class ReliabilitySection:
    """Sampling, deadlines, update bounds, checkpoints and fault drills: how a run survives its nodes."""

    fraction_train: float = 1.0
    """Fraction of connected nodes sampled per training round."""
    fraction_evaluate: float = 1.0
    """Fraction of connected nodes sampled per evaluation round."""
    min_nodes: int = 2
    """Fewest replies a round needs; with fewer the round is skipped and the global adapter kept."""
    round_timeout: float = 600.0
    """Seconds to wait for replies in a round; nodes that have not answered by then are left out."""
    norm_factor: float = 10.0
    """Reject an update whose ‖ΔW‖_F exceeds this multiple of the round's median."""
    max_num_examples: int = 10_000_000
    """Reject an update that claims more training examples than this."""
    inject_faults: str = ""
    """Fault injection for drills and tests, e.g. ``partition-1:raise@2`` (see client/faults.py)."""
    resume: bool = False
    """Continue the run in ``out-dir`` from its last complete checkpoint."""
    keep_checkpoints: int = 3
    """How many per-round checkpoints to keep."""

    def __post_init__(self) -> None:
        _at_least_one(self, "min_nodes", "keep_checkpoints", "max_num_examples")
        _positive(self, "round_timeout")
        if self.round_timeout > MAX_TIMEOUT_S:
            raise ValueError(f"round-timeout must be at most {MAX_TIMEOUT_S:g} s (a week), got {self.round_timeout:g}")
        if not (math.isfinite(self.norm_factor) and self.norm_factor >= 1) and self.norm_factor != math.inf:
            raise ValueError(f"norm-factor must be >= 1 (inf disables the norm rule), got {self.norm_factor}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        parse_faults(self.inject_faults)


@dataclass(frozen=True)
class RobustnessSection:
    """What one hostile or broken node can do to the aggregate: its weight, its norm, and how the global is watched."""

    weighting: str = "examples-capped"
    """A node's weight in the aggregate: ``examples`` (its reported num-examples), ``examples-capped`` (that, capped
    at ``weight-cap`` × the round's median and at the first count the coordinator accepted from the node) or
    ``uniform`` (every node the same)."""
    weight_cap: float = 3.0
    """``examples-capped``: the largest weight, as a multiple of the round's median num-examples."""
    norm_bound: str = "off"
    """Scale each node's ΔW = s·B·A (every module, and its head) down to at most a bound before any rule aggregates:
    ``median`` (the round's median norm), ``fixed`` (``norm-bound-value``) or ``off`` (Sun et al. 2019)."""
    norm_bound_value: float = 1.0
    """The bound of ``norm-bound = "fixed"``, in ‖ΔW‖_F over all modules."""
    byzantine_nodes: int = 1
    """``multikrum``: f, the hostile nodes to tolerate; it averages the n − f nodes closest to their n − f − 2
    nearest neighbours."""
    collapse_warning_share: float = 0.05
    """Warn (log, ``metrics.csv``, dashboard) when the global served at a node's rank keeps less than this share of
    the stored global's energy, or the stored global's effective rank falls below the smallest node rank."""

    def __post_init__(self) -> None:
        _one_of("weighting", self.weighting, WEIGHTINGS)
        _one_of("norm-bound", self.norm_bound, NORM_BOUNDS)
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 1):
            raise ValueError(f"weight-cap must be a finite number >= 1, got {self.weight_cap}")
        _positive(self, "norm_bound_value")
        if self.byzantine_nodes < 0:
            raise ValueError(f"byzantine-nodes must be a non-negative integer, got {self.byzantine_nodes}")
        if not 0.0 <= self.collapse_warning_share < 1.0:
            raise ValueError(f"collapse-warning-share must be in [0, 1), got {self.collapse_warning_share}")


@dataclass(frozen=True)
class OutputSection:
    """Where a run's results go."""

    out_dir: str = ""
    """Coordinator output folder (default ``runs/<timestamp>``)."""
    store: str = ""
    """SQLite run store path (empty: ``<out-dir>/../fedlora.db``)."""
    audit_dir: str = ""
    """When set, every node appends what it received and sent (array names, shapes, bytes) to a JSONL file here."""


def _check_share_setting(key: str, value: float, least_count: int) -> None:
    """A SecAgg+ share setting is a fraction in (0, 1] or a whole count of at least ``least_count``."""
    if not (math.isfinite(value) and (0 < value <= 1 or (float(value).is_integer() and value >= least_count))):
        raise ValueError(f"{key} must be a fraction in (0, 1] or an integer >= {least_count}, got {value}")
