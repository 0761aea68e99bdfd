"""Typed run configuration in nested, self-validating sections, parsed once from Flower's flat kebab-case keys.

Flower passes ``context.run_config`` as one flat mapping of the keys in ``[tool.flwr.app.config]`` (and the TOML
overlays of ``simulations/experiments/`` and ``--set`` use the same keys). :meth:`RunConfig.from_mapping` turns it
into a :class:`RunConfig` of sections, each a frozen dataclass that validates its own values and names the bad one;
:meth:`RunConfig.to_mapping` flattens it back. A section field's flat key is its name in kebab-case
(``local_steps`` → ``local-steps``) unless its metadata names another (``secagg.num_shares`` →
``secagg-num-shares``). Unknown keys are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.config_sections import (
    DataSection,
    LoRASection,
    OutputSection,
    PrivacySection,
    ReliabilitySection,
    RobustnessSection,
    SecAggSection,
    TrainingSection,
    flat_key_of,
)
from common.rules.registry import RULE_NAMES, check_rule_name


def parse_ranks(text: str | int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Parse ``"2,4,8"`` (or one rank, or a list) into a tuple of ranks ≥ 1."""
    items = text.split(",") if isinstance(text, str) else list(text) if isinstance(text, list | tuple) else [text]
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


MAX_ROUNDS = 100_000
"""Most rounds a run may plan (a larger count only overflows the deadlines derived from it)."""
INT64 = 2**63
"""Flower's records hold 64-bit integers: a larger value could never reach a node."""

SECTIONS = ("lora", "training", "data", "privacy", "secagg", "reliability", "robustness", "output")
"""The sections of :class:`RunConfig`, in the order their keys are flattened."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, shared by the coordinator and the nodes."""

    num_rounds: int = 10
    """Federated rounds after round 0 (round 0 only evaluates the untrained model)."""
    rule: str = "svd"
    """Aggregation rule (:mod:`common.rules.registry`): ``svd`` (FlexLoRA), ``raflora`` (rank-partitioned FlexLoRA),
    ``fedavg`` (zero-padded FedAvg of factors) or ``ffa`` (FFA-LoRA)."""
    keep_residual: bool = True
    """``svd``: give back to each node's term what serving it at its rank cut from the global update, so directions
    beyond the low ranks are not averaged away (:meth:`common.rules.svd.SVD.aggregate_module`). ``false`` is
    FlexLoRA's plain average of products. The other rules (``raflora`` answers the same loss its own way), and
    central DP (which already averages each node's change from what it was served), aggregate as before."""
    model: str = "minilm-l6"
    """Model preset name (``minilm-l6``, ``tiny``) or a local Hugging Face folder."""
    task: str = "newsgroups"
    """Data: a packaged task (``newsgroups``, ``tiny``) or a JSONL/CSV file with ``text`` and ``label`` columns."""
    seed: int = 0
    """Seed for partitions, initialisation and sampling."""
    lora: LoRASection = field(default_factory=LoRASection)
    training: TrainingSection = field(default_factory=TrainingSection)
    data: DataSection = field(default_factory=DataSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    reliability: ReliabilitySection = field(default_factory=ReliabilitySection)
    robustness: RobustnessSection = field(default_factory=RobustnessSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        if not 1 <= self.num_rounds <= MAX_ROUNDS:
            raise ValueError(f"num-rounds must be in 1..{MAX_ROUNDS}, got {self.num_rounds}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        check_rule_name(self.rule)
        if self.privacy.dp == "central":
            from common.rules.registry import central_dp_refusal, rule_class  # imports torch, as below

            if not rule_class(self.rule).supports_central_dp:
                raise ValueError(central_dp_refusal(self.rule))
        if (self.training.server_learning_rate, self.training.server_momentum) != (1.0, 0.0):
            from common.rules.registry import rule_class  # imports torch, as below

            if not rule_class(self.rule).stores_product:
                raise ValueError(
                    f"server-learning-rate and server-momentum need a rule whose global is a product B·A; rule "
                    f"{self.rule!r} averages the factors themselves (use svd, raflora, rfa or multikrum)"
                )
        if self.secagg.enabled:
            from common.rules.registry import rule_class  # imports torch; only needed with secure aggregation

            if not rule_class(self.rule).linear:
                linear = sorted(n for n in RULE_NAMES if rule_class(n).linear)
                raise ValueError(
                    f"secure aggregation cannot be combined with rule {self.rule!r}: it only reveals the sum of the "
                    f"updates, while {self.rule!r} needs each client's factors; use one of {linear}"
                )
            if self.privacy.dp == "central":
                raise ValueError(
                    "dp='central' cannot be combined with secure aggregation: central DP clips each client's update "
                    "on the coordinator, and secure aggregation hides the individual updates from it; use dp='local'"
                )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from flat kebab-case keys (``num-rounds``, ``local-steps``, …); an unknown key is refused."""
        fields = {key: (section, name, kind) for key, section, name, kind in _flat_fields()}
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise ValueError(f"unknown config key {key!r}; known keys: {known}")
            section, name, kind = fields[key]
            (top if section is None else sections.setdefault(section, {}))[name] = _coerce(key, value, kind)
        built = {name: _section_class(name)(**kwargs) for name, kwargs in sections.items()}
        return cls(**top, **built)

    def to_mapping(self) -> dict[str, Any]:
        """Flat kebab-case keys with TOML-friendly values (the inverse of :meth:`from_mapping`)."""
        out: dict[str, Any] = {}
        for key, section, name, _ in _flat_fields():
            value = getattr(self if section is None else getattr(self, section), name)
            out[key] = ",".join(map(str, value)) if isinstance(value, tuple) else value
        return out


def flat_keys() -> tuple[str, ...]:
    """Every flat key :meth:`RunConfig.from_mapping` accepts."""
    return tuple(key for key, *_ in _flat_fields())


def _section_class(name: str) -> type:
    cls: type = typing.get_type_hints(RunConfig)[name]
    return cls


@functools.cache
def _flat_fields() -> tuple[tuple[str, str | None, str, Any], ...]:
    """(flat key, section or None, field name, type) of every setting, top-level fields first."""
    top_types = typing.get_type_hints(RunConfig)
    out: list[tuple[str, str | None, str, Any]] = [
        (flat_key_of(f.name, f.metadata), None, f.name, top_types[f.name])
        for f in dataclasses.fields(RunConfig)
        if f.name not in SECTIONS
    ]
    for section in SECTIONS:
        types = typing.get_type_hints(top_types[section])
        out += [
            (flat_key_of(f.name, f.metadata), section, f.name, types[f.name])
            for f in dataclasses.fields(top_types[section])
        ]
    return tuple(out)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, naming the key on failure."""
    if key == "node-ranks":
        return parse_ranks(value)
    if isinstance(value, list | dict):
        raise ValueError(f"{key} must be a single value, got {value!r} (write a list as a comma-separated string)")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT64:
        raise ValueError(f"{key} does not fit in 64 bits, got {value!r}")
    try:
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else [value]
            return tuple(str(v).strip() for v in items if str(v).strip())
        if kind is bool:
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError
            return text in ("true", "1")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(value)
            if abs(number) >= INT64:
                raise OverflowError
            return number
        if kind is float:
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except OverflowError:
        raise ValueError(f"{key} does not fit in 64 bits, got {value!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be of type {getattr(kind, '__name__', kind)}, got {value!r}") from None
