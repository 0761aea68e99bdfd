"""Local DP on a node: DP-SGD rounds spend from a ledger that survives restarts, and a spent budget is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.dp_train import LocalDPSettings, PrivacyBudgetExhausted, train_private
from client.node import privacy_state
from client.node_settings import NodeSettings
from client.privacy import STATE_DIR_ENV, NodePrivacyState, state_dir
from client.train import TrainSettings
from common.accounting import compose_epsilon
from common.config import RunConfig

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

N, BATCH, STEPS = 24, 8, 3  # q = 1 / ⌈24 / 8⌉ = 1/3


def tiny_peft_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    base = transformers.BertForSequenceClassification(config)
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))


def toy_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 50, (N, 6), generator=g),
        "attention_mask": torch.ones(N, 6, dtype=torch.long),
        "labels": torch.randint(0, 2, (N,), generator=g),
    }


def dp_settings(z: float = 1.0, target: float = 0.0) -> LocalDPSettings:
    return LocalDPSettings(z, 1.0, 1e-5, target, "rdp", planned_steps=2 * STEPS, seed=5)


def one_round(state: NodePrivacyState, dp: LocalDPSettings) -> float:
    settings = TrainSettings(steps=STEPS, batch_size=BATCH, learning_rate=1e-2)
    return train_private(tiny_peft_bert(), toy_data(), settings, dp, state, torch.device("cpu")).epsilon


def test_epsilon_is_cumulative_across_rounds_and_a_node_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    first = one_round(NodePrivacyState(path, delta=1e-5), dp_settings())
    second = one_round(NodePrivacyState(path, delta=1e-5), dp_settings())  # a new process reads the same file

    assert 0 < first < second
    assert second == pytest.approx(compose_epsilon([(1.0, 1 / 3, 2 * STEPS)], 1e-5))


def test_trained_parameters_keep_their_peft_names(tmp_path: Path) -> None:
    from peft import get_peft_model_state_dict

    model = tiny_peft_bert()
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    state = NodePrivacyState(tmp_path / "ledger.json", delta=1e-5)
    settings = TrainSettings(steps=STEPS, batch_size=BATCH, learning_rate=1e-2)
    train_private(model, toy_data(), settings, dp_settings(), state, torch.device("cpu"))

    after = get_peft_model_state_dict(model)
    assert after.keys() == before.keys() and not any("_module." in k for k in after)
    assert any(not torch.equal(after[k], before[k]) for k in after)


def test_calibrated_noise_fits_the_planned_rounds_and_the_next_is_refused(tmp_path: Path) -> None:
    state = NodePrivacyState(tmp_path / "ledger.json", delta=1e-5)
    dp = dp_settings(z=0.0, target=4.0)  # z calibrated so that 2 rounds of STEPS reach ε ≤ 4
    spent = [one_round(state, dp), one_round(state, dp)]

    with pytest.raises(PrivacyBudgetExhausted, match=r"node declines to train: privacy budget .* target ε = 4"):
        one_round(state, dp)
    assert spent[0] < spent[1] <= 4.0
    assert state.ledger.steps == 2 * STEPS  # the refused round spent nothing


def test_the_ledger_lives_in_the_node_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig.from_mapping({"dp": "local", "noise-multiplier": 1.0, "out-dir": "/runs/a"})
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "env"))
    from_env = NodeSettings.from_node_config(cfg, {"partition-id": 1, "num-partitions": 3})
    from_node = NodeSettings.from_node_config(cfg, {"partition-id": 1, "state-dir": str(tmp_path / "node")})

    assert privacy_state(cfg, from_env).path.parent == tmp_path / "env"
    assert privacy_state(cfg, from_node).path.parent == tmp_path / "node"
    assert privacy_state(cfg, from_env).path == privacy_state(cfg, from_env).path  # stable across restarts
    other_run = RunConfig.from_mapping({"dp": "local", "noise-multiplier": 1.0, "out-dir": "/runs/b"})
    assert privacy_state(other_run, from_env).path != privacy_state(cfg, from_env).path
    monkeypatch.delenv(STATE_DIR_ENV)
    assert state_dir() == Path.home() / ".cache" / "fedlora" / "state"
