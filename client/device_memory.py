"""Free memory on this device and the LoRA rank it affords (``fedlora client --rank auto``)."""

from __future__ import annotations

from pathlib import Path

GIB = 1 << 30
RANK_TABLE: tuple[tuple[int, int], ...] = (
    (1 * GIB, 2),
    (2 * GIB, 4),
    (4 * GIB, 8),
    (8 * GIB, 16),
    (16 * GIB, 32),
)
"""``(upper bound of free bytes, rank)`` rows, ascending; at or above the last bound the rank is ``MAX_AUTO_RANK``."""
MAX_AUTO_RANK = 64


def auto_rank(free_bytes: int) -> int:
    """Return the LoRA rank for a device with ``free_bytes`` of free memory.

    =====================  ====
    free memory            rank
    =====================  ====
    below 1 GiB            2
    1 GiB to below 2 GiB   4
    2 GiB to below 4 GiB   8
    4 GiB to below 8 GiB   16
    8 GiB to below 16 GiB  32
    16 GiB and more        64
    =====================  ====

    The rank doubles with each doubling of free memory. LoRA's own parameters are small at any of these ranks; the
    table leaves headroom for what grows with it (optimizer state, gradients, the per-sample gradients of DP-SGD) on
    top of the base model and activations, and keeps small devices at small ranks, which the svd aggregation serves
    with their best rank-r share of the global update.

    Parameters
    ----------
    free_bytes : int
        Free memory in bytes: free GPU memory when training on CUDA, else available system RAM.

    Returns
    -------
    int
        The rank, a power of two from 2 to 64.

    Raises
    ------
    ValueError
        If ``free_bytes`` is negative.
    """
    if free_bytes < 0:
        raise ValueError(f"free_bytes must be >= 0, got {free_bytes}")
    for bound, rank in RANK_TABLE:
        if free_bytes < bound:
            return rank
    return MAX_AUTO_RANK


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
