"""A server optimizer on the round's aggregate: server learning rate and momentum (FedAvgM), in factored form.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR, arXiv 2003.00295) treat the change the nodes' aggregate
makes to the global model as a pseudo-gradient and step a server optimizer on it; with SGD and momentum this is
FedAvgM (Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", arXiv 1909.06335):

    d_t = ΔW̄_t − G_{t−1}        (the rule's aggregate minus the stored global)
    m_t = β·m_{t−1} + d_t
    G_t = G_{t−1} + η·m_t

with η = ``server-learning-rate`` and β = ``server-momentum``; η = 1, β = 0 is the rule alone (this module is then not
used). Every matrix here is a sum of low-rank products, so each step concatenates factors and re-projects with the
factored SVD (:func:`common.rules.factored_svd.factored_svd`) to the store rank: m_t and G_t are kept at the same rank
as the global, no out × in matrix is formed, and the nodes receive exactly as many bytes as without it. The
truncation of m_t is the one approximation (exact when β = 0). The head (a dense, small tensor) takes the same
steps densely. Adam-type server optimizers (FedAdam, FedYogi) divide entrywise by a second moment, which has no
low-rank form, so they are not offered.

The first aggregation has no previous global (the nodes' heads start from their own initialisation), so it is
stored as the rule made it and momentum starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.rules.base import to_float32
from common.rules.factored_svd import factored_svd, split_balanced
from common.updates import AdapterFactors

VELOCITY_PREFIX = "server-velocity."
"""Prefix of the momentum's arrays in a checkpoint (beside the global adapter's own keys)."""


def _low_rank_sum(terms: list[tuple[float, np.ndarray, np.ndarray]], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ c·B·A over ``terms`` (c, A, B) as the best rank-``rank`` (A, B) pair at scaling 1, in float32."""
    b_cat = torch.cat([c * torch.as_tensor(b, dtype=torch.float64) for c, _, b in terms], dim=1)
    a_cat = torch.cat([torch.as_tensor(a, dtype=torch.float64) for _, a, _ in terms], dim=0)
    a, b = split_balanced(factored_svd(b_cat, a_cat, rank=rank), rank, 1.0)
    return to_float32(a), to_float32(b)


@dataclass
class ServerOptimizer:
    """Server learning rate η and momentum β on the global adapter (FedAvgM; see the module docstring)."""

    learning_rate: float = 1.0
    """η (``server-learning-rate``)."""
    momentum: float = 0.0
    """β (``server-momentum``)."""
    velocity: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """m per module as (A, B) at the store rank, scaling 1 (empty until the second aggregation)."""
    head_velocity: dict[str, np.ndarray] = field(default_factory=dict)
    """m of each head tensor."""

    @property
    def active(self) -> bool:
        """False for η = 1, β = 0: the rule's aggregate is stored as it is."""
        return self.learning_rate != 1.0 or self.momentum != 0.0

    def step(self, previous: AdapterFactors | None, aggregate: AdapterFactors, store_rank: int) -> AdapterFactors:
        """G_t from G_{t−1} = ``previous`` and ΔW̄_t = ``aggregate``, updating m in place."""
        if not self.active or previous is None:
            return aggregate
        lora = {}
        for module, (a_new, b_new) in aggregate.lora.items():
            a_old, b_old = previous.lora[module]
            terms = [(1.0, a_new, b_new), (-1.0, a_old, b_old)]
            if module in self.velocity and self.momentum:
                terms.append((self.momentum, *self.velocity[module]))
            self.velocity[module] = m = _low_rank_sum(terms, store_rank)
            lora[module] = _low_rank_sum([(1.0, a_old, b_old), (self.learning_rate, *m)], store_rank)
        head = {}
        for key, new in aggregate.head.items():
            old = previous.head[key].astype(np.float64)
            step = new.astype(np.float64) - old + self.momentum * self.head_velocity.get(key, np.zeros_like(old))
            self.head_velocity[key] = step.astype(np.float32)
            head[key] = (old + self.learning_rate * step).astype(np.float32)
        return AdapterFactors(lora, head)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """m's arrays for a checkpoint, under :data:`VELOCITY_PREFIX`."""
        state = AdapterFactors(self.velocity, self.head_velocity).to_state_dict()
        return {VELOCITY_PREFIX + key: value for key, value in state.items()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore m from the checkpoint keys under :data:`VELOCITY_PREFIX` (none: m = 0)."""
        mine = {k[len(VELOCITY_PREFIX) :]: v for k, v in arrays.items() if k.startswith(VELOCITY_PREFIX)}
        restored = AdapterFactors.from_state_dict(mine)
        self.velocity, self.head_velocity = dict(restored.lora), dict(restored.head)
