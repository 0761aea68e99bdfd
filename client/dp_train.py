"""Local training with DP-SGD: the private counterpart of :func:`client.train.train` (no Flower here).

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", arXiv 1607.00133) over the trainable
parameters only (the LoRA factors and the classifier head; peft freezes the base model). Each step draws a Poisson
sample of the node's examples at rate q = 1 / ⌈n / batch-size⌉ (Opacus's ``DPDataLoader``), clips every example's
gradient to ‖g‖ ≤ C (``max-grad-norm``), sums, adds N(0, (z·C)²) and steps AdamW. Each step is a sampled Gaussian
mechanism, so the node's ledger records ``(z, q, steps)`` and ε(δ) composes over every round it has trained
(:class:`client.privacy.NodePrivacyState`).

The round's steps are written to the ledger **before** they run and the node refuses a round that would take ε
past ``target-epsilon`` (:class:`PrivacyBudgetExhausted`), so a crash can only over-count.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import NodePrivacyState, attach_dp_sgd, dp_sample_rate, noise_only_step
from client.train import Batch, TrainResult, TrainSettings, make_optimizer
from common.accounting import noise_multiplier_for
from common.dp import make_generator

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


class PrivacyBudgetExhausted(RuntimeError):
    """The node declines to train: another round would take its ε past its budget (the message says by how much)."""


@dataclass(frozen=True)
class LocalDPSettings:
    """DP-SGD settings of one node, resolved from the run config."""

    noise_multiplier: float
    """z; 0 means "calibrate z so that ``planned_steps`` steps reach ``target_epsilon``"."""
    max_grad_norm: float
    """Per-example clipping bound C."""
    delta: float
    """δ of the reported (ε, δ)."""
    target_epsilon: float
    """The node's ε budget (0: none)."""
    accountant: str
    """``rdp`` or ``prv``."""
    planned_steps: int
    """Steps the whole run plans for this node (num-rounds × local-steps), for calibration."""
    seed: int | None
    """Seed of the noise and sampling generators (tests only); None seeds them from the OS's CSPRNG."""


@dataclass(frozen=True)
class PrivateTrainResult:
    """What a DP-SGD round reports besides the losses."""

    result: TrainResult
    epsilon: float
    """Cumulative ε(δ) of this node after the round."""
    noise_multiplier: float
    sample_rate: float


@functools.lru_cache(maxsize=32)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return noise_multiplier_for(target_epsilon, delta, sample_rate, steps, accountant)


def resolve_noise_multiplier(dp: LocalDPSettings, sample_rate: float) -> float:
    """z as configured, or the smallest z whose ε after the planned steps stays within the target (Opacus's search)."""
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    return _calibrated(dp.target_epsilon, dp.delta, sample_rate, dp.planned_steps, dp.accountant)


def _poisson_batches(loader: DataLoader[Any], keys: list[str]) -> Iterator[Batch]:
    """Endless Poisson batches (possibly empty) as dicts keyed like the node's tokenised data."""
    while True:
        for columns in loader:
            yield dict(zip(keys, columns, strict=True))


def train_private(
    model: torch.nn.Module,
    data: Batch,
    settings: TrainSettings,
    dp: LocalDPSettings,
    state: NodePrivacyState,
    device: torch.device,
) -> PrivateTrainResult:
    """Run ``settings.steps`` DP-SGD steps (AdamW on the noisy clipped gradients), spending from ``state``.

    Raises :class:`PrivacyBudgetExhausted` before touching the model when the round would exceed the budget.
    """
    keys = sorted(data)
    loader = DataLoader(TensorDataset(*(data[k] for k in keys)), batch_size=settings.batch_size)
    sample_rate = dp_sample_rate(loader)
    z = resolve_noise_multiplier(dp, sample_rate)
    if dp.target_epsilon > 0:
        exhausted, reason = state.budget_exhausted(dp.target_epsilon, (z, sample_rate, settings.steps))
        if exhausted:
            raise PrivacyBudgetExhausted(f"node declines to train: {reason}")
    model.to(device).train()
    optimizer = make_optimizer(model, settings)  # as client.train.train
    scheduler = LambdaLR(optimizer, settings.lr_factor)
    generator = make_generator(dp.seed, device=device) if dp.seed is not None else None
    private_model, private_optimizer, private_loader = attach_dp_sgd(
        model, optimizer, loader, noise_multiplier=z, max_grad_norm=dp.max_grad_norm, generator=generator
    )
    epsilon = state.spend(z, sample_rate, settings.steps)
    try:
        losses = _steps(private_model, private_optimizer, scheduler, _poisson_batches(private_loader, keys), settings)
    finally:
        private_model._close()  # Opacus's hooks and per-sample gradients off the peft model
    model.eval()
    if not losses:  # every batch was empty: nothing to report but the noise
        losses = [float("nan")]
    result = TrainResult(settings.steps, losses[0], losses[-1], sum(losses) / len(losses))
    return PrivateTrainResult(result, epsilon, z, sample_rate)


def _steps(
    private_model: torch.nn.Module,
    optimizer: DPOptimizer,
    scheduler: LambdaLR,
    stream: Iterator[Batch],
    settings: TrainSettings,
) -> list[float]:
    """The DP-SGD loop; an empty Poisson batch takes the noise-only step (skipping it would reveal it was empty)."""
    losses = []
    for _ in range(settings.steps):
        batch = next(stream)
        if int(batch["labels"].shape[0]) == 0:
            noise_only_step(optimizer)
        else:
            device = next(p.device for p in private_model.parameters())
            loss = private_model(**{k: v.to(device) for k, v in batch.items()}).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)}; lower learning-rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        scheduler.step()
    return losses
