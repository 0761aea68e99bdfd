"""Central (client-level) DP around any rule: DP-FedAvg over each client's round change, with an accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", arXiv 1710.06963),
per round, for the m nodes that were sampled:

1. Δ_i = what node i sent − what it was sent (the global adapter at its rank; before the first aggregation, the
   public start of :meth:`Rule.public_start`), as the rule defines it (:meth:`Rule.change`), plus the head.
2. Δ_i ← Δ_i · min(1, C/‖Δ_i‖), one factor for every module and the head, with ‖Δ_i‖² = Σ_modules
   :meth:`Rule.released_sq_norm` + ‖Δhead‖²: the norm of everything the rule releases a mean of.
3. The rule releases (1/m)·Σ Δ_i + N(0, (z·C/m)²) per entry (:meth:`Rule.private_update`), m = nodes sampled (a node
   that failed counts as a zero update); the head gets the same mechanism. Every released entry gets that noise and
   the concatenation has sensitivity C/m, so the round is one Gaussian mechanism with multiplier z.
4. The new global = previous global + the noisy mean (re-projected to the store rank): post-processing, free.

**Why uniform weights.** With example weights p_i = n_i / Σ n, one client with n_i ≫ the others has p_i → 1 and
moves the mean by up to C, and p_i depends on the private n_i; McMahan et al. bound it with capped weights
w_i = min(n_i / ŵ, 1) over a fixed denominator; this uses the simplest case, w_i = 1.

The accountant records (z, q, 1) per round with q = sampled / available nodes and composes with RDP (Mironov,
Talwar, Zhang 2019, arXiv 1908.10530) or PRV (Gopi, Lee, Wutschitz 2021, arXiv 2106.02848); its history goes into
the checkpoint, so ε continues after a coordinator restart. Flower samples a fixed-size subset, not a Poisson sample;
using q for it is the usual approximation. When the caller does not say how many nodes were available, q = 1,
which never under-states ε.

Noise comes from :func:`common.dp.make_generator`: seeded by the OS's CSPRNG unless ``noise-seed`` fixes it (tests).
Only a fixed-seed generator's state is checkpointed: a saved CSPRNG-seeded state would let whoever reads the
checkpoint regenerate, and subtract, the noise of the following rounds.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.accounting import PrivacyLedger, noise_multiplier_for
from common.config import RunConfig
from common.diagnostics import served_diagnostics
from common.dp import clip_scale, make_generator, tensor_norm
from common.lora import Tensor
from common.rules.base import Change, GaussianMechanism, Rule, SeededInit, to_float32
from common.rules.factors import FactorPair
from common.rules.registry import central_dp_refusal
from common.updates import AdapterFactors, TrainReply


@dataclass(frozen=True)
class CentralDPSettings:
    """What the coordinator needs for client-level DP, resolved from the run config."""

    noise_multiplier: float
    """z; 0 means "calibrate so that ``planned_rounds`` rounds at ``planned_sample_rate`` reach the target"."""
    clip_norm: float
    """C, the bound on each client's whole round update."""
    delta: float
    target_epsilon: float
    """Budget (0: none): a round that would exceed it is not released."""
    accountant: str
    planned_rounds: int
    planned_sample_rate: float
    seed: int | None
    """Fixed noise seed (tests only); None: OS CSPRNG."""
    init: SeededInit
    """The nodes' shared lora_A init, part of the public start of the first round."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CentralDPSettings:
        """Settings from ``noise-multiplier``, ``clip-norm``, ``delta``, ``target-epsilon``, ``accountant``, …"""
        privacy = cfg.privacy
        return cls(
            noise_multiplier=privacy.noise_multiplier,
            clip_norm=privacy.clip_norm,
            delta=privacy.delta,
            target_epsilon=privacy.target_epsilon,
            accountant=privacy.accountant,
            planned_rounds=cfg.num_rounds,
            planned_sample_rate=cfg.reliability.fraction_train,
            seed=None if privacy.noise_seed < 0 else privacy.noise_seed,
            init=SeededInit(cfg.seed, cfg.lora.max_rank),
        )


def dp_mean(tensors: Sequence[Tensor], mechanism: GaussianMechanism) -> Tensor:
    """Gaussian mechanism on the mean of dense tensors each within C: (1/m)·Σ t_i + N(0, (z·C/m)²).

    For the dense tensors federated with plain averaging (the classifier head's change). Sensitivity of the mean to
    one client is C/m (McMahan et al. 2018, arXiv 1710.06963).
    """
    if len(tensors) == 0:
        raise ValueError("no client tensors to average")
    mechanism.check_within([tensor_norm(t) for t in tensors], "t")
    mechanism.uniform_weights(len(tensors), tensors[0])  # checks the denominator
    mean = torch.stack(list(tensors)).sum(0) / mechanism.num_clients
    return mechanism.noisy(mean)


class CentralDP:
    """DP-FedAvg around ``rule``: clips, noises and accounts one round at a time (same round interface as a rule).

    Its ledger (and a fixed-seed generator) go into checkpoints through :meth:`state` and :meth:`load_state`.
    """

    def __init__(self, rule: Rule, settings: CentralDPSettings) -> None:
        if not rule.supports_central_dp:
            raise ValueError(central_dp_refusal(rule.name))
        self.rule = rule
        self.settings = settings
        self.ledger = PrivacyLedger(settings.accountant)
        self.generator = make_generator(settings.seed)
        self.z = settings.noise_multiplier or noise_multiplier_for(
            settings.target_epsilon,
            settings.delta,
            settings.planned_sample_rate,
            settings.planned_rounds,
            settings.accountant,
        )
        self.last_refusal = ""
        """Why the last round was not released (empty when it was)."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CentralDP:
        """Central DP around the run's rule, as ``cfg`` configures it."""
        from common.rules.registry import rule_for

        return cls(rule_for(cfg), CentralDPSettings.from_config(cfg))

    @property
    def epsilon(self) -> float:
        """ε(δ) spent so far."""
        return self.ledger.epsilon(self.settings.delta)

    def within_budget(self, sample_rate: float) -> bool:
        """Whether one more round at rate q keeps ε within the target (always, without a target)."""
        if self.settings.target_epsilon <= 0:
            return True
        trial = PrivacyLedger(self.ledger.mechanism, list(self.ledger.history))
        trial.record(self.z, sample_rate, 1)
        return trial.epsilon(self.settings.delta) <= self.settings.target_epsilon * (1 + 1e-9)

    def aggregate_adapter(
        self,
        previous: AdapterFactors | None,
        replies: Sequence[TrainReply],
        store_rank: int,
        *,
        weights: Sequence[float] | None = None,
        num_sampled: int | None = None,
        num_available: int | None = None,
    ) -> AdapterFactors | None:
        """The new global (float32, at ``store_rank``, scaling 1, and head), or None when the budget forbids it.

        ``weights`` are not used: the released mean is uniform over m, which is what the noise is calibrated to
        (weighting by a count a node reports would let it raise its own sensitivity)."""
        m = max(num_sampled or len(replies), len(replies))
        q = min(1.0, m / num_available) if num_available else 1.0
        if not self.within_budget(q):
            self.last_refusal = (
                f"central DP: another round would exceed target ε = {self.settings.target_epsilon:g} "
                f"(spent {self.epsilon:.4g}); global adapter kept"
            )
            return None
        self.last_refusal = ""
        lora_prev, head_prev = self._start(previous, replies, store_rank)
        lora_changes, head_changes = self._clipped_changes(lora_prev, head_prev, replies)
        mechanism = GaussianMechanism(self.z, self.settings.clip_norm, m, self.generator)
        lora = {}
        for module, prev in lora_prev.items():
            a, b = self.rule.private_update(prev, [c[module] for c in lora_changes], mechanism, store_rank)
            lora[module] = (to_float32(a), to_float32(b))
        head = {k: to_float32(prev + dp_mean([c[k] for c in head_changes], mechanism)) for k, prev in head_prev.items()}
        self.ledger.record(self.z, q, 1)
        return AdapterFactors(lora, head)

    def adapter_diagnostics(
        self,
        released: AdapterFactors,
        replies: Sequence[TrainReply],
        ranks: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> dict[str, dict[str, float]]:
        """What the released global keeps when served: never a statistic of one client's update."""
        return served_diagnostics(released.lora, ranks)

    def _start(
        self, previous: AdapterFactors | None, replies: Sequence[TrainReply], store_rank: int
    ) -> tuple[dict[str, FactorPair], dict[str, Tensor]]:
        """The previous global in float64; before the first aggregation, the public start every node trained from."""
        if previous is not None and previous.lora:
            return (
                {m: (_t(a), _t(b)) for m, (a, b) in previous.lora.items()},
                {k: _t(v) for k, v in previous.head.items()},
            )
        start = {
            module: self.rule.public_start(module, b.shape[0], a.shape[1], store_rank, self.settings.init)
            for module, (a, b) in replies[0].adapter.lora.items()
        }
        return start, {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in replies[0].adapter.head.items()}

    def _clipped_changes(
        self, lora_prev: dict[str, FactorPair], head_prev: dict[str, Tensor], replies: Sequence[TrainReply]
    ) -> tuple[list[dict[str, Change]], list[dict[str, Tensor]]]:
        """Each client's change since what it was served, as the rule's client triples, jointly clipped to C."""
        lora_out, head_out = [], []
        for reply in replies:
            r, s = reply.node.rank, reply.node.scaling
            changes: dict[str, Change] = {}
            for module, (a_prev, b_prev) in lora_prev.items():
                new = tuple(_t(x) for x in reply.adapter.lora[module])
                changes[module] = self.rule.change(new, self.rule.serve(a_prev, b_prev, r, s), s)  # type: ignore[arg-type]
            head = {k: _t(reply.adapter.head[k]) - prev for k, prev in head_prev.items()}
            norm_sq = sum(self.rule.released_sq_norm(c) for c in changes.values())
            norm_sq += sum(tensor_norm(t) ** 2 for t in head.values())
            factor = clip_scale(math.sqrt(norm_sq), self.settings.clip_norm)
            lora_out.append({k: self.rule.clip_change(c, factor) for k, c in changes.items()})
            head_out.append({k: v * factor for k, v in head.items()})
        return lora_out, head_out

    def state(self) -> dict[str, Any]:
        """JSON-safe: the ledger, and the generator state only when the seed is fixed."""
        state: dict[str, Any] = {"ledger": self.ledger.to_dict()}
        if self.settings.seed is not None:
            state["generator"] = base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` (a CSPRNG-seeded generator is re-seeded, never restored)."""
        self.ledger = PrivacyLedger.from_dict(dict(state["ledger"]))
        if self.settings.seed is not None and "generator" in state:
            raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
            self.generator.set_state(torch.from_numpy(raw))


def _t(x: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.float64)
