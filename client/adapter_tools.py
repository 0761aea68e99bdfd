"""Using an exported adapter: ``fedlora generate`` (base and fine-tuned completions side by side) and ``fedlora
export --merge`` (a merged Hugging Face model folder, peft's ``merge_and_unload``).

Both read a standard PEFT folder: ``adapter_config.json`` names the base model (a local folder, or a fedlora preset
such as ``smollm2`` or ``minilm-l6``) and the task type (``CAUSAL_LM`` or ``SEQ_CLS``); nothing else is needed.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, or a FileNotFoundError naming what is missing."""
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def base_folder(name: str, causal: bool) -> Path:
    """The adapter's base model as a local folder: itself when it is one, else the preset of that name."""
    from client.causal_lm import resolve_causal_model
    from client.model import resolve_model

    return resolve_causal_model(name) if causal else resolve_model(name)


def head_labels(adapter: Path) -> int:
    """Number of labels of a classification adapter (rows of its saved head)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as tensors:
        heads = [k for k in tensors.keys() if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
        if not heads:
            raise ValueError(f"{adapter} is a classification adapter without a saved head (modules_to_save)")
        return int(tensors.get_slice(heads[-1]).get_shape()[0])


def load_with_adapter(adapter: Path) -> tuple[Any, Any, bool]:
    """(PeftModel on its base model in float32, the base's tokenizer, whether it is a causal LM)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    config = read_adapter_config(adapter)
    task_type = config.get("task_type")
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ValueError(f"{adapter}: task_type {task_type!r} is neither CAUSAL_LM nor SEQ_CLS")
    causal = task_type == "CAUSAL_LM"
    folder = base_folder(str(config.get("base_model_name_or_path") or ""), causal)
    if causal:
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=head_labels(adapter), dtype=torch.float32
        )
    model = PeftModel.from_pretrained(base, adapter).eval()
    return model, AutoTokenizer.from_pretrained(folder), causal


# --- fedlora generate ------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, prompt: str, raw: bool) -> torch.Tensor:
    """The prompt as a user turn of the chat template (where there is one and not ``raw``), else as plain text."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return torch.tensor([list(ids)], dtype=torch.long)


def complete(model: Any, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy continuation of ``ids`` (the new tokens only, decoded)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


def generate_main(argv: Sequence[str] | None = None) -> int:
    """``fedlora generate --adapter DIR --prompt TEXT``: the base model's and the fine-tuned model's completions."""
    parser = argparse.ArgumentParser(prog="fedlora generate", description=generate_main.__doc__)
    parser.add_argument("--adapter", type=Path, required=True, help="an exported adapter folder (causal LM)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="torch seed (greedy decoding does not sample)")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as text, not as a chat turn")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer, causal = load_with_adapter(args.adapter)
    if not causal:
        raise ValueError(f"{args.adapter} is a classification adapter (SEQ_CLS); generate needs a causal-LM adapter")
    torch.manual_seed(args.seed)
    for prompt in args.prompt:
        ids = prompt_ids(tokenizer, prompt, args.raw)
        with model.disable_adapter():
            before = complete(model, tokenizer, ids, args.max_new_tokens)
        after = complete(model, tokenizer, ids, args.max_new_tokens)
        shown = [text or "(nothing: the first token generated ends the text)" for text in (before, after)]
        print(f"prompt:     {prompt}\nbase:       {shown[0]}\nfine-tuned: {shown[1]}\n", flush=True)
    return 0


# --- fedlora export --merge ------------------------------------------------------------------------------------------
def merge(adapter: Path, out: Path) -> Path:
    """Write base + adapter, merged (``merge_and_unload``), with the tokenizer, as a model folder at ``out``."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    model, tokenizer, _ = load_with_adapter(adapter)
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_main(argv: Sequence[str] | None = None) -> int:
    """``fedlora export --merge ADAPTER --out FOLDER``: a merged model that stock ``from_pretrained`` loads."""
    parser = argparse.ArgumentParser(prog="fedlora export", description=export_main.__doc__)
    parser.add_argument("--merge", type=Path, required=True, metavar="ADAPTER", help="an exported adapter folder")
    parser.add_argument("--out", type=Path, required=True, help="where the merged model folder goes (new)")
    parser.add_argument("--check", metavar="TEXT", help="also compare the merged logits on TEXT with base + adapter")
    args = parser.parse_args(argv)
    print(f"fedlora: merged model in {merge(args.merge, args.out)}", flush=True)
    if args.check:
        print(f"fedlora: {check_merge(args.merge, args.out, args.check)}", flush=True)
    return 0


def check_merge(adapter: Path, merged: Path, text: str) -> str:
    """How far the merged folder's logits on ``text`` (as a chat turn where there is a template) are from base +
    adapter, both in float32, and from base + adapter computed in float64 (the exact sum both round)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model, tokenizer, causal = load_with_adapter(adapter)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    stock = auto.from_pretrained(merged, dtype=torch.float32).eval()
    ids = prompt_ids(tokenizer, text, raw=False) if causal else tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmerged, got = model(input_ids=ids).logits.double(), stock(input_ids=ids).logits.double()
        exact = model.double()(input_ids=ids).logits
    gaps = [float((a - b).abs().max()) for a, b in ((got, unmerged), (got, exact), (unmerged, exact))]
    return (
        f"on {ids.shape[1]} tokens, the merged logits differ from base + adapter by at most {gaps[0]:.2e} (largest "
        f"logit {float(exact.abs().max()):.1f}); from the float64 sum, merged {gaps[1]:.2e}, unmerged {gaps[2]:.2e}"
    )
