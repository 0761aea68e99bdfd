"""Causal-LM federations through the real runtime: ``fedlora simulate`` of the tiny Llama on Flower's simulation
engine, two nodes at ranks 2 and 4, the Friends lines with svd and the chatterbot chats with ffa. The exported
adapter loads with stock peft on ``AutoModelForCausalLM`` and gives the coordinator's final global perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import simulate

pytestmark = pytest.mark.slow

LLM_SETTINGS = {
    "model": "tiny-llama", "node-ranks": "2,4", "num-rounds": 2, "local-steps": 10, "batch-size": 8,
    "learning-rate": 0.01, "lora-alpha": 8.0, "eval-examples": 8, "train-examples": 60, "global-eval-examples": 48,
}  # fmt: skip
CASES = {"friends": ("svd", 32), "chatterbot": ("ffa", 96)}
"""task → (rule, max-length)."""


@pytest.mark.parametrize("task", sorted(CASES))
def test_a_causal_lm_federation_runs_on_flower_and_exports_a_stock_peft_adapter(tmp_path: Path, task: str) -> None:
    # Act
    rule, max_length = CASES[task]
    run = simulate(tmp_path, nodes=2, cpus_per_node=1, task=task, rule=rule, **{"max-length": max_length},
                   **LLM_SETTINGS)  # fmt: skip
    # Assert: completed, the perplexity of the exported adapter on the fixed set fell, and the files say causal LM.
    assert run.returncode == 0, run.output[-3000:]
    rows = run.metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["global_perplexity"] < rows[0]["global_perplexity"]
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert "perplexity" in (run.out_dir / "summary.txt").read_text()
    adapter_config = json.loads((run.out_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["r"] == 4
    # Stock transformers + peft, from the folder the adapter names, give the coordinator's final number.
    assert stock_perplexity(run.out_dir, run.config()) == pytest.approx(rows[-1]["global_perplexity"], rel=1e-4)


def stock_perplexity(out_dir: Path, settings: dict[str, object]) -> float:
    """The exported adapter on the run's fixed held-out set, loaded as a user would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from client.causal_lm import line_perplexities
    from client.task_types import task_type_for
    from common.config import RunConfig

    adapter = out_dir / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), adapter)
    cfg = RunConfig.from_mapping(settings)
    fixed = task_type_for(cfg.task).global_set(cfg)
    assert fixed is not None
    everything, _ = line_perplexities(model, fixed.batch, 16, torch.device("cpu"))
    assert math.isfinite(everything.value)
    return everything.value
