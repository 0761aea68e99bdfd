"""Using an exported adapter: ``fedlora export --merge`` (a merged folder stock transformers loads, the same logits
as base + adapter) and ``fedlora generate`` (base and fine-tuned completions, greedy), for both task types."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import run_fedlora
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from client.adapter_tools import export_main, generate_main
from client.causal_lm import resolve_causal_model
from client.model import resolve_model

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


def perturbed(model: PeftModel, seed: int = 0) -> PeftModel:
    """Every lora_B (and a saved head) set to seeded noise, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def causal_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("causal") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve_causal_model("tiny-llama"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    perturbed(get_peft_model(base, config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("classifier") / "adapter"
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny"), num_labels=4)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                        task_type="SEQ_CLS")  # fmt: skip
    perturbed(get_peft_model(base, config)).save_pretrained(folder)
    return folder


def test_a_merged_causal_lm_loads_in_stock_transformers_with_the_logits_of_base_plus_adapter(
    causal_adapter: Path, tmp_path: Path
) -> None:
    # Act
    assert export_main(["--merge", str(causal_adapter), "--out", str(tmp_path / "merged")]) == 0
    # Assert
    base = AutoModelForCausalLM.from_pretrained(resolve_causal_model("tiny-llama")).eval()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        adapted = PeftModel.from_pretrained(base, causal_adapter).eval()(input_ids=IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=IDS).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-3)  # the adapter changes the model


def test_a_merged_classifier_keeps_the_trained_head(classifier_adapter: Path, tmp_path: Path) -> None:
    assert export_main(["--merge", str(classifier_adapter), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("tiny"), num_labels=4)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, classifier_adapter).eval()(input_ids=ids).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)


def test_export_refuses_a_folder_that_is_not_empty(causal_adapter: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    done = run_fedlora("export", "--merge", str(causal_adapter), "--out", str(tmp_path / "taken"), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("fedlora: error: ")
    assert "is not empty" in done.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_generate_prints_base_and_fine_tuned_completions_the_same_each_time(
    causal_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--adapter", str(causal_adapter), "--prompt", "How you doin?", "--max-new-tokens", "8"]
    assert generate_main(argv) == 0
    first = capsys.readouterr().out
    assert generate_main(argv) == 0
    assert capsys.readouterr().out == first
    lines = dict(line.split(":", 1) for line in first.strip().splitlines())
    assert set(lines) == {"prompt", "base", "fine-tuned"}
    assert lines["base"] != lines["fine-tuned"]  # the adapter changes the greedy completion


@pytest.mark.parametrize("what", ["classifier", "missing"])
def test_generate_refuses_what_is_not_a_causal_adapter_in_one_line(
    classifier_adapter: Path, tmp_path: Path, what: str
) -> None:
    adapter = classifier_adapter if what == "classifier" else tmp_path / "nothing"
    done = run_fedlora("generate", "--adapter", str(adapter), "--prompt", "hi", timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedlora: error: ")
    assert ("classification adapter (SEQ_CLS)" if what == "classifier" else "no adapter_config.json") in last


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_export_check_reports_how_far_the_merged_logits_are_from_base_plus_adapter(
    kind: str, causal_adapter: Path, classifier_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = causal_adapter if kind == "causal" else classifier_adapter
    args = ["--merge", str(adapter), "--out", str(tmp_path / "merged"), "--check", "What is a topic?"]
    assert export_main(args) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    gaps = [float(x) for x in re.findall(r"(\d\.\d\de[-+]\d\d)", line)]
    assert "differ from base + adapter by at most" in line and len(gaps) == 3, line
    assert all(0 <= gap < 1e-4 for gap in gaps), line
