"""Instruction data for causal LMs: JSONL records, the chatterbot corpus, and the loss on the response tokens only.

A node's file is JSONL, one record per line, in one of three forms:

- ``{"prompt": "...", "response": "..."}`` (optionally ``"system": "..."``): one user turn and the answer;
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``: a chat,
  roles ``system``, ``user``, ``assistant``, ending with an assistant turn;
- ``{"text": "..."}``: plain text (every token is a target), like a line of a ``.txt`` file.

Chats are rendered with the tokenizer's chat template where it has one (``<s>role: content</s>`` style otherwise:
the prompt, a newline, the response, EOS). Labels are -100 on every token that is not part of an assistant turn, so
the loss is the response's only (as in TRL's ``completion_only_loss``). Rows are right-padded; training trims each
mini-batch to its longest row (:func:`client.train.batches`), so short examples do not pay for the longest one.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.train import Batch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
CHATTERBOT_DISTRIBUTION = "chatterbot-corpus"
CHATTERBOT_FOLDER = "chatterbot_corpus/data/english"

Message = dict[str, str]
Example = tuple[Message, ...] | str
"""A chat (messages ending with an assistant turn) or a plain text."""


def record_to_example(record: Any, where: str) -> Example:
    """One JSONL record as a chat or a text; a record of no known form raises ValueError naming ``where``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "prompt" in record or "response" in record:
        fields = {k: record.get(k) for k in ("prompt", "response")}
        bad = [k for k, v in fields.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ValueError(f"{where}: {' and '.join(bad)} must be non-empty strings")
        system = record.get("system")
        head = ({"role": "system", "content": str(system)},) if system else ()
        return (
            *head,
            {"role": "user", "content": fields["prompt"]},
            {"role": "assistant", "content": fields["response"]},
        )
    if isinstance(record.get("text"), str) and record["text"].strip():
        return str(record["text"])
    raise ValueError(f"{where}: expected 'prompt' and 'response', 'messages', or 'text', got keys {sorted(record)}")


def check_messages(messages: Any, where: str) -> tuple[Message, ...]:
    """Chat messages as dicts of role and content; the last one must be the assistant's."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"{where}: message {i} needs a role in {ROLES} and a string content, got {message!r}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the response to learn)")
    return tuple(out)


def read_examples(path: Path) -> list[Example]:
    """Every example of a ``.jsonl`` file (forms above) or of a ``.txt`` file (one text per non-empty line)."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        return [line.strip() for line in lines if line.strip()]
    examples: list[Example] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        examples.append(record_to_example(record, f"{path}:{number}"))
    if not examples:
        raise ValueError(f"{path} has no records")
    return examples


@dataclass(frozen=True)
class ExampleSplit:
    """A node's training and held-out examples (disjoint)."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def split_examples(name: str, examples: Sequence[Example], test: int, seed: int) -> ExampleSplit:
    """A seeded shuffle; ``test`` held out (at most a quarter, so that a small set keeps most for training)."""
    order = list(examples)
    random.Random(zlib.crc32(f"{seed}:{name}".encode())).shuffle(order)
    held = min(test, len(order) // 4)
    return ExampleSplit(name, tuple(order[held:]), tuple(order[:held]))


# --- the chatterbot corpus -------------------------------------------------------------------------------------------
def chatterbot_categories(folder: Path | None = None) -> dict[str, list[Example]]:
    """The English chatterbot corpus: category (file stem) → chats (alternating user and assistant turns).

    Read once per process and folder (the preflight, every node's split and the global set all ask for it)."""
    from client.tasks import packaged_file

    folder = folder or packaged_file(CHATTERBOT_DISTRIBUTION, f"{CHATTERBOT_FOLDER}/greetings.yml").parent
    return {name: list(chats) for name, chats in _read_chatterbot(folder).items()}


@functools.lru_cache(maxsize=4)
def _read_chatterbot(folder: Path) -> dict[str, tuple[Example, ...]]:
    import yaml

    categories: dict[str, list[Example]] = {}
    for path in sorted(folder.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        chats: list[Example] = []
        for turns in document.get("conversations") or []:
            texts = [str(t).strip() for t in turns if str(t).strip()]
            texts = texts[: len(texts) // 2 * 2]  # a trailing user turn has no answer to learn
            if texts:
                roles = ("user", "assistant") * (len(texts) // 2)
                chats.append(tuple({"role": r, "content": t} for r, t in zip(roles, texts, strict=True)))
        if chats:
            categories[path.stem] = chats
    if not categories:
        raise FileNotFoundError(f"no chatterbot conversations under {folder}")
    return {name: tuple(chats) for name, chats in categories.items()}


def chatterbot_split(test: int, seed: int, partition_id: int, num_partitions: int) -> ExampleSplit:
    """Node ``partition_id`` of ``num_partitions``: the categories ``sorted[partition_id::num_partitions]`` (one per
    node with 21 nodes), each split on its own (held out: ``test`` per category, at most a quarter of it)."""
    categories = chatterbot_categories()
    if not 0 <= partition_id < min(num_partitions, len(categories)):
        raise ValueError(
            f"partition-id {partition_id} of {num_partitions} nodes: the chatterbot task has {len(categories)} "
            "categories, one node at least per category group (num-nodes at most 21)"
        )
    names = sorted(categories)[partition_id::num_partitions]
    splits = [split_examples(name, categories[name], test, seed) for name in names]
    return ExampleSplit(
        "+".join(names), tuple(e for s in splits for e in s.train), tuple(e for s in splits for e in s.test)
    )


# --- tokenising with the loss on the response ------------------------------------------------------------------------
def render_ids(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> list[int]:
    """Token ids of ``messages``: the chat template where the tokenizer has one, else ``prompt\\nresponse</s>``."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=generation_prompt)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = ""
    for message in messages:
        end = tokenizer.eos_token if message["role"] == "assistant" else "\n"
        text += message["content"] + end
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def example_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    """``(input ids, labels)`` of one example: labels are the ids on assistant turns, -100 elsewhere."""
    if isinstance(example, str):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        text_ids = [start, *tokenizer(example, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        return text_ids, list(text_ids)
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(example):
        if message["role"] != "assistant":
            continue
        before = render_ids(tokenizer, example[:i], generation_prompt=True)
        through = render_ids(tokenizer, example[: i + 1], generation_prompt=False)
        if through[: len(before)] != before or len(before) < len(ids):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        labels += [IGNORE_INDEX] * (len(before) - len(ids)) + through[len(before) :]
        ids = through
    return ids, labels


def tokenize_examples(tokenizer: Any, examples: Sequence[Example], max_length: int) -> Batch:
    """Right-padded rows of at most ``max_length`` tokens; an example whose response is cut off entirely is left
    out (it would teach nothing). Raises ValueError when none is left."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for example in examples:
        ids, labels = example_ids(tokenizer, example)
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            rows.append((ids, labels))
    if not rows:
        raise ValueError(f"no example keeps a response token within max-length {max_length}; raise max-length")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_ids[i, : len(labels)] = torch.tensor(labels)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}
