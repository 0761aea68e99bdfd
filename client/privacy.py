"""Node-side sample-level DP: Opacus DP-SGD over the trainable (LoRA) parameters, and the node's privacy ledger.

DP-SGD (Abadi et al. 2016, arXiv 1607.00133): each step draws a Poisson sample at rate q, clips every example's
gradient to L2 norm ≤ C, sums, adds N(0, (z·C)²) and divides by the expected batch size. Only parameters with
``requires_grad=True`` take part: peft freezes the base model, so the mechanism covers the LoRA factors and the new
classifier head (``modules_to_save``), which are the only things a node releases.

The node's ε is cumulative over rounds and restarts: :class:`NodePrivacyState` keeps a
:class:`common.accounting.PrivacyLedger` in a JSON file, written atomically, in the node's state folder
(:func:`state_dir`): node-config ``state-dir``, else ``$FEDLORA_STATE_DIR``, else ``~/.cache/fedlora/state``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.accounting import PrivacyLedger, check_delta, check_entry, opacus_accountants
from common.atomic_file import write_json_atomic
from common.dp import make_generator

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

STATE_DIR_ENV = "FEDLORA_STATE_DIR"
"""Environment variable naming the folder of node-side privacy ledgers (when node-config has no ``state-dir``)."""


def attach_dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[GradSampleModule, DPOptimizer, DataLoader[Any]]:
    """Make (model, optimizer, data_loader) private with Opacus's ``GradSampleModule``, ``DPOptimizer`` and
    ``DPDataLoader``, over the parameters with ``requires_grad=True`` only.

    Mirrors ``opacus.PrivacyEngine.make_private`` (sample rate q = 1 / len(data_loader), expected batch size
    ⌊q·|dataset|⌋, loss reduction "mean"), without its accountant (use :class:`NodePrivacyState`) and with both
    randomness sources under control: ``generator`` (on the parameters' device) drives the noise, and Poisson sampling
    uses a CPU generator seeded by a draw from it; without one, both are seeded from the OS's CSPRNG
    (:func:`common.dp.make_generator`). ``PrivacyEngine`` would sample batches from torch's global RNG.

    The RDP/PRV analysis assumes Poisson sampling; ``poisson_sampling=False`` keeps the shuffled fixed-size batches,
    for which the same ε is only a heuristic. Poisson batches can be empty: HF models fail on a zero-length batch,
    so call :func:`noise_only_step` for those instead of a forward pass.
    """
    opacus_accountants()  # imports Opacus with the root logger kept as it was
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    _check_dp_arguments(noise_multiplier, max_grad_norm)
    _check_optimizer_covers_trainable(model, optimizer)
    ModuleValidator.validate(model, strict=True)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    noise_generator, sample_generator = _dp_generators(generator, device)
    private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    private_loader: DataLoader[Any] = data_loader
    if poisson_sampling:
        private_loader = DPDataLoader.from_data_loader(data_loader, generator=sample_generator)
        private_model.forbid_grad_accumulation()
    sample_rate = dp_sample_rate(private_loader)
    expected_batch_size = int(len(data_loader.dataset) * sample_rate)  # type: ignore[arg-type]
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=max(expected_batch_size, 1),
        loss_reduction="mean",
        generator=noise_generator,
    )
    return private_model, private_optimizer, private_loader


def _check_optimizer_covers_trainable(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter must be in the optimizer (or its gradient would escape clipping) and vice versa."""
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters; attach the LoRA adapter before DP-SGD")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = sorted(name for pid, name in trainable.items() if pid not in in_optimizer)
    if missing:
        raise ValueError(f"trainable parameters missing from the optimizer: {missing[:5]} ({len(missing)} in all)")
    if not in_optimizer <= set(trainable):
        raise ValueError(
            "the optimizer holds parameters that are frozen or not in the model; build it over "
            "[p for p in model.parameters() if p.requires_grad]"
        )


def _check_dp_arguments(noise_multiplier: float, max_grad_norm: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got noise_multiplier={noise_multiplier}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be positive and finite, got max_grad_norm={max_grad_norm}")


def _dp_generators(generator: torch.Generator | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(noise, Poisson sampling) generators: ``generator`` and a CPU one seeded by a draw from it, or two CSPRNG ones.

    A seed drawn from the noise stream (not the same seed) keeps sampling and noise uncorrelated in seeded runs.
    """
    noise_generator = generator if generator is not None else make_generator(None, device=device)
    sample_seed = int(torch.randint(0, 2**62, (1,), generator=noise_generator, device=noise_generator.device))
    return noise_generator, make_generator(None if generator is None else sample_seed)


def dp_sample_rate(data_loader: DataLoader[Any]) -> float:
    """Opacus's sampling rate q = 1 / len(data_loader), the rate to record in the ledger for each step."""
    if len(data_loader) == 0:
        raise ValueError("the data loader is empty; there is nothing to sample")
    return 1.0 / len(data_loader)


def noise_only_step(optimizer: DPOptimizer) -> None:
    """Take the DP-SGD step of an empty Poisson batch: zero clipped gradients plus noise, then the optimizer step.

    Skipping the step would reveal that the batch was empty, which depends on the data; the noise-only step is what
    DP-SGD releases for it, and the step still counts in the ledger.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()


def state_dir(node_state_dir: str = "") -> Path:
    """Where a node keeps its privacy ledgers: node-config ``state-dir``, ``$FEDLORA_STATE_DIR``, or the cache.

    It must outlive the ClientApp process (Flower starts one per message) and the SuperNode, so it is a folder on
    the node, never a coordinator path.
    """
    chosen = node_state_dir or os.environ.get(STATE_DIR_ENV, "")
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "fedlora" / "state"


def ledger_path(folder: Path, node_name: str, run_key: str) -> Path:
    """``<folder>/<node-name>-<run-key>.json``, with characters other than letters, digits, ``-_.`` replaced."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{node_name}-{run_key}")
    return folder / f"{safe}.json"


class NodePrivacyState:
    """A node's privacy ledger persisted in a JSON file, so its ε is cumulative across rounds and restarts.

    Record a round's steps with :meth:`spend` **before** training them: a crash then over-counts, never under-counts.
    """

    def __init__(self, path: str | os.PathLike[str], *, delta: float, mechanism: str = "rdp") -> None:
        self.path = Path(path)
        self.delta = check_delta(delta)
        history = []
        if self.path.exists():
            with self.path.open(encoding="utf-8") as fh:
                history = PrivacyLedger.from_dict(json.load(fh)).history
        self.ledger = PrivacyLedger(mechanism=mechanism, history=history)

    @property
    def epsilon(self) -> float:
        """ε(δ) spent so far."""
        return self.ledger.epsilon(self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε(δ) if ``steps`` more steps at (z, q) were spent; changes nothing."""
        check_entry(noise_multiplier, sample_rate, steps)
        trial = PrivacyLedger(self.ledger.mechanism, list(self.ledger.history))
        trial.record(noise_multiplier, sample_rate, steps)
        return trial.epsilon(self.delta)

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record ``steps`` DP-SGD steps at (z, q), save the ledger, and return the new ε."""
        self.ledger.record(noise_multiplier, sample_rate, steps)
        self.save()
        return self.epsilon

    def save(self) -> None:
        """Write the ledger to :attr:`path` atomically."""
        write_json_atomic(self.path, self.ledger.to_dict(), mode=0o600)

    def budget_exhausted(
        self, target_epsilon: float, planned: tuple[float, float, int] | None = None
    ) -> tuple[bool, str]:
        """Whether the node must refuse to train, and why (or how much is left).

        Exhausted when ε already reaches ``target_epsilon``, or when the ``planned`` (z, q, steps) would exceed it.
        """
        if not (target_epsilon > 0):
            raise ValueError(f"target_epsilon must be positive, got target_epsilon={target_epsilon}")
        spent = self.epsilon
        where = f"(δ = {self.delta:g}, {self.ledger.steps} steps, {self.ledger.mechanism} accountant)"
        if spent >= target_epsilon:
            return True, f"privacy budget exhausted: ε = {spent:.4g} ≥ target ε = {target_epsilon:.4g} {where}"
        if planned is not None:
            after = self.epsilon_after(*planned)
            if after > target_epsilon:
                z, q, n = planned
                return True, (
                    f"privacy budget would be exceeded: {n} more steps at z = {z:g}, q = {q:g} bring ε from "
                    f"{spent:.4g} to {after:.4g} > target ε = {target_epsilon:.4g} {where}"
                )
        return False, f"ε = {spent:.4g} of target ε = {target_epsilon:.4g} spent {where}"
