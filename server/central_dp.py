"""Central (client-level) DP on the coordinator: DP-FedAvg over each client's round change, with an accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", arXiv 1710.06963),
per round, for the m nodes that were sampled:

1. Δ_i = what node i sent − what it was sent (the global adapter at its rank; before the first aggregation, the
   public start: lora_B = 0, lora_A = the shared seeded init, a zero head). Δ_i is the vector that the rule releases
   a mean of: every module's s·B·A for ``svd``; s·B and A for ``fedavg``; s·B for ``ffa``; plus the head.
2. Δ_i ← Δ_i · min(1, C/‖Δ_i‖), one factor for all modules and the head (:func:`common.dp.clip_update`'s argument).
3. The rule of :mod:`common.dp_aggregation` releases (1/m)·Σ Δ_i + N(0, (z·C/m)²) per entry, m = nodes sampled
   (a node that failed counts as a zero update). Every released entry gets that noise and the concatenation has
   sensitivity C/m, so the round is one Gaussian mechanism with multiplier z.
4. The new global = previous global + the noisy mean (re-projected to ``store_rank``): post-processing, free.

The accountant records (z, q, 1) per round with q = sampled / available nodes and composes with RDP (Mironov,
Talwar, Zhang 2019, arXiv 1908.10530) or PRV (Gopi, Lee, Wutschitz 2021, arXiv 2106.02848); its history goes into
the checkpoint, so ε continues after a coordinator restart. Flower samples a fixed-size subset, not a Poisson sample;
using q for it is the usual approximation. When the strategy does not say how many nodes were available, q = 1,
which never under-states ε.

Noise comes from :func:`common.dp.make_generator`: seeded by the OS's CSPRNG unless ``noise-seed`` fixes it (tests).
Only a fixed-seed generator's state is checkpointed: a saved CSPRNG-seeded state would let whoever reads the
checkpoint regenerate, and subtract, the noise of the following rounds.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.supercore import log

from common.accounting import PrivacyLedger, noise_multiplier_for
from common.aggregation import factored_svd, get_rule, split_balanced
from common.config import RunConfig
from common.dp import clip_scale, factor_difference, make_generator, update_norm
from common.dp_aggregation import dp_fedavg, dp_ffa, dp_mean, dp_mean_svd
from common.lora import LoRAFactors, Tensor
from common.updates import TrainReply

Pair = tuple[Tensor, Tensor]
"""``(lora_A, lora_B)`` as float64 tensors."""
InitialA = Callable[[str, int, int], np.ndarray]
"""``(module, rank, in_features) → lora_A`` of the nodes' shared seeded init."""


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

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CentralDPSettings:
        """Settings from ``noise-multiplier``, ``clip-norm``, ``delta``, ``target-epsilon``, ``accountant``, …"""
        return cls(
            noise_multiplier=cfg.noise_multiplier,
            clip_norm=cfg.clip_norm,
            delta=cfg.delta,
            target_epsilon=cfg.target_epsilon,
            accountant=cfg.accountant,
            planned_rounds=cfg.num_rounds,
            planned_sample_rate=cfg.fraction_train,
            seed=None if cfg.noise_seed < 0 else cfg.noise_seed,
        )


def seeded_initial_a(seed: int, max_rank: int) -> InitialA:
    """The nodes' shared lora_A init (public: a seeded draw), the start of the first round's change under fedavg."""

    def initial_a(module: str, rank: int, in_features: int) -> np.ndarray:
        from client.model import shared_lora_a  # the very draw the nodes start from (imported only when needed)

        return shared_lora_a(seed, module, rank, in_features, max_rank)

    return initial_a


