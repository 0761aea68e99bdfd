"""The one place rule names live: name → rule class, imported on first use.

Configs and the CLI validate a name against :data:`RULE_NAMES` without importing torch; :func:`get_rule` imports the
rule's module only when a rule object is needed. Nothing outside this module compares a rule's name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.rules.base import Rule, RuleSettings

_RULES: dict[str, tuple[str, str]] = {
    "svd": ("common.rules.svd", "SVD"),
    "fedavg": ("common.rules.fedavg", "FedAvg"),
    "ffa": ("common.rules.ffa", "FFA"),
    "raflora": ("common.rules.raflora", "RaFLoRA"),
    "rfa": ("common.rules.robust", "RFA"),
    "multikrum": ("common.rules.robust", "MultiKrum"),
}
RULE_NAMES: tuple[str, ...] = tuple(_RULES)
"""Every rule a config can name (``rule = "svd"``)."""


def check_rule_name(name: str) -> str:
    """Return ``name`` if it names a rule, else raise listing the known ones."""
    if name not in _RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of {sorted(RULE_NAMES)}")
    return name


def central_dp_refusal(name: str) -> str:
    """Why rule ``name`` cannot run under central DP (:attr:`common.rules.base.Rule.supports_central_dp`)."""
    able = sorted(n for n in RULE_NAMES if rule_class(n).supports_central_dp)
    return (
        f"dp='central' cannot be combined with rule {name!r}: central DP releases a uniform mean of each node's change "
        f"with noise for 1/m, and {name!r} re-weights parts of the updates; use one of {able}"
    )


def rule_class(name: str) -> type[Rule]:
    """The class of rule ``name``."""
    module, attribute = _RULES[check_rule_name(name)]
    cls: type[Rule] = getattr(importlib.import_module(module), attribute)
    return cls


def get_rule(name: str) -> Rule:
    """Rule ``name`` with its default settings."""
    return rule_class(name)()


def rule_for(cfg: RuleSettings) -> Rule:
    """The rule a run config names, with the run's settings (e.g. svd's ``keep-residual``)."""
    return rule_class(cfg.rule).from_config(cfg)
