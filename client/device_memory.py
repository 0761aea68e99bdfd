"""Free memory on this device and the LoRA rank it affords (``fedlora client --rank auto``).

The rank is the largest that training fits in: the frozen model, the activations backpropagation keeps, and the
LoRA state that grows with the rank (:func:`training_bytes`), against the free memory (GPU or RAM). It is chosen
when ``fedlora client`` starts with the run defaults, and again for each run with that run's batch, length,
``max-rank`` and DP mode (:class:`AutoRank`, in the node-config), so it never exceeds ``max-rank``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20
AUTO_RANKS = (2, 4, 8, 16, 32, 64)
"""The ranks ``--rank auto`` picks from (powers of two, as the rank presets are)."""
USABLE_SHARE = 0.8
"""Share of the free memory training may use; the rest stays for the tokenizer, the data and the process itself."""
BYTES_PER_VALUE = 4
"""Weights, activations and LoRA state are float32 (on CUDA, bf16 autocast halves activations: not counted on)."""


@dataclass(frozen=True)
class ModelShape:
    """What a node's training memory depends on, read from a model's config without loading its weights."""

    parameters: int
    """Every parameter of the base model."""
    hidden: int
    layers: int
    heads: int
    lora_width: int
    """Σ (in + out) over the LoRA target modules: the LoRA parameters per unit of rank."""

    @classmethod
    def of(cls, path: Path) -> ModelShape:
        """The shape of the model in the Hugging Face folder ``path``, built on the meta device (no weights read)."""
        import torch
        from transformers import AutoConfig, AutoModel

        from client.model import DEFAULT_TARGETS

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
        targets = DEFAULT_TARGETS.get(str(config.model_type), ())
        width = 0
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                width += module.in_features + module.out_features
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            hidden=int(text.hidden_size),
            layers=int(text.num_hidden_layers),
            heads=int(text.num_attention_heads),
            lora_width=width,
        )


def training_bytes(shape: ModelShape, rank: int, batch: int, length: int, per_sample: bool) -> dict[str, int]:
    """Bytes that training at ``rank`` needs, by part.

    - ``weights``: the frozen base model, P × 4;
    - ``activations``: what backpropagation keeps, per layer s·b·h·(34 + 5·a·s/h) values (Korthikanti et al. 2022,
      "Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198, counted there in 2-byte
      values), × 4 bytes here — LoRA's gradients flow through every layer, so all of them are kept;
    - ``lora``: r × Σ(in + out) parameters, with their gradients and Adam's two moments (4 values each);
    - ``per_sample``: DP-SGD's per-sample gradients of the LoRA parameters, batch × r × Σ(in + out) (local DP only).
    """
    per_layer = length * batch * shape.hidden * (34 + 5 * shape.heads * length / shape.hidden)
    lora = rank * shape.lora_width
    return {
        "weights": shape.parameters * BYTES_PER_VALUE,
        "activations": int(shape.layers * per_layer * BYTES_PER_VALUE),
        "lora": lora * 4 * BYTES_PER_VALUE,
        "per_sample": batch * lora * BYTES_PER_VALUE if per_sample else 0,
    }


def auto_rank(
    free_bytes: int, shape: ModelShape, batch: int, length: int, max_rank: int, per_sample: bool = False
) -> tuple[int, str]:
    """The largest rank of :data:`AUTO_RANKS` up to ``max_rank`` whose training fits in ``USABLE_SHARE`` of
    ``free_bytes`` (:func:`training_bytes`), and one line saying why.

    Raises ``ValueError`` (one line) when not even the smallest rank fits, or ``free_bytes`` is negative.
    """
    if free_bytes < 0:
        raise ValueError(f"free_bytes must be >= 0, got {free_bytes}")
    budget = USABLE_SHARE * free_bytes
    fixed = training_bytes(shape, 0, batch, length, per_sample)
    base = fixed["weights"] + fixed["activations"]
    per_rank = sum(training_bytes(shape, 1, batch, length, per_sample)[k] for k in ("lora", "per_sample"))
    why = (
        f"{free_bytes / GIB:.2f} GiB free, {USABLE_SHARE:.0%} usable; the model takes {fixed['weights'] / GIB:.2f} GiB "
        f"and training at batch {batch} × {length} tokens {fixed['activations'] / GIB:.2f} GiB of activations; "
        f"each unit of rank {per_rank / MIB:.2f} MiB"
    )
    candidates = [r for r in AUTO_RANKS if r <= max_rank] or [max_rank]
    fitting = [r for r in candidates if base + r * per_rank <= budget]
    if not fitting:
        need = (base + candidates[0] * per_rank) / USABLE_SHARE / GIB
        raise ValueError(
            f"not enough memory to train this model even at rank {candidates[0]}: {why} (needs {need:.2f} GiB free)"
        )
    rank = max(fitting)
    limit = f"the most max-rank {max_rank} allows" if rank == max(candidates) else "the largest that fits"
    return rank, f"rank {rank} ({limit}): {why}"


@dataclass(frozen=True)
class AutoRank:
    """What ``--rank auto`` measured on the device, carried in its node-config (``auto-rank``) so that each run
    chooses the rank again with its own batch, length, ``max-rank`` and DP mode, the same way for every message."""

    free_bytes: int
    shape: ModelShape

    def to_json(self) -> str:
        """Compact JSON (no spaces: it travels inside flower-supernode's ``--node-config``)."""
        return json.dumps({"free-bytes": self.free_bytes, **dataclasses.asdict(self.shape)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AutoRank:
        values = json.loads(text)
        return cls(int(values.pop("free-bytes")), ModelShape(**values))

    def rank_for(self, batch: int, length: int, max_rank: int, per_sample: bool) -> tuple[int, str]:
        """:func:`auto_rank` for a run's settings."""
        return auto_rank(self.free_bytes, self.shape, batch, length, max_rank, per_sample)


def free_memory() -> tuple[int, str]:
    """Return ``(free bytes, where)``: free memory of CUDA device 0 if torch sees one, else available system RAM."""
    cuda = _cuda_free_memory()
    if cuda is not None:
        return cuda
    return _system_available_memory(), "available system RAM"


def _cuda_free_memory() -> tuple[int, str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(0)
    return int(free), f"free memory on CUDA device 0 ({torch.cuda.get_device_name(0)})"


def _system_available_memory() -> int:
    try:
        import psutil
    except ImportError:
        return meminfo_available(Path("/proc/meminfo").read_text(encoding="ascii"))
    return int(psutil.virtual_memory().available)


def meminfo_available(meminfo: str) -> int:
    """Return ``MemAvailable`` (else ``MemFree``) in bytes from the text of ``/proc/meminfo``."""
    fields = {}
    for line in meminfo.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts:
            fields[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    for key in ("MemAvailable", "MemFree"):
        if key in fields:
            return fields[key]
    raise ValueError("/proc/meminfo has neither MemAvailable nor MemFree")