class CentralDP:
    """Clips, noises and accounts one round at a time; its ledger (and a fixed-seed RNG) go into checkpoints."""

    def __init__(self, settings: CentralDPSettings, initial_a: InitialA) -> None:
        self.settings = settings
        self.initial_a = initial_a
        self.ledger = PrivacyLedger(settings.accountant)
        self.generator = make_generator(settings.seed)
        self.z = settings.noise_multiplier or noise_multiplier_for(
            settings.target_epsilon,
            settings.delta,
            settings.planned_sample_rate,
            settings.planned_rounds,
            settings.accountant,
        )

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CentralDP:
        """Central DP as ``cfg`` configures it."""
        return cls(CentralDPSettings.from_config(cfg), seeded_initial_a(cfg.seed, cfg.max_rank))

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

    def aggregate(
        self,
        rule: str,
        previous: tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]],
        replies: Sequence[TrainReply],
        store_rank: int,
        num_sampled: int,
        num_available: int | None,
    ) -> tuple[dict[str, Pair], dict[str, Tensor]] | None:
        """The new global (factors at ``store_rank``, scaling 1, and head), or None when the budget forbids it."""
        m = max(num_sampled, len(replies))
        q = min(1.0, m / num_available) if num_available else 1.0
        if not self.within_budget(q):
            log(WARNING, "central DP: another round would exceed target ε = %g; global adapter kept", self.epsilon)
            return None
        lora_prev, head_prev = self._start(rule, previous, replies, store_rank)
        lora_deltas, head_deltas = self._clipped_changes(rule, lora_prev, head_prev, replies)
        lora = {
            module: self._noisy_module(rule, prev, [d[module] for d in lora_deltas], store_rank, m)
            for module, prev in lora_prev.items()
        }
        z, c, g = self.z, self.settings.clip_norm, self.generator
        head = {
            k: prev + dp_mean([d[k] for d in head_deltas], noise_multiplier=z, clip_norm=c, generator=g, num_clients=m)
            for k, prev in head_prev.items()
        }
        self.ledger.record(self.z, q, 1)
        return lora, head

    def _noisy_module(
        self, rule: str, prev: Pair, clients: list[tuple[Tensor, Tensor, float]], store_rank: int, m: int
    ) -> Pair:
        """Previous global + the noisy mean change of one module, at ``store_rank`` (post-processing after noise)."""
        a_prev, b_prev = prev
        z, c, g = self.z, self.settings.clip_norm, self.generator
        if rule == "svd":
            svd = dp_mean_svd(clients, noise_multiplier=z, clip_norm=c, generator=g, num_clients=m)
            b_cat = torch.cat([b_prev, svd.U * svd.S], dim=1)  # (out, store_rank + k)
            a_cat = torch.cat([a_prev, svd.V.T], dim=0)  # (store_rank + k, in)
            return split_balanced(factored_svd(b_cat, a_cat, rank=store_rank), store_rank, 1.0)
        target = [(store_rank, 1.0)]
        if rule == "fedavg":
            ((d_a, d_sb),) = dp_fedavg(clients, target, noise_multiplier=z, clip_norm=c, generator=g, num_clients=m)
            return a_prev + d_a, b_prev + d_sb
        ((a_shared, d_sb),) = dp_ffa(clients, target, noise_multiplier=z, clip_norm=c, generator=g, num_clients=m)
        return a_shared, b_prev + d_sb

    def _start(
        self,
        rule: str,
        previous: tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]],
        replies: Sequence[TrainReply],
        store_rank: int,
    ) -> tuple[dict[str, Pair], dict[str, Tensor]]:
        """The previous global in float64; before the first aggregation, the public start every node trained from."""
        lora, head = previous
        if lora:
            return (
                {m: (_t(a), _t(b)) for m, (a, b) in lora.items()},
                {k: _t(v) for k, v in head.items()},
            )
        start: dict[str, Pair] = {}
        for module, (a, b) in replies[0].adapter.lora.items():
            out_features, in_features = b.shape[0], a.shape[1]
            init = _t(self.initial_a(module, store_rank, in_features)) if rule == "fedavg" else None
            a_start = init if init is not None else torch.zeros(store_rank, in_features, dtype=torch.float64)
            start[module] = (a_start, torch.zeros(out_features, store_rank, dtype=torch.float64))
        return start, {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in replies[0].adapter.head.items()}

    def _clipped_changes(
        self, rule: str, lora_prev: dict[str, Pair], head_prev: dict[str, Tensor], replies: Sequence[TrainReply]
    ) -> tuple[list[dict[str, tuple[Tensor, Tensor, float]]], list[dict[str, Tensor]]]:
        """Each client's change since what it was served, as the rule's client triples, jointly clipped to C."""
        serve = get_rule(rule)
        lora_out, head_out = [], []
        for reply in replies:
            r, s = reply.node.rank, reply.node.scaling
            triples: dict[str, tuple[Tensor, Tensor, float]] = {}
            for module, (a_prev, b_prev) in lora_prev.items():
                a_new, b_new = (_t(x) for x in reply.adapter.lora[module])
                ((a_ref, b_ref),) = serve([(a_prev, b_prev, 1.0)], [1.0], [(r, s)])
                if rule == "svd":
                    diff = factor_difference(LoRAFactors(a_new, b_new, s), LoRAFactors(a_ref, b_ref, s))
                    triples[module] = (diff.lora_A, diff.lora_B, 1.0)
                elif rule == "fedavg":
                    triples[module] = (a_new - a_ref, b_new - b_ref, s)
                else:  # ffa: lora_A is the frozen public init; only s·B changes
                    triples[module] = (a_new, b_new - b_ref, s)
            head = {k: _t(reply.adapter.head[k]) - prev for k, prev in head_prev.items()}
            factor = clip_scale(_released_norm(rule, triples, head), self.settings.clip_norm)
            scale_a = 1.0 if rule == "ffa" else factor  # ffa's lora_A is the public frozen init, not released
            lora_out.append({k: (a * scale_a, b * factor, s) for k, (a, b, s) in triples.items()})
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


def _released_norm(rule: str, triples: Mapping[str, tuple[Tensor, Tensor, float]], head: Mapping[str, Tensor]) -> float:
    """‖Δ_i‖ of what the rule releases a mean of: ΔW per module (svd), (s·ΔB, ΔA) (fedavg), s·ΔB (ffa), + head."""
    if rule == "svd":
        return update_norm({m: LoRAFactors(a, b, s) for m, (a, b, s) in triples.items()}, head)
    dense = dict(head)
    for module, (a, b, s) in triples.items():
        dense[f"{module}/s·B"] = s * b
        if rule == "fedavg":
            dense[f"{module}/A"] = a
    return update_norm({}, dense)


def _t(x: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.float64)
