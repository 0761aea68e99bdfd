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
