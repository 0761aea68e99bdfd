"""Privacy accounting: ε of a history of subsampled Gaussian steps, as functions, and a serialisable ledger.

A history is a list of ``(noise_multiplier, sample_rate, num_steps)``, the form Opacus's accountants keep: each step
is a Gaussian mechanism with noise multiplier z applied to a Poisson sample at rate q (DP-SGD, Abadi et al. 2016,
arXiv 1607.00133; a DP-FedAvg round, McMahan et al. 2018, arXiv 1710.06963). Steps compose:

- ``rdp``: Rényi DP (Mironov 2017, arXiv 1702.07476) of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019,
  arXiv 1908.10530) summed over the history per order α, converted to (ε, δ) (Balle et al. 2020, arXiv 1905.09982),
  via ``opacus.accountants.analysis.rdp``;
- ``prv``: privacy random variables (Gopi, Lee, Wutschitz 2021, arXiv 2106.02848), tighter, via Opacus's
  ``PRVAccountant``.

As in Opacus (``accountants/analysis/rdp.py`` vs ``accountants/rdp.py``), the math is functions and
:class:`PrivacyLedger` only holds the history. Because composition only depends on the history, a ledger restored with
:meth:`PrivacyLedger.from_dict` continues exactly where it stopped: ε after round 2 is one accountant over both rounds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeAlias

import numpy as np


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Undo what an import adds to the root logger (Opacus 1.6 calls ``logging.basicConfig`` on import, and its
    handler would print every Flower log line a second time)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


@functools.cache
def opacus_accountants() -> SimpleNamespace:
    """Import Opacus (quietly) and return its accountants, on first use only.

    Opacus adds about a second to a process's start, and a deployed node starts a fresh process for every message, so
    nothing imports it until a private run needs it. Call this before any other ``import opacus``: it keeps the root
    logger as it was.
    """
    with _root_logging_kept():
        import opacus  # noqa: F401  (its import is what configures logging)
        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.analysis import rdp as rdp_analysis
        from opacus.accountants.utils import get_noise_multiplier
    return SimpleNamespace(
        PRVAccountant=PRVAccountant,
        RDPAccountant=RDPAccountant,
        rdp_analysis=rdp_analysis,
        get_noise_multiplier=get_noise_multiplier,
    )


HistoryEntry: TypeAlias = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, num_steps)``."""

LEDGER_FORMAT = "fedlora-privacy-ledger"
LEDGER_VERSION = 1


def check_entry(noise_multiplier: float, sample_rate: float, num_steps: int) -> HistoryEntry:
    """Validate one history entry: z ≥ 0 finite, 0 < q ≤ 1, an integer number of steps ≥ 0."""
    z, q = float(noise_multiplier), float(sample_rate)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got noise_multiplier={noise_multiplier}")
    if not (0 < q <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got sample_rate={sample_rate}")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got num_steps={num_steps}")
    return z, q, int(num_steps)


def check_delta(delta: float) -> float:
    """Return δ if 0 < δ < 1, else raise naming it."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got delta={delta}")
    return float(delta)


def rdp_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε(δ) of a history by RDP composition over Opacus's default orders (as ``RDPAccountant.get_epsilon``)."""
    opacus = opacus_accountants()
    orders = opacus.RDPAccountant.DEFAULT_ALPHAS
    rdp = np.zeros(len(orders))
    for z, q, steps in history:
        rdp = rdp + opacus.rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    eps, _ = opacus.rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def prv_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε(δ) of a history by numerical composition of privacy random variables (Opacus's ``PRVAccountant``)."""
    accountant = opacus_accountants().PRVAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


EPSILON_FNS: dict[str, Callable[[Sequence[HistoryEntry], float], float]] = {"rdp": rdp_epsilon, "prv": prv_epsilon}
"""Composition methods by the name a config uses."""


def check_mechanism(mechanism: str) -> str:
    """Return ``mechanism`` if it names a known accountant, else raise listing the known ones."""
    if mechanism not in EPSILON_FNS:
        raise ValueError(f"unknown accountant {mechanism!r}; choose one of {sorted(EPSILON_FNS)}")
    return mechanism


def compose_epsilon(history: Sequence[HistoryEntry], delta: float, mechanism: str = "rdp") -> float:
    """ε(δ) spent by the whole history: 0 when nothing was spent, ∞ when a step had no noise (z = 0)."""
    delta = check_delta(delta)
    entries = [check_entry(*entry) for entry in history]
    entries = [entry for entry in entries if entry[2] > 0]
    if not entries:
        return 0.0
    if any(z == 0 for z, _, _ in entries):
        return math.inf
    return EPSILON_FNS[check_mechanism(mechanism)](entries, delta)


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest z (to ``epsilon_tolerance``) with ε(δ) ≤ target after ``steps`` steps at rate q from zero.

    Opacus's ``get_noise_multiplier`` (doubling then bisection; returns the upper end, so ε never exceeds the target).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be positive and finite, got target_epsilon={target_epsilon}")
    _, q, n = check_entry(1.0, sample_rate, steps)
    if n < 1:
        raise ValueError(f"steps must be >= 1 to calibrate noise, got steps={steps}")
    return float(
        opacus_accountants().get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=check_delta(delta),
            sample_rate=q,
            steps=n,
            accountant=check_mechanism(mechanism),
            epsilon_tolerance=epsilon_tolerance,
        )
    )


@dataclass
class PrivacyLedger:
    """The history of privacy-spending steps of one party (a node, or the coordinator); ε composes all of it."""

    mechanism: str = "rdp"
    """Composition method, a key of :data:`EPSILON_FNS`."""
    history: list[HistoryEntry] = field(default_factory=list)
    """``(noise_multiplier, sample_rate, num_steps)`` in the order spent; equal neighbours are merged."""

    def __post_init__(self) -> None:
        check_mechanism(self.mechanism)
        self.history = [check_entry(*entry) for entry in self.history]

    def record(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Append ``num_steps`` steps at (z, q), merging with the last entry when z and q are equal."""
        z, q, n = check_entry(noise_multiplier, sample_rate, num_steps)
        if n == 0:
            return
        if self.history and self.history[-1][:2] == (z, q):
            self.history[-1] = (z, q, self.history[-1][2] + n)
        else:
            self.history.append((z, q, n))

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """ε(δ) composed over the whole history."""
        return compose_epsilon(self.history, delta, self.mechanism)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (floats round-trip exactly through ``json``)."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "mechanism": self.mechanism,
            "history": [[z, q, n] for z, q, n in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """Restore a ledger written by :meth:`to_dict`, refusing other formats and versions."""
        if data.get("format") != LEDGER_FORMAT or data.get("version") != LEDGER_VERSION:
            raise ValueError(
                f"not a {LEDGER_FORMAT} v{LEDGER_VERSION} dict: format={data.get('format')!r}, "
                f"version={data.get('version')!r}"
            )
        history = data.get("history")
        if not isinstance(history, list) or not all(isinstance(e, list | tuple) and len(e) == 3 for e in history):
            raise ValueError("ledger history must be a list of [noise_multiplier, sample_rate, num_steps]")
        return cls(mechanism=str(data.get("mechanism")), history=[(e[0], e[1], e[2]) for e in history])
