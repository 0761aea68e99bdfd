"""The ``tiny-llama`` preset: a random Llama-architecture causal LM built from a config with a fixed seed.

It stands in for SmolLM2 in tests and smoke runs (seconds, not minutes): the same architecture (grouped-query
attention, RoPE, SwiGLU, q/k/v/o projections), two layers of width 32, and a byte-level tokenizer (256 byte symbols
and three specials, no merges) that reads any UTF-8 text, so the Friends lines, instruction data and a node's own
file all tokenise without a trained vocabulary. It has a chat template, like an instruction-tuned model.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA_FOLDER = "tiny-llama-v1"
SPECIALS = ("<pad>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
"""A minimal chat format: each turn is ``<s>role: content</s>``; the generation prompt opens an assistant turn."""


def byte_level_tokenizer() -> object:
    """A tokenizer over the 256 byte symbols (GPT-2's byte-to-unicode alphabet) plus ``<pad>``, ``<s>``, ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIALS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(folder: Path) -> None:
    """Write the tiny Llama (seed 0) and its tokenizer into ``folder`` as a Hugging Face model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + 256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
