"""An adapter on the wire as a few arrays: one flat array per dtype, and a layout that names the tensors in it.

Flower 1.42 moves every ``Array`` of a message as an object of its own: the SuperNode fetches and pushes them one
request each (and one per 5-MiB chunk), two at a time on a 2-core device. An adapter of 40 small tensors, one array
each, cost about a second each way whatever its size. Packed, the same adapter is two or three arrays:

- ``packed.<dtype>`` (``packed.float32`` for every fedlora adapter today): the tensors of that dtype, flattened and
  concatenated in the layout's order;
- ``packed.layout``: UTF-8 JSON in a ``uint8`` array, ``{"keys": [...], "shapes": [[...], ...], "dtypes": [...]}``,
  one entry per tensor, in peft's key order (:meth:`common.updates.AdapterFactors.to_state_dict`).

:func:`unpack` is strict, because a node's reply is untrusted: the layout has exactly those three fields, every key
once, every shape of at most :data:`MAX_NDIM` non-negative sizes, every dtype a canonical numeric numpy name, and
each packed array holds exactly the elements its tensors need, no more, no fewer; an array the layout does not use
is refused. What the tensors may be (factors of the node's rank, the head) is checked afterwards, on the unpacked
keys, by :mod:`common.validation`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PREFIX = "packed."
LAYOUT = PREFIX + "layout"
LAYOUT_FIELDS = ("keys", "shapes", "dtypes")
MAX_LAYOUT_BYTES = 1 << 20
"""The largest layout accepted (a 7B model's full adapter needs about 40 KB)."""
MAX_NDIM = 4


def pack(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``key → tensor`` → ``packed.<dtype>`` arrays plus ``packed.layout``; an empty state packs to nothing."""
    if not state:
        return {}
    keys = list(state)
    dtypes = [np.asarray(state[k]).dtype.name for k in keys]
    layout = {"keys": keys, "shapes": [list(np.shape(state[k])) for k in keys], "dtypes": dtypes}
    by_dtype: dict[str, list[np.ndarray]] = {}
    for key, name in zip(keys, dtypes, strict=True):
        by_dtype.setdefault(name, []).append(np.asarray(state[key]).ravel())
    packed = {PREFIX + name: np.concatenate(parts) for name, parts in by_dtype.items()}
    packed[LAYOUT] = np.frombuffer(json.dumps(layout).encode("utf-8"), dtype=np.uint8)
    return packed


def unpack(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack`; a ``ValueError`` naming the first thing that does not fit the layout."""
    if not arrays:
        return {}
    if LAYOUT not in arrays:
        raise ValueError(f"adapter has no '{LAYOUT}' (has {sorted(arrays)[:3]})")
    keys, shapes, dtypes = _layout(arrays[LAYOUT])
    unused = sorted(set(arrays) - {LAYOUT} - {PREFIX + d for d in dtypes})
    if unused:
        raise ValueError(f"adapter array {unused[0]!r} is not in its layout")
    state: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(dtypes):
        flat = _packed(arrays, name)
        mine = [(k, s) for k, s, d in zip(keys, shapes, dtypes, strict=True) if d == name]
        needed = sum(math.prod(s) for _, s in mine)
        if flat.size != needed:
            raise ValueError(f"'{PREFIX}{name}' has {flat.size} values; its layout needs {needed}")
        offset = 0
        for key, shape in mine:
            size = math.prod(shape)
            state[key] = flat[offset : offset + size].reshape(shape)
            offset += size
    return {k: state[k] for k in keys}


def layout_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the layout (0 when there is none)."""
    layout = arrays.get(LAYOUT)
    return int(layout.nbytes) if layout is not None else 0


def _layout(array: np.ndarray) -> tuple[list[str], list[tuple[int, ...]], list[str]]:
    """The layout's three lists, checked against each other."""
    if array.dtype != np.uint8 or array.ndim != 1 or array.size > MAX_LAYOUT_BYTES:
        raise ValueError(f"'{LAYOUT}' must be a 1-D uint8 array of at most {MAX_LAYOUT_BYTES} bytes")
    try:
        layout: Any = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"'{LAYOUT}' is not UTF-8 JSON") from None
    if not isinstance(layout, dict) or sorted(layout) != sorted(LAYOUT_FIELDS):
        raise ValueError(f"'{LAYOUT}' must be an object with exactly the fields {list(LAYOUT_FIELDS)}")
    if json.dumps(layout).encode("utf-8") != array.tobytes():  # no room for anything the fields do not say
        raise ValueError(f"'{LAYOUT}' is not in the canonical form pack() writes")
    keys, shapes, dtypes = (layout[field] for field in LAYOUT_FIELDS)
    if not all(isinstance(v, list) for v in (keys, shapes, dtypes)) or not len(keys) == len(shapes) == len(dtypes):
        raise ValueError(f"'{LAYOUT}' must hold three lists of equal length")
    if not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"'{LAYOUT}' keys must be distinct non-empty strings")
    checked_shapes = [_shape(k, s) for k, s in zip(keys, shapes, strict=True)]
    return keys, checked_shapes, [_dtype(k, d) for k, d in zip(keys, dtypes, strict=True)]


def _shape(key: str, shape: Any) -> tuple[int, ...]:
    ok = isinstance(shape, list) and len(shape) <= MAX_NDIM
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in shape):
        raise ValueError(f"layout shape of {key!r} must be at most {MAX_NDIM} sizes in 0..2^31, got {shape!r}")
    return tuple(shape)


def _dtype(key: str, name: Any) -> str:
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.name != name or dtype.kind not in "fiu":
        raise ValueError(f"layout dtype of {key!r} must be a numeric numpy dtype name, got {name!r}")
    return name


def _packed(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    key = PREFIX + name
    if key not in arrays:
        raise ValueError(f"adapter lacks {key!r}, which its layout uses")
    flat = arrays[key]
    if flat.ndim != 1 or flat.dtype.name != name or flat.dtype.byteorder not in ("=", "|"):
        raise ValueError(f"{key!r} must be a 1-D native {name} array, got {flat.dtype.str} of shape {flat.shape}")
    return flat
