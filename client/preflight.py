"""What every node of a run will need, checked once before anything starts (``fedlora simulate`` and friends).

A config can be valid key by key and still fail on every node in every round: target modules the model does not
have, a data file without the labels it needs, a packaged task that cannot be split over that many nodes. These
checks run the nodes' own code (the same model resolution, file reader and partitioner) on the coordinator's
machine, and raise ``ValueError`` or ``FileNotFoundError`` with one line that names the problem; on success they
return what a user may want to see (how many examples each node will get).
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path

import torch

from client.causal_lm import CAUSAL_TARGETS, MAIN_CHARACTERS, resolve_causal_model
from client.data import is_local_file, node_data, num_labels_for, partition_sizes
from client.instruct import chatterbot_categories, chatterbot_split, read_examples
from client.model import DEFAULT_TARGETS, resolve_model
from client.task_types import CausalLM, character_data, task_type_for
from client.tasks import load_local_file
from common.config import RunConfig


def check_run(cfg: RunConfig, num_nodes: int) -> list[str]:
    """Check the model, its target modules and the data split for ``num_nodes`` nodes; return lines to show."""
    causal = isinstance(task_type_for(cfg.task), CausalLM)
    path = resolve_causal_model(cfg.model) if causal else resolve_model(cfg.model)
    check_target_modules(path, cfg, causal)
    return check_causal_data(cfg, num_nodes) if causal else check_classification_data(cfg, num_nodes)


def check_target_modules(path: Path, cfg: RunConfig, causal: bool) -> None:
    """Every target module must name linear layers of the model (built on the meta device: no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    model_type = str(getattr(config, "model_type", ""))
    targets = cfg.lora.target_modules or (CAUSAL_TARGETS if causal else DEFAULT_TARGETS.get(model_type, ()))
    if not targets:
        raise ValueError(f"model {cfg.model} ({model_type}) has no default LoRA targets; set target-modules")
    with torch.device("meta"):
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        model = auto.from_config(config)
    linear = [name for name, module in model.named_modules() if _is_linear(module)]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear)]
    if missing:
        known = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(
            f"target-modules {', '.join(missing)} match no linear layer of model {cfg.model}; its linear layers are "
            f"named {', '.join(known[:12])}{' …' if len(known) > 12 else ''}"
        )


def _is_linear(module: torch.nn.Module) -> bool:
    """A layer peft's LoRA adapts: ``nn.Linear``, or GPT-2's transposed ``Conv1D``."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def check_classification_data(cfg: RunConfig, num_nodes: int) -> list[str]:
    """A local file: readable, its labels named. A packaged task: every node gets training and held-out examples
    from the run's partitioner (flwr-datasets, as the nodes run it)."""
    if cfg.data.server_eval_data:
        if not Path(cfg.data.server_eval_data).is_file():
            raise FileNotFoundError(f"server-eval-data file {cfg.data.server_eval_data} does not exist")
        load_local_file(Path(cfg.data.server_eval_data), cfg.data.labels)
    if is_local_file(cfg.task):
        if not Path(cfg.task).is_file():
            raise FileNotFoundError(f"data file {cfg.task} does not exist")
        num_labels_for(cfg, cfg.task)
        data = node_data(cfg, cfg.task, 0, 1)
        return [f"data: {cfg.task}: {len(data.train)} training and {len(data.test)} held-out examples on every node"]
    try:
        with warnings.catch_warnings():  # flwr-datasets warns at every failed attempt; the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            sizes = partition_sizes(cfg, cfg.task, num_nodes)
    except (ValueError, IndexError) as err:  # IndexError: the IID partitioner with more nodes than examples
        why = str(err).splitlines()[0] + ("; more nodes than examples?" if isinstance(err, IndexError) else "")
        raise ValueError(
            f"task {cfg.task} cannot be split over {num_nodes} nodes with partitioner {cfg.data.partitioner}: {why}"
        ) from None
    for split, counts in sizes.items():
        empty = [i for i, n in enumerate(counts) if n == 0]
        if empty:
            raise ValueError(
                f"task {cfg.task} split over {num_nodes} nodes leaves partition {empty[0]} without {split} examples "
                f"({len(empty)} such nodes); use fewer nodes or another partitioner"
            )
    train = sizes["train"]
    return [
        f"data: {cfg.task} over {num_nodes} nodes ({cfg.data.partitioner}): {min(train)}–{max(train)} training "
        f"examples per node (median {statistics.median(train):g})"
    ]


def check_causal_data(cfg: RunConfig, num_nodes: int) -> list[str]:
    """Friends: one node per main character (at most six). Chatterbot: categories grouped over at most 21 nodes.
    A file: readable records. Every node gets training and held-out examples."""
    if cfg.task == "chatterbot":
        categories = chatterbot_categories()
        if num_nodes > len(categories):
            raise ValueError(f"task chatterbot has {len(categories)} categories, not enough for {num_nodes} nodes")
        splits = [chatterbot_split(cfg.data.eval_examples, cfg.seed, i, num_nodes) for i in range(num_nodes)]
        empty = [s.name for s in splits if not s.test]
        if empty:
            raise ValueError(f"task chatterbot over {num_nodes} nodes: {empty[0]} holds no chat out; use fewer nodes")
        sizes = [len(s.train) for s in splits]
        return [f"data: chatterbot over {num_nodes} nodes: {min(sizes)}–{max(sizes)} training chats per node"]
    if cfg.task.endswith((".jsonl", ".txt")):
        examples = read_examples(Path(cfg.task))
        return [f"data: {cfg.task}: {len(examples)} examples (each node holds out up to eval-examples of its own)"]
    if num_nodes > len(MAIN_CHARACTERS):
        raise ValueError(
            f"task {cfg.task} has one node per main character ({len(MAIN_CHARACTERS)}), not {num_nodes} nodes"
        )
    lines = [len(character_data(cfg, i).train) for i in range(num_nodes)]
    return [f"data: {cfg.task}: {min(lines)}–{max(lines)} training lines per character"]
