"""Typed run configuration, parsed once from Flower's kebab-case ``run_config`` at each entry point.

``RunConfig.from_mapping`` accepts the flat kebab-case keys of ``[tool.flwr.app.config]`` (and of the TOML
overlays in ``simulations/experiments/``) and validates every value, naming the bad one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.rule_names import LINEAR_RULES, RULE_NAMES

PARTITIONERS = ("dirichlet", "iid", "pathological")
SCHEDULES = ("cosine", "linear")
SCHEDULE_SPANS = ("run", "round")
DP_MODES = ("off", "local", "central")
ACCOUNTANTS = ("rdp", "prv")


def parse_ranks(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Parse ``"2,4,8"`` (or a list) into a tuple of ranks ≥ 1."""
    items = text.split(",") if isinstance(text, str) else list(text)
    ranks = []
    for item in items:
        item_text = str(item).strip()
        if not item_text:
            continue
        try:
            rank = int(item_text)
        except ValueError:
            raise ValueError(f"node-ranks must be integers separated by commas, got {item_text!r}") from None
        if rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank} in node-ranks")
        ranks.append(rank)
    if not ranks:
        raise ValueError("node-ranks must name at least one rank, e.g. '2,4,8'")
    return tuple(ranks)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, shared by the coordinator and the nodes."""

    num_rounds: int = 10
    """Federated rounds after round 0 (round 0 only evaluates the untrained model)."""
    rule: str = "svd"
    """Aggregation rule: ``svd`` (FlexLoRA), ``fedavg`` (zero-padded FedAvg of factors) or ``ffa`` (FFA-LoRA)."""
    keep_residual: bool = True
    """``svd``: give back to each node's term what serving it at its rank cut from the global update, so directions
    beyond the low ranks are not averaged away (``server.global_adapter.GlobalAdapter._aggregate_keeping_residual``).
    ``false`` is FlexLoRA's plain average of products. The other rules, and central DP (which already averages each
    node's change from what it was served), aggregate as before."""
    model: str = "minilm-l6"
    """Model preset name (``minilm-l6``, ``tiny``) or a local Hugging Face folder."""
    task: str = "newsgroups"
    """Data: a packaged task (``newsgroups``, ``tiny``) or a JSONL/CSV file with ``text`` and ``label`` columns."""
    node_ranks: tuple[int, ...] = (2, 4, 4, 8, 8, 16, 16, 32)
    """Rank of simulated node i is ``node_ranks[i % len]`` unless the node's own config sets ``lora-rank``."""
    lora_alpha: float = 16.0
    """peft ``lora_alpha``; each node's scaling is α/r (or α/√r with rsLoRA)."""
    use_rslora: bool = False
    """Use rsLoRA scaling α/√r."""
    target_modules: tuple[str, ...] = ()
    """LoRA target modules; empty means the model preset's default."""
    max_rank: int = 64
    """Largest rank any node may use; also the row count of the shared seeded lora_A init."""
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
    fraction_train: float = 1.0
    """Fraction of connected nodes sampled per training round."""
    fraction_evaluate: float = 1.0
    """Fraction of connected nodes sampled per evaluation round."""
    min_nodes: int = 2
    """Fewest replies a round needs; with fewer the round is skipped and the global adapter kept."""
    round_timeout: float = 600.0
    """Seconds to wait for replies in a round; nodes that have not answered by then are left out."""
    seed: int = 0
    """Seed for partitions, initialisation and sampling."""
    out_dir: str = ""
    """Coordinator output folder (default ``runs/<timestamp>``)."""
    store: str = ""
    """SQLite run store path (empty: ``<out-dir>/../fedlora.db``)."""
    norm_factor: float = 10.0
    """Reject an update whose ‖ΔW‖_F exceeds this multiple of the round's median."""
    max_num_examples: int = 10_000_000
    """Reject an update that claims more training examples than this."""
    audit_dir: str = ""
    """When set, every node appends what it received and sent (array names, shapes, bytes) to a JSONL file here."""
    inject_faults: str = ""
    """Fault injection for drills and tests, e.g. ``partition-1:raise@2`` (see client/faults.py)."""
    resume: bool = False
    """Continue the run in ``out-dir`` from its last complete checkpoint."""
    keep_checkpoints: int = 3
    """How many per-round checkpoints to keep."""
    dp: str = "off"
    """Differential privacy: ``off``, ``local`` (DP-SGD on nodes) or ``central`` (clip + noise on the coordinator)."""
    secure_aggregation: bool = False
    """Aggregate with Flower's SecAgg+ (only for the linear rules)."""
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
    secagg_num_shares: float = 1.0
    """SecAgg+ shares of each node's secret: a fraction (≤ 1) of the sampled nodes, or a count (an integer ≥ 3)."""
    secagg_reconstruction_threshold: float = 0.67
    """SecAgg+ shares needed to reconstruct a secret: a fraction (≤ 1) of the shares, or a count (an integer ≥ 2)."""
    secagg_clipping_range: float = 8.0
    """SecAgg+ clips every (weighted) entry to ±this before quantising; a node refuses to send an entry beyond it."""
    secagg_quantization_range: int = 4194304
    """SecAgg+ quantisation levels (2^22): the sum is exact to m·2·clipping-range/this per entry for m nodes."""
    secagg_modulus_range: int = 4294967296
    """SecAgg+ modulus of the masked integers (a power of 2, at most 2^32, above the quantisation range)."""
    secagg_max_weight: float = 1000.0
    """SecAgg+ weights each node by num-examples / this (≤ 1 required); larger weights lose precision, not privacy."""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Other keys (e.g. ``labels`` for local data files); not part of equality or hashing."""

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ValueError(f"num-rounds must be at least 1, got {self.num_rounds}")
        if self.rule not in RULE_NAMES:
            raise ValueError(f"unknown aggregation rule {self.rule!r}; choose one of {sorted(RULE_NAMES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule_span not in SCHEDULE_SPANS:
            raise ValueError(f"schedule-span must be one of {SCHEDULE_SPANS}, got {self.schedule_span!r}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}")
        if self.dp not in DP_MODES:
            raise ValueError(f"dp must be one of {DP_MODES}, got {self.dp!r}")
        if self.secure_aggregation and self.rule not in LINEAR_RULES:
            raise ValueError(
                f"secure aggregation cannot be combined with rule {self.rule!r}: it only reveals the sum of the "
                f"updates, while {self.rule!r} needs each client's factors; use one of {sorted(LINEAR_RULES)}"
            )
        self._check_privacy()
        for name in ("local_steps", "batch_size", "max_length", "eval_examples", "max_rank", "min_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if max(self.node_ranks) > self.max_rank:
            raise ValueError(f"node-ranks {self.node_ranks} exceed max-rank {self.max_rank}")
        positive = ("learning_rate", "baseline_learning_rate", "head_lr_ratio", "lora_alpha", "dirichlet_alpha")
        for name in (*positive, "round_timeout", "norm_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {value}")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")

    def _check_privacy(self) -> None:
        """DP and SecAgg+ keys: ranges, and the combinations that cannot work."""
        if self.dp == "central" and self.secure_aggregation:
            raise ValueError(
                "dp='central' cannot be combined with secure aggregation: central DP clips each client's update on "
                "the coordinator, and secure aggregation hides the individual updates from it; use dp='local'"
            )
        for name in ("noise_multiplier", "target_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.dp != "off" and self.noise_multiplier == 0 and self.target_epsilon == 0:
            raise ValueError(f"dp={self.dp!r} needs noise-multiplier > 0 or target-epsilon > 0, got both 0")
        for name in ("max_grad_norm", "clip_norm", "secagg_clipping_range", "secagg_max_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {value}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.noise_seed < -1:
            raise ValueError(f"noise-seed must be -1 (OS randomness) or a seed >= 0, got {self.noise_seed}")
        _check_share_setting("secagg-num-shares", self.secagg_num_shares, 3)
        _check_share_setting("secagg-reconstruction-threshold", self.secagg_reconstruction_threshold, 2)
        if 1 < self.secagg_num_shares <= self.secagg_reconstruction_threshold:
            raise ValueError(
                f"secagg-reconstruction-threshold must be below secagg-num-shares ({self.secagg_num_shares:g}), "
                f"got {self.secagg_reconstruction_threshold:g}"
            )
        if self.secagg_quantization_range < 2:
            raise ValueError(f"secagg-quantization-range must be at least 2, got {self.secagg_quantization_range}")
        modulus = self.secagg_modulus_range
        if modulus <= self.secagg_quantization_range or modulus > 2**32 or modulus & (modulus - 1):
            raise ValueError(
                f"secagg-modulus-range must be a power of 2 above secagg-quantization-range and at most 2^32, "
                f"got {modulus}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (``num-rounds``); unknown keys go to ``extra``."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                extra[key] = value
                continue
            kwargs[name] = _coerce(name, value, known[name].default)
        return cls(**kwargs, extra=extra)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys with TOML-friendly values (the inverse of ``from_mapping``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(map(str, value)) if isinstance(value, tuple) else value
        out.update(self.extra)
        return out

    def rank_for_partition(self, partition_id: int) -> int:
        """The default rank of simulated node ``partition_id``."""
        return self.node_ranks[partition_id % len(self.node_ranks)]


def _check_share_setting(key: str, value: float, least_count: int) -> None:
    """A SecAgg+ share setting is a fraction in (0, 1] or a whole count of at least ``least_count``."""
    if not (math.isfinite(value) and (0 < value <= 1 or (float(value).is_integer() and value >= least_count))):
        raise ValueError(f"{key} must be a fraction in (0, 1] or an integer >= {least_count}, got {value}")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert a TOML/CLI value to the type of the field's default, naming the key on failure."""
    key = name.replace("_", "-")
    if name == "node_ranks":
        return parse_ranks(value)
    try:
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be of type {type(default).__name__}, got {value!r}") from None
