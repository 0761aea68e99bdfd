"""Instruction data: JSONL forms, the chatterbot corpus, the loss on the response tokens only, trimmed padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.instruct import (
    IGNORE_INDEX,
    chatterbot_categories,
    chatterbot_split,
    example_ids,
    read_examples,
    split_examples,
    tokenize_examples,
)
from client.tiny_llama import byte_level_tokenizer
from client.train import trim_padding
from common.task_kind import is_causal_task, peft_task_type

TOKENIZER = byte_level_tokenizer()


def text_of(ids: list[int]) -> str:
    return str(TOKENIZER.decode(ids))  # type: ignore[attr-defined]


def targets(ids: list[int], labels: list[int]) -> str:
    """The text of the positions that carry a label."""
    return text_of([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_a_prompt_and_response_record_is_learned_on_the_response_only() -> None:
    # Arrange
    (example,) = read_examples_of([{"prompt": "Hi?", "response": "Yo."}])
    # Act
    ids, labels = example_ids(TOKENIZER, example)
    # Assert: the chat template renders both turns; only the assistant's content and its end carry labels.
    assert text_of(ids) == "<s>user: Hi?</s><s>assistant: Yo.</s>"
    assert targets(ids, labels) == "Yo.</s>"
    assert labels[: len(ids) - len("Yo.") - 1] == [IGNORE_INDEX] * (len(ids) - len("Yo.") - 1)


def test_every_assistant_turn_of_a_chat_is_a_target_and_no_user_turn_is() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    (example,) = read_examples_of([{"messages": messages}])
    ids, labels = example_ids(TOKENIZER, example)
    assert targets(ids, labels) == "b</s>d</s>"


def test_without_a_chat_template_the_prompt_is_masked_and_the_response_ends_with_eos() -> None:
    plain = byte_level_tokenizer()
    plain.chat_template = None  # type: ignore[attr-defined]
    ids, labels = example_ids(plain, ({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}))
    assert text_of(ids) == "Q\nA</s>"
    assert targets(ids, labels) == "A</s>"


def test_a_text_record_and_a_txt_line_are_targets_throughout(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("one line\n\n  two  \n", encoding="utf-8")
    examples = read_examples(path)
    assert examples == ["one line", "two"]
    ids, labels = example_ids(TOKENIZER, examples[0])
    assert text_of(ids) == "<s>one line</s>" and labels == ids


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"prompt": "q"}', "response must be non-empty strings"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant's"),
        ('{"messages": [{"role": "robot", "content": "q"}]}', "needs a role in"),
        ('{"label": 1}', "expected 'prompt' and 'response'"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_a_bad_record_is_named_with_its_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        read_examples(path)
    assert f"{path}:2" in str(caught.value)


def test_rows_are_padded_to_the_longest_and_an_example_cut_before_its_response_is_left_out() -> None:
    examples = [
        ({"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}),
        ({"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "never seen"}),
        "plain text",
    ]
    batch = tokenize_examples(TOKENIZER, examples, max_length=40)
    assert batch["input_ids"].shape[0] == 2  # the long prompt leaves no response token within 40
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())
    with pytest.raises(ValueError, match="raise max-length"):
        tokenize_examples(TOKENIZER, examples[1:2], max_length=40)


def test_trimming_a_batch_to_its_longest_row_keeps_the_loss() -> None:
    from client.causal_lm import load_causal_lm, resolve_causal_model

    model, _ = load_causal_lm(resolve_causal_model("tiny-llama"))
    batch = tokenize_examples(TOKENIZER, ["a b", "c", "a much longer line than the others"], max_length=64)
    short = {k: v[:2] for k, v in batch.items()}
    trimmed = trim_padding(short)
    assert trimmed["input_ids"].shape[1] == int(short["attention_mask"].sum(dim=1).max())
    with torch.no_grad():
        assert float(model(**trimmed).loss) == pytest.approx(float(model(**short).loss), rel=1e-5)
    left = {k: v.flip(1) for k, v in short.items()}  # padded on the left: left as it is
    assert trim_padding(left)["input_ids"].shape == left["input_ids"].shape


def test_the_packaged_chatterbot_corpus_has_21_categories_of_2026_chats() -> None:
    categories = chatterbot_categories()
    assert len(categories) == 21
    assert sum(len(chats) for chats in categories.values()) == 2026
    assert all(turn["role"] == ("user", "assistant")[i % 2] for chats in categories.values()
               for chat in chats for i, turn in enumerate(chat))  # fmt: skip


def test_chatterbot_nodes_get_disjoint_category_groups_each_with_held_out_chats() -> None:
    splits = [chatterbot_split(test=10, seed=0, partition_id=i, num_partitions=7) for i in range(7)]
    names = [name for s in splits for name in s.name.split("+")]
    assert sorted(names) == sorted(chatterbot_categories()) and len(set(names)) == 21
    assert all(s.test and s.train for s in splits)
    sizes = {name: len(chats) for name, chats in chatterbot_categories().items()}
    assert [len(s.train) + len(s.test) for s in splits] == [sum(sizes[n] for n in s.name.split("+")) for s in splits]
    with pytest.raises(ValueError, match="num-nodes at most 21"):
        chatterbot_split(test=10, seed=0, partition_id=21, num_partitions=22)


def test_a_split_holds_out_at_most_a_quarter_seeded() -> None:
    examples = [f"line {i}" for i in range(12)]
    split = split_examples("node", examples, test=10, seed=3)
    assert len(split.test) == 3 and len(split.train) == 9
    assert split == split_examples("node", examples, test=10, seed=3)
    assert split != split_examples("node", examples, test=10, seed=4)


@pytest.mark.parametrize(
    ("first_record", "causal"),
    [({"prompt": "q", "response": "a"}, True), ({"messages": []}, True), ({"text": "t"}, True),
     ({"text": "t", "label": 1}, False)],
)  # fmt: skip
def test_a_jsonl_task_is_causal_when_its_records_are_instructions(
    tmp_path: Path, first_record: dict[str, object], causal: bool
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(first_record) + "\n", encoding="utf-8")
    assert is_causal_task(str(path)) is causal
    assert peft_task_type(str(path)) == ("CAUSAL_LM" if causal else "SEQ_CLS")
    assert is_causal_task("friends") and is_causal_task("chatterbot") and not is_causal_task("newsgroups")


def read_examples_of(records: list[dict[str, object]]) -> list[object]:
    """Records written to a JSONL file and read back as a node reads its file."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return list(read_examples(path))
