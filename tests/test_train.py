"""The local optimiser: LoRA factors at learning-rate, the new head at learning-rate × head-lr-ratio."""

from __future__ import annotations

import pytest
import torch

from client.train import TrainSettings, lr_lambda, make_optimizer, train
from common.config import RunConfig

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


def run_config(**keys: object) -> RunConfig:
    return RunConfig.from_mapping({"num-rounds": 4, "local-steps": 10, "warmup-ratio": 0.1, **keys})


def test_a_run_long_schedule_is_one_warm_up_and_decay_cut_into_rounds() -> None:
    cfg = run_config(**{"schedule-span": "run"})
    per_round = [TrainSettings.from_config(cfg, 10, server_round=r) for r in range(1, 5)]
    factors = [s.lr_factor(step) for s in per_round for step in range(10)]

    assert factors == [lr_lambda(step, 40, 0.1, "cosine") for step in range(40)]
    warming = [i for i in range(39) if factors[i + 1] > factors[i]]
    assert warming == [0, 1, 2]  # warm-up once, over the first 4 of 40 steps
    assert factors[-1] < 0.01 and min(factors[:30]) > 0.2  # decays to ~0 only in the last round


def test_a_round_long_schedule_warms_up_and_decays_every_round() -> None:
    cfg = run_config(**{"schedule-span": "round"})
    for r in (1, 3):
        settings = TrainSettings.from_config(cfg, 10, server_round=r)
        assert [settings.lr_factor(s) for s in range(10)] == [lr_lambda(s, 10, 0.1, "cosine") for s in range(10)]


def test_a_round_past_num_rounds_stretches_the_schedule_instead_of_training_at_rate_0() -> None:
    settings = TrainSettings.from_config(run_config(**{"schedule-span": "run"}), 10, server_round=6)
    assert settings.schedule_total == 60 and settings.lr_factor(0) > 0.0


def test_an_unknown_schedule_span_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="schedule-span must be one of"):
        run_config(**{"schedule-span": "epoch"})
