"""Local training and evaluation: a plain torch loop (no Flower here)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from common.config import RunConfig

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule for one node's local steps."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    seed: int = 0
    head_lr_ratio: float = 1.0
    """Learning rate of the trainable parameters that are not LoRA factors (the new classification head), relative
    to ``learning_rate``."""
    schedule_offset: int = 0
    """Steps of the schedule taken before these ones (earlier rounds, when the schedule spans the run)."""
    schedule_total: int = 0
    """Length of the whole schedule; 0 means ``steps`` (warm-up and decay within these steps)."""

    @classmethod
    def from_config(cls, cfg: RunConfig, steps: int, seed: int = 0, server_round: int = 0) -> TrainSettings:
        """``steps`` steps with the run config's batch size, learning rates and schedule.

        With ``server_round`` ≥ 1 and ``schedule-span = "run"``, these steps are round ``server_round``'s share of
        one schedule over ``num-rounds`` rounds of ``steps`` (a round past ``num-rounds``, after a resume with more
        rounds, stretches the schedule to end there).
        """
        offset, total = 0, 0
        if server_round >= 1 and cfg.training.schedule_span == "run":
            offset, total = (server_round - 1) * steps, max(cfg.num_rounds, server_round) * steps
        return cls(
            steps,
            cfg.training.batch_size,
            cfg.training.learning_rate,
            cfg.training.warmup_ratio,
            cfg.training.schedule,
            seed,
            cfg.training.head_lr_ratio,
            offset,
            total,
        )

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rates at local step ``step`` (0-based)."""
        total = self.schedule_total or self.steps
        return lr_lambda(self.schedule_offset + step, total, self.warmup_ratio, self.schedule)


@dataclass(frozen=True)
class TrainResult:
    """What local training reports."""

    steps: int
    first_loss: float
    last_loss: float
    mean_loss: float


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss and accuracy."""

    loss: float
    accuracy: float
    num_examples: int


def lr_lambda(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warm-up, then cosine or linear decay to 0."""
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: LoRA factors at ``learning_rate``, the rest (the head) at
    ``learning_rate · head_lr_ratio``."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    lora = [p for name, p in trainable if "lora_" in name]
    rest = [p for name, p in trainable if "lora_" not in name]
    groups = [{"params": lora, "lr": settings.learning_rate}]
    if rest:
        groups.append({"params": rest, "lr": settings.learning_rate * settings.head_lr_ratio})
    return torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=0.0)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA; nothing on CPU (float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def trim_padding(batch: Batch) -> Batch:
    """Right-padded rows cut to the longest row of this batch (no column of padding only): the same loss and
    logits on the real tokens, without paying for the longest example of the whole set."""
    if "attention_mask" not in batch or batch["attention_mask"].ndim != 2:
        return batch
    width = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    if bool(batch["attention_mask"][:, width:].any()):
        return batch  # padded on the left: nothing to cut
    return {k: v[:, :width] if v.ndim == 2 and v.shape[1] >= width else v for k, v in batch.items()}


def batches(data: Batch, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless shuffled mini-batches (reshuffled every epoch), each trimmed to its longest row."""
    n = int(data["labels"].shape[0])
    if n == 0:
        raise ValueError("no training examples on this node")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield trim_padding({k: v[idx] for k, v in data.items()})


def train(
    model: torch.nn.Module,
    data: Batch,
    settings: TrainSettings,
    device: torch.device,
    every: int = 0,
    callback: Callable[[int, float], None] | None = None,
    bf16_on_cuda: bool = False,
) -> TrainResult:
    """Run ``settings.steps`` AdamW steps on the trainable parameters (LoRA and head, see :func:`make_optimizer`).

    With ``every`` > 0, ``callback(step, mean_loss_since_last_call)`` runs after every ``every`` steps. With
    ``bf16_on_cuda``, the forward pass runs under bf16 autocast when ``device`` is a CUDA device.
    """
    optimizer = make_optimizer(model, settings)
    scheduler = LambdaLR(optimizer, settings.lr_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    stream = batches(data, settings.batch_size, generator)
    model.to(device).train()
    losses = []
    for _ in range(settings.steps):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        with autocast(device) if bf16_on_cuda else contextlib.nullcontext():
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)}; lower learning-rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if callback is not None and every > 0 and len(losses) % every == 0:
            callback(len(losses), sum(losses[-every:]) / every)
            model.train()
    model.eval()
    return TrainResult(len(losses), losses[0], losses[-1], sum(losses) / len(losses))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Batch, batch_size: int, device: torch.device) -> EvalResult:
    """Mean cross-entropy and accuracy over ``data``."""
    model.to(device).eval()
    n = int(data["labels"].shape[0])
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        batch = {
            k: v.to(device)
            for k, v in trim_padding({k: v[start : start + batch_size] for k, v in data.items()}).items()
        }
        out = model(**batch)
        total_loss += float(out.loss) * int(batch["labels"].shape[0])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return EvalResult(total_loss / n, correct / n, n)


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
