"""The global evaluation: the adapter a user takes away, evaluated on one fixed held-out set after every round.

Each node evaluates the global adapter at *its own* rank on *its own* held-out share, so their mean describes a mix
of rank-2 … rank-32 models on label-skewed samples. What a user exports is one adapter, at the largest node rank;
:class:`GlobalEvaluator` loads exactly that adapter (``GlobalAdapter.export``) onto the base model and evaluates it
on the task's fixed set (:meth:`client.task_types.TaskType.global_set`). The coordinator runs it in simulation, and in
a deployment when it has the task's data or ``server-eval-data``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from peft import PeftModel

from client.causal_lm import resolve_causal_model
from client.model import load_adapter_inplace, resolve_model
from client.node_settings import NodeSettings
from client.task_types import CausalLM, GlobalSet, TaskType, task_type_for
from client.train import pick_device
from common.config import RunConfig
from common.updates import AdapterFactors

PREFIX = "global-"
"""What the global metrics are called (``global-accuracy``, ``global-loss``, ``global-perplexity``, …)."""


@dataclass
class GlobalEvaluator:
    """Evaluates an exported adapter (or the untrained model) on the run's fixed held-out set."""

    cfg: RunConfig
    task: TaskType
    examples: GlobalSet
    seconds: float = 0.0
    """Time the last evaluation took."""

    @classmethod
    def from_config(cls, cfg: RunConfig) -> GlobalEvaluator | None:
        """The evaluator of a run, or None when it has no fixed set (turned off, or nodes' own files only)."""
        task = task_type_for(cfg.task)
        examples = task.global_set(cfg)
        return None if examples is None else cls(cfg, task, examples)

    @property
    def description(self) -> dict[str, Any]:
        """The fixed set: where its examples come from and their positions there."""
        return {"source": self.examples.source, "indices": list(self.examples.indices)}

    @property
    def base_model(self) -> str:
        """The run's model as a local Hugging Face folder (a preset resolved), which the exported adapter names."""
        if isinstance(self.task, CausalLM):
            return str(resolve_causal_model(self.cfg.model))
        return str(resolve_model(self.cfg.model))

    def __call__(self, adapter: AdapterFactors | None, rank: int) -> dict[str, float]:
        """``global-*`` metrics of ``adapter`` (factors at ``rank`` with peft's scaling, and the head), or of the base
        model at the public start when there is no adapter yet."""
        started = time.perf_counter()
        node = NodeSettings(rank, self.cfg.model, self.cfg.task, 0, 1, "coordinator")
        model, settings = self.task.model(self.cfg, node)
        if adapter is not None:
            load_adapter_inplace(model, adapter, settings)
        metrics = self.evaluate_model(model)
        self.seconds = time.perf_counter() - started
        return metrics

    def evaluate_model(self, model: PeftModel) -> dict[str, float]:
        """``global-*`` metrics of a model as it is (the centralized baseline's, or one built by :meth:`__call__`)."""
        count, metrics = self.task.evaluate(model, self.examples.batch, self.cfg, pick_device())
        named = {PREFIX + key.removeprefix("eval-"): value for key, value in metrics.items()}
        return {**named, PREFIX + "examples": float(count)}
