"""Writing the global adapter as a standard PEFT folder, and the per-round plot."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from common.atomic_file import write_json_atomic, write_text_atomic
from common.config import RunConfig
from common.task_kind import peft_task_type
from common.updates import AdapterFactors


def save_peft_adapter(folder: Path, adapter: AdapterFactors, rank: int, cfg: RunConfig, base_model: str) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that stock ``PeftModel.from_pretrained`` loads."""
    from peft import LoraConfig

    targets = sorted({module.rsplit(".", 1)[-1] for module in adapter.lora})
    head_modules = sorted({key.removeprefix("base_model.model.").rsplit(".", 1)[0] for key in adapter.head})
    config = LoraConfig(
        r=rank,
        lora_alpha=cfg.lora.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        use_rslora=cfg.lora.use_rslora,
        target_modules=targets,
        modules_to_save=head_modules or None,
        task_type=peft_task_type(cfg.task),
        base_model_name_or_path=base_model,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    config.save_pretrained(str(staging))
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.to_state_dict().items()}
    save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def plot_metrics(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (perplexity for a causal LM) and loss per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    causal = any(r.get("eval_perplexity") is not None or r.get("global_perplexity") is not None for r in rows)
    metric = "perplexity" if causal else "accuracy"
    if any(r.get(f"global_{metric}") is not None for r in rows):
        ax_acc.plot(rounds, [r.get(f"global_{metric}") for r in rows], marker="D", label="global (exported adapter)")
    nodes = "pooled" if causal else "mean"
    ax_acc.plot(
        rounds, [r.get(f"eval_{metric}") for r in rows], marker="o", label=f"nodes' {nodes} (own rank, own share)"
    )
    ax_acc.set(xlabel="round", ylabel=metric, title=f"Held-out {metric}")
    if causal:
        ax_acc.set_yscale("log")
    else:
        ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    if any(r.get("global_loss") is not None for r in rows):
        ax_loss.plot(rounds, [r.get("global_loss") for r in rows], marker="D", label="global eval loss")
    ax_loss.plot(rounds, [r.get("eval_loss") for r in rows], marker="o", label="nodes' eval loss")
    ax_loss.plot(rounds, [r.get("train_loss") for r in rows], marker="s", label="train loss")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_metrics(rows: Sequence[dict[str, Any]], folder: Path) -> None:
    """``metrics.json`` and ``metrics.csv`` with one row per round (round 0 = the untrained model)."""
    import csv
    import io

    write_json_atomic(folder / "metrics.json", list(rows))
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(folder / "metrics.csv", buffer.getvalue())
