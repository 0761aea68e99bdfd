"""The local optimiser: LoRA factors at learning-rate, the new head at learning-rate × head-lr-ratio."""

from __future__ import annotations

import pytest
import torch

from client.train import TrainSettings, make_optimizer, train

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, num_labels=3
    )
    base = transformers.BertForSequenceClassification(config)
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))


def test_the_head_gets_its_own_learning_rate() -> None:
    model = tiny_classifier()
    names = {id(p): n for n, p in model.named_parameters()}

    optimizer = make_optimizer(model, TrainSettings(steps=1, batch_size=4, learning_rate=1e-3, head_lr_ratio=10.0))

    lora, head = optimizer.param_groups
    assert lora["lr"] == pytest.approx(1e-3) and head["lr"] == pytest.approx(1e-2)
    assert all("lora_" in names[id(p)] for p in lora["params"])
    assert head["params"] and all(".classifier." in names[id(p)] for p in head["params"])
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(lora["params"]) + len(head["params"]) == trainable


def test_a_larger_head_ratio_moves_only_the_head_further_in_the_first_step() -> None:
    g = torch.Generator().manual_seed(1)
    data = {
        "input_ids": torch.randint(0, 50, (8, 6), generator=g),
        "attention_mask": torch.ones(8, 6, dtype=torch.long),
        "labels": torch.randint(0, 3, (8,), generator=g),
    }
    moved = {}
    for ratio in (1.0, 10.0):
        model = tiny_classifier()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        settings = TrainSettings(steps=1, batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, head_lr_ratio=ratio)
        train(model, data, settings, torch.device("cpu"))
        moved[ratio] = {
            n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in before
        }
    head = [n for n in moved[1.0] if "classifier" in n and "weight" in n]
    # Adam's first step moves every weight by about lr, whatever its gradient: the head's step is 10× larger.
    assert head and all(moved[10.0][n] == pytest.approx(10 * moved[1.0][n], rel=1e-3) for n in head)
    lora_B = [n for n in moved[1.0] if "lora_B" in n]
    assert lora_B and all(moved[10.0][n] == pytest.approx(moved[1.0][n], rel=1e-3) for n in lora_B)
