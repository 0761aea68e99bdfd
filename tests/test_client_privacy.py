"""Node-side DP-SGD on a tiny peft BERT, the persistent privacy state, and the Opacus prefix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from client.model import strip_opacus_prefix
from client.privacy import NodePrivacyState, attach_dp_sgd, dp_sample_rate, noise_only_step
from common.accounting import PrivacyLedger
from common.dp import make_generator

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SEED = 1234
SEQ_LEN = 8


def tiny_peft_bert(dropout: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    base = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(r=4, target_modules=["query", "key", "value"], task_type="SEQ_CLS")
    return peft.get_peft_model(base, lora)


def toy_loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(SEED)
    data = TensorDataset(torch.randint(0, 100, (n, SEQ_LEN), generator=g), torch.randint(0, 2, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def is_lora_or_head(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or "modules_to_save" in name


def test_dp_sgd_on_peft_bert_trains_only_lora_parameters() -> None:
    model = tiny_peft_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    private_model, private_optimizer, loader = attach_dp_sgd(
        model, optimizer, toy_loader(), noise_multiplier=1.0, max_grad_norm=1.0, generator=make_generator(SEED)
    )

    steps = 0
    for input_ids, labels in loader:
        if len(labels) == 0:
            noise_only_step(private_optimizer)
        else:
            logits = private_model(input_ids=input_ids).logits
            torch.nn.functional.cross_entropy(logits, labels).backward()
            graded = {n for n, p in model.named_parameters() if p.grad is not None}
            private_optimizer.step()
            private_optimizer.zero_grad()
            assert graded and all(is_lora_or_head(n) for n in graded)
        steps += 1
        if steps == 2:
            break

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(is_lora_or_head(n) for n in changed)
    assert any(".lora_B." in n for n in changed)
    assert dp_sample_rate(loader) == pytest.approx(1 / 4)


def test_per_sample_gradients_match_autograd_on_peft_bert() -> None:
    model = tiny_peft_bert(dropout=0.0)  # Opacus only records activations in train mode; no dropout instead of eval
    for name, p in model.named_parameters():
        if name.endswith("value.lora_B.default.weight"):
            p.data.normal_()  # peft starts B at 0; make lora_A's per-sample gradients non-trivial too
    reference = copy.deepcopy(model)  # without Opacus's hooks
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    private_model, _, _ = attach_dp_sgd(
        model, optimizer, toy_loader(), noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False
    )
    input_ids, labels = next(iter(toy_loader(n=3, batch_size=3)))

    torch.nn.functional.cross_entropy(private_model(input_ids=input_ids).logits, labels).backward()

    reference_params = dict(reference.named_parameters())
    for i in range(3):
        reference.zero_grad()
        single = reference(input_ids=input_ids[i : i + 1]).logits
        torch.nn.functional.cross_entropy(single, labels[i : i + 1]).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                expected = reference_params[name].grad
                torch.testing.assert_close(p.grad_sample[i], expected, rtol=1e-4, atol=1e-6, msg=name)
            else:
                assert getattr(p, "grad_sample", None) is None, name


def test_noise_only_step_moves_lora_parameters_by_noise() -> None:
    model = tiny_peft_bert()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    _, private_optimizer, _ = attach_dp_sgd(
        model, optimizer, toy_loader(), noise_multiplier=1.0, max_grad_norm=1.0, generator=make_generator(SEED)
    )
    lora_b = next(p for n, p in model.named_parameters() if ".lora_B." in n)

    noise_only_step(private_optimizer)

    assert bool(torch.isfinite(lora_b).all()) and float(lora_b.detach().abs().sum()) > 0


def test_optimizer_must_cover_the_trainable_parameters() -> None:
    model = tiny_peft_bert()
    trainable = [p for p in model.parameters() if p.requires_grad]

    with pytest.raises(ValueError, match="missing from the optimizer"):
        attach_dp_sgd(model, torch.optim.SGD(trainable[:1], lr=0.1), toy_loader(), noise_multiplier=1, max_grad_norm=1)


def test_node_state_is_cumulative_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "node" / "privacy.json"
    state = NodePrivacyState(path, delta=1e-5)

    eps_1 = state.spend(noise_multiplier=2.0, sample_rate=0.05, steps=4)
    eps_2 = state.spend(noise_multiplier=2.0, sample_rate=0.05, steps=4)
    restarted = NodePrivacyState(path, delta=1e-5)

    assert 0 < eps_1 < eps_2
    assert restarted.epsilon == eps_2
    assert restarted.ledger == PrivacyLedger(history=[(2.0, 0.05, 8)])
    assert json.loads(path.read_text())["history"] == [[2.0, 0.05, 8]]
    assert not list(path.parent.glob("*.tmp")), "the atomic write left a temp file behind"


def test_budget_check_gives_a_reason(tmp_path: Path) -> None:
    state = NodePrivacyState(tmp_path / "privacy.json", delta=1e-5)
    state.spend(2.0, 0.05, 4)
    eps = state.epsilon

    exhausted, reason = state.budget_exhausted(target_epsilon=eps / 2)
    ok, status = state.budget_exhausted(target_epsilon=eps * 10)
    over, why = state.budget_exhausted(target_epsilon=eps * 1.01, planned=(2.0, 0.05, 4))

    assert exhausted and "budget exhausted" in reason and f"{eps:.4g}" in reason
    assert not ok and "of target" in status
    assert over and "would be exceeded" in why
    assert state.epsilon == eps, "a planned spend must not be recorded"


def test_strip_opacus_prefix() -> None:
    state_dict = {"_module.a.weight": 1, "_module._module.b.bias": 2, "c": 3}

    assert strip_opacus_prefix(state_dict) == {"a.weight": 1, "b.bias": 2, "c": 3}
    with pytest.raises(ValueError, match="collides"):
        strip_opacus_prefix({"_module.a": 1, "a": 2})


def test_gradsample_state_dict_strips_to_the_peft_keys() -> None:
    model = tiny_peft_bert()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    private_model, _, _ = attach_dp_sgd(model, optimizer, toy_loader(), noise_multiplier=1.0, max_grad_norm=1.0)

    assert strip_opacus_prefix(private_model.state_dict()).keys() == model.state_dict().keys()
