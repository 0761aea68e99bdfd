"""What a node feeds into secure aggregation for a linear rule, and how the coordinator reads the means back.

Secure aggregation (SecAgg, Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS, ePrint 2017/281; SecAgg+, Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS, ePrint 2020/704) reveals to the coordinator only the weighted mean
Σ_i w_i·x_i / Σ_i w_i of vectors x_i that **all have the same shapes**, w_i = n_i (examples). So a node at rank
r_i ≤ R (R: the largest rank in the round, said by the coordinator) zero-pads, per target module:

- ``fedavg`` (FedIT, arXiv 2305.05644, with HetLoRA's zero padding, arXiv 2401.06432): pad(s_i·B_i) (out × R) and
  pad(A_i) (R × in). Their means are exactly the rule's s·B̄ and Ā.
- ``ffa`` (FFA-LoRA, arXiv 2403.12313): pad(s_i·B_i), pad(A_i) and the row indicator 1[k < r_i] (R,). A is the
  shared frozen init, so mean(pad(A_i))[k] = A[k]·mean(1[k < r_i]): dividing by the indicator's mean gives A back.

plus every head tensor as it is. Which parts a rule needs, and how it reads its means back, the rule says
(:attr:`common.rules.base.Rule.secure_parts`, :meth:`common.rules.base.Rule.from_secure_means`); ``svd`` needs each
client's factors, not a sum, and is refused with secure aggregation at config time. The order of the summands is
the sorted ``keys``, which travel in clear.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.rules.base import Rule
from common.updates import AdapterFactors

SEP = "|"
"""Separates a module path from the part (``s·B``, ``A``, ``rows``) in a summand key."""


def check_rule(rule: Rule) -> tuple[str, ...]:
    """The per-module parts of ``rule``, or a ValueError saying why it cannot be summed securely."""
    if not rule.linear or not rule.secure_parts:
        rule.from_secure_means({})  # raises, naming the rule
    return rule.secure_parts


def secure_summands(
    adapter: AdapterFactors, scaling: float, pad_rank: int, rule: Rule
) -> tuple[list[str], list[np.ndarray]]:
    """The node's vectors for the secure sum, zero-padded to ``pad_rank``, with their keys (sorted)."""
    parts = check_rule(rule)
    summands: dict[str, np.ndarray] = {}
    for module, (lora_A, lora_B) in adapter.lora.items():
        rank = int(lora_A.shape[0])
        if rank > pad_rank:
            raise ValueError(f"module {module!r} has rank {rank}, above the round's padding rank {pad_rank}")
        padded = {
            "A": np.pad(np.asarray(lora_A, np.float64), ((0, pad_rank - rank), (0, 0))),  # (R, in)
            "s·B": np.pad(scaling * np.asarray(lora_B, np.float64), ((0, 0), (0, pad_rank - rank))),  # (out, R)
            "rows": (np.arange(pad_rank) < rank).astype(np.float64),  # (R,)
        }
        summands.update({f"{module}{SEP}{part}": padded[part] for part in parts})
    for key, value in adapter.head.items():
        if SEP in key:
            raise ValueError(f"head key {key!r} contains {SEP!r}, which secure summands reserve")
        summands[key] = np.asarray(value, np.float64)
    keys = sorted(summands)
    return keys, [summands[k] for k in keys]


def means_from_sums(
    keys: Sequence[str], means: Sequence[np.ndarray], rule: Rule
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Per module (Ā, s·B̄) at the padding rank, and the head means, from the weighted means of the summands."""
    parts = check_rule(rule)
    if len(keys) != len(means):
        raise ValueError(f"got {len(means)} means for {len(keys)} summand keys")
    by_key = dict(zip(keys, means, strict=True))
    modules = sorted({k.split(SEP, 1)[0] for k in keys if SEP in k})
    lora: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module in modules:
        missing = [p for p in parts if f"{module}{SEP}{p}" not in by_key]
        if missing:
            raise ValueError(f"module {module!r} lacks summands {missing} of rule {rule.name!r}")
        lora[module] = rule.from_secure_means({p: by_key[f"{module}{SEP}{p}"] for p in parts})
    head = {k: v for k, v in by_key.items() if SEP not in k}
    return lora, head
