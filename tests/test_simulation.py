"""A real Flower simulation (3 nodes at ranks 2, 4, 8; tiny model; 2 rounds), end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from boundary import assert_no_violations, tiny_bert
from conftest import SimulationRun

from client.model import resolve_model
from client.node import build_model
from client.node_settings import NodeSettings
from common.config import RunConfig
from common.lora import lora_scaling
from common.updates import Instruction
from server.checkpoint import load_latest_checkpoint
from server.global_adapter import GlobalAdapter

RANKS = {"partition-0": 2, "partition-1": 4, "partition-2": 8}


def test_run_completes_and_writes_outputs(tiny_simulation: SimulationRun) -> None:
    out = tiny_simulation.out_dir
    for name in ("config.json", "metrics.csv", "metrics.json", "metrics.png", "summary.txt"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [row["round"] for row in tiny_simulation.metrics()] == [0, 1, 2]
    assert "finished:completed" in tiny_simulation.output


def test_a_healthy_run_has_no_rank_warning_and_reports_what_is_served(tiny_simulation: SimulationRun) -> None:
    rows = tiny_simulation.metrics()
    assert [row["rank_warning"] for row in rows] == ["", "", ""]
    for row in rows[1:]:
        assert 0 < row["mean_energy_kept_r2"] < row["mean_energy_kept_r4"] < row["mean_energy_kept_r8"] <= 1
        assert row["mean_min_rank_energy"] == row["mean_energy_kept_r2"]
        assert row["mean_effective_rank"] >= 2


def test_loss_fell(tiny_simulation: SimulationRun) -> None:
    rows = tiny_simulation.metrics()
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[2]["train_loss"] < rows[1]["train_loss"]


def test_each_node_received_factors_of_its_own_rank(tiny_simulation: SimulationRun) -> None:
    entries = tiny_simulation.audit()
    received = [e for e in entries if e["message-type"] in ("train", "evaluate") and e["received"]["arrays"]]
    assert received, "no node ever received global factors"
    for entry in received:
        rank = RANKS[entry["node-name"]]
        for array in entry["received"]["arrays"]:
            if array["key"].endswith(".lora_A.weight"):
                assert array["shape"][0] == rank, (entry["node-name"], array)
            elif array["key"].endswith(".lora_B.weight"):
                assert array["shape"][1] == rank, (entry["node-name"], array)


def expected_reply_bytes(rank: int, cfg_dims: dict[str, tuple[int, int]], head_bytes: int) -> int:
    return sum(rank * (out + inn) * 4 for out, inn in cfg_dims.values()) + head_bytes


def test_only_lora_factors_and_head_leave_a_node(tiny_simulation: SimulationRun) -> None:
    # Arrange: the module dimensions and head of the tiny model, from the model itself.
    config = json.loads((resolve_model("tiny") / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    dims = {f"{layer}.{m}": (hidden, hidden) for layer in range(layers) for m in ("query", "key", "value")}
    head_bytes = (4 * hidden + 4) * 4  # classifier weight (4 labels × hidden) and bias, float32
    # Act
    sent = [e for e in tiny_simulation.audit() if e["message-type"] == "train"]
    # Assert
    assert len(sent) == 3 * 2
    for entry in sent:
        keys = [a["key"] for a in entry["sent"]["arrays"]]
        for key in keys:
            assert key.endswith((".lora_A.weight", ".lora_B.weight")) or key.startswith(
                "base_model.model.classifier."
            ), key
        total = sum(a["nbytes"] for a in entry["sent"]["arrays"])
        assert total == expected_reply_bytes(RANKS[entry["node-name"]], dims, head_bytes)


def test_nothing_but_named_scalars_and_the_factors_leave_a_node(tiny_simulation: SimulationRun) -> None:
    """Every record of every message a node sent passes the boundary check of tests/boundary.py."""
    base = tiny_bert(num_labels=4)
    entries = tiny_simulation.audit()
    assert {e["message-type"] for e in entries} >= {"train", "evaluate"}
    for name, rank in RANKS.items():
        assert_no_violations([e for e in entries if e["node-name"] == name], rank, base)


def test_exported_adapter_loads_with_stock_peft_and_matches_the_global_model(tiny_simulation: SimulationRun) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # Arrange: the in-memory global model, rebuilt from the last checkpoint the coordinator wrote.
    saved = json.loads((tiny_simulation.out_dir / "config.json").read_text())
    saved.pop("run-id")
    cfg = RunConfig.from_mapping(saved)
    checkpoint = load_latest_checkpoint(tiny_simulation.out_dir / "checkpoints", required=True)
    assert checkpoint.server_round == 2
    state = GlobalAdapter.from_config(cfg)
    state.load_arrays(checkpoint.arrays)
    rank = max(RANKS.values())
    node = NodeSettings.from_node_config(cfg, {"partition-id": 2, "num-partitions": 3})
    ins = Instruction(
        3, rank, lora_scaling(cfg.lora.lora_alpha, rank), state.serve(rank, lora_scaling(cfg.lora.lora_alpha, rank))
    )
    in_memory, _ = build_model(cfg, node, ins)
    # Act: stock peft loads the exported folder onto a fresh base model.
    path = resolve_model("tiny")
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    loaded = PeftModel.from_pretrained(base, str(tiny_simulation.out_dir / "adapter")).eval()
    tokens = AutoTokenizer.from_pretrained(path)(
        ["rocket orbit the moon", "guitar song and drum"], return_tensors="pt", padding=True
    )
    # Assert
    with torch.no_grad():
        expected = in_memory(**tokens).logits
        actual = loaded(**tokens).logits
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_the_global_accuracy_is_the_exported_adapters_accuracy_on_its_posts(tiny_simulation: SimulationRun) -> None:
    """The coordinator's global metric, recomputed with stock transformers and peft from the exported folder and the
    posts global_eval_set.json names."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from client.tasks import load_tiny

    # Arrange: the posts the coordinator evaluated on, by position in the tiny task's test split.
    chosen = json.loads((tiny_simulation.out_dir / "global_eval_set.json").read_text())
    test = load_tiny().test
    assert chosen["indices"] == list(range(len(test)))  # 160 test posts, fewer than global-eval-examples: all
    texts, labels = (
        [test.texts[i] for i in chosen["indices"]],
        torch.tensor([test.labels[i] for i in chosen["indices"]]),
    )
    # Act: the exported adapter on a fresh base model, evaluated by hand.
    path = resolve_model("tiny")
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=4), str(tiny_simulation.out_dir / "adapter")
    ).eval()
    tokens = AutoTokenizer.from_pretrained(path)(
        texts, truncation=True, max_length=16, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**tokens).logits
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    # Assert
    final = tiny_simulation.metrics()[-1]
    assert final["global_examples"] == len(texts)
    assert final["global_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert final["global_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("node_name", sorted(RANKS))
def test_run_store_knows_each_node_rank(tiny_simulation: SimulationRun, node_name: str) -> None:
    import sqlite3

    with sqlite3.connect(tiny_simulation.store) as db:
        rows = db.execute("SELECT name, rank FROM nodes").fetchall()
    assert (node_name, RANKS[node_name]) in rows
