"""``norm-bound``: every node's change in a round scaled down to at most a bound before any rule aggregates it.

Sun, Kairouz, Suresh, McMahan 2019, "Can You Really Backdoor Federated Learning?", arXiv 1911.07963: clip each
update to ‖Δ_i‖ ≤ M before averaging, Δ_i ← Δ_i · min(1, M/‖Δ_i‖). Here Δ_i is what node i changed this round,
s_i·B_i·A_i − T_i with T_i the global it was served at its rank (T_i = 0 before the first aggregation), taken over
all modules, with M the round's median ‖Δ‖ (``median``) or a set value (``fixed``).

A node's factors stay at its rank: the bounded reply is the interpolation A(f) = A_s + f(A − A_s),
B(f) = B_s + f(B − B_s) between what it was served and what it sent, with the largest f ∈ [0, 1] such that
‖s·B(f)A(f) − T‖ ≤ M (found by bisection; the change is linear in f when lora_A did not move, as under ``ffa``, or
when nothing was served yet). Every norm is computed from the factors (QR of the stacked [s·B(f) | −s·B_s] and
[A(f); A_s]), never an out × in matrix. The head (sent whole) is bounded the same way around the previous global
head, at the round's median change; before the first aggregation there is no head to measure from, and the
validation's head-norm rule alone applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from common.diagnostics import product_norm
from common.updates import AdapterFactors, TrainReply

BISECTION_STEPS = 40
"""Halvings of [0, 1] for f: the bound then holds, and f is within 1e-12 of the largest that meets it."""


def bounded_replies(
    replies: Sequence[TrainReply],
    served: Sequence[AdapterFactors | None],
    previous_head: dict[str, np.ndarray] | None,
    mode: str,
    value: float,
) -> tuple[list[TrainReply], list[str]]:
    """The replies with every change above the bound scaled down, and one line per node that was bounded."""
    if mode == "off":
        return list(replies), []
    pairs = [_Interpolation(reply, start) for reply, start in zip(replies, served, strict=True)]
    norms = [p.norm(1.0) for p in pairs]
    bound = float(np.median(norms)) if mode == "median" else value
    out, notes = [], []
    head_changes = [_head_change(r, previous_head) for r in replies]
    head_bound = float(np.median(head_changes)) if previous_head else math.inf
    for reply, pair, norm, head_change in zip(replies, pairs, norms, head_changes, strict=True):
        f = 1.0 if norm <= bound else pair.largest_within(bound)
        g = 1.0 if head_change <= head_bound else head_bound / head_change
        if f >= 1.0 and g >= 1.0:
            out.append(reply)  # within the bound: exactly what the node sent
            continue
        if f < 1.0 or g < 1.0:
            notes.append(
                f"{reply.node.name}: change ‖Δ‖_F = {norm:.4g} scaled by {f:.3g} to the bound {bound:.4g}"
                + (f", head change scaled by {g:.3g}" if g < 1.0 else "")
                + f" (norm-bound = {mode})"
            )
        out.append(replace(reply, adapter=AdapterFactors(pair.factors(f), _head(reply, previous_head, g))))
    return out, notes


class _Interpolation:
    """A reply's factors between what the node was served (f = 0) and what it sent (f = 1), per module."""

    def __init__(self, reply: TrainReply, served: AdapterFactors | None) -> None:
        self.scaling = float(reply.node.scaling)
        self.modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for module, (a, b) in reply.adapter.lora.items():
            a_new, b_new = _t(a), _t(b)
            if served is None:  # nothing served yet: the change is s·B·A itself, from B_s = 0 with the node's A
                a_old, b_old = a_new, torch.zeros_like(b_new)
            else:
                a_old, b_old = (_t(x) for x in served.lora[module])
            self.modules[module] = (a_old, b_old, a_new, b_new)

    def _at(self, f: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {m: (a0 + f * (a1 - a0), b0 + f * (b1 - b0)) for m, (a0, b0, a1, b1) in self.modules.items()}

    def norm(self, f: float) -> float:
        """‖s·B(f)A(f) − s·B_s A_s‖_F over all modules, from the factors."""
        total = 0.0
        for module, (a, b) in self._at(f).items():
            a0, b0, _, _ = self.modules[module]
            stacked_b = torch.cat([self.scaling * b, -self.scaling * b0], dim=1)  # (out, 2r)
            stacked_a = torch.cat([a, a0], dim=0)  # (2r, in)
            total += product_norm(stacked_b, stacked_a) ** 2
        return math.sqrt(total)

    def largest_within(self, bound: float) -> float:
        """The largest f in [0, 1] (to 2⁻⁴⁰) with norm(f) ≤ ``bound``."""
        low, high = 0.0, 1.0
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            if self.norm(middle) <= bound:
                low = middle
            else:
                high = middle
        return low

    def factors(self, f: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The factors at f, float32 as replies carry them (f = 1: exactly what the node sent)."""
        return {m: (a.to(torch.float32).numpy(), b.to(torch.float32).numpy()) for m, (a, b) in self._at(f).items()}


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def _head_change(reply: TrainReply, previous: dict[str, np.ndarray] | None) -> float:
    if not previous:
        return 0.0
    return math.hypot(
        *(float(np.linalg.norm(np.asarray(t, np.float64) - previous[k])) for k, t in reply.adapter.head.items())
    )


def _head(reply: TrainReply, previous: dict[str, np.ndarray] | None, g: float) -> dict[str, np.ndarray]:
    if g >= 1.0 or not previous:
        return dict(reply.adapter.head)
    return {
        k: (previous[k] + g * (np.asarray(t, np.float64) - previous[k])).astype(np.float32)
        for k, t in reply.adapter.head.items()
    }
