"""The centralized baseline: one LoRA on the pooled data, at its own learning rate (baseline-learning-rate)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_SETTINGS

from common.config import RunConfig
from simulations.centralized import run_centralized


def test_the_baseline_trains_at_baseline_learning_rate_not_the_nodes_rate(tmp_path: Path) -> None:
    # Arrange: a node rate at which AdamW would wreck the tiny model, and a sane baseline rate.
    cfg = RunConfig.from_mapping({**TINY_SETTINGS, "learning-rate": 5.0, "baseline-learning-rate": 0.02})
    out = tmp_path / "centralized"
    # Act
    rows = run_centralized(cfg, 3, out)
    # Assert: 3 nodes × 2 rounds × 15 steps, evaluated every 45 steps, and it learned.
    assert [row["step"] for row in rows] == [0, 45, 90]
    assert rows[-1]["eval_accuracy"] >= rows[0]["eval_accuracy"] + 0.3
    assert json.loads((out / "config.json").read_text())["baseline-learning-rate"] == 0.02
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "summary.txt").is_file()


def test_the_baseline_of_a_causal_lm_trains_on_every_nodes_lines_and_reports_perplexity(tmp_path: Path) -> None:
    # Arrange: the tiny Llama on the Friends lines of two characters.
    settings = {
        "model": "tiny-llama", "task": "friends", "node-ranks": "2,4", "num-rounds": 2, "local-steps": 10,
        "batch-size": 8, "baseline-learning-rate": 0.01, "max-length": 32, "eval-examples": 8,
        "train-examples": 60, "global-eval-examples": 48,
    }  # fmt: skip
    out = tmp_path / "centralized"
    # Act
    rows = run_centralized(RunConfig.from_mapping(settings), 2, out)
    # Assert: 2 nodes × 2 rounds × 10 steps; the perplexity of the adapter on the federated run's fixed set fell.
    assert [row["step"] for row in rows] == [0, 20, 40]
    assert rows[-1]["global_perplexity"] < rows[0]["global_perplexity"]
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert "eval_accuracy" not in rows[-1]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert "global perplexity" in (out / "summary.txt").read_text()
