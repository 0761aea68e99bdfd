"""What a hostile node can send that validation lets through, for experiments and tests (never run by a node).

Each attack turns an honest train reply into a well-formed, finite one at the node's own rank:

- ``scale-10``, ``scale-1000``: lora_B multiplied by 10 or 1000 (its update s·B·A scaled by it);
- ``sign-flip``: lora_B negated (the update pushes the other way);
- ``inflate-examples``: it claims 10⁷ training examples (the most validation accepts);
- ``noise``: lora_B replaced by Gaussian noise of the same norm, module by module;
- ``huge-head``: its classification head multiplied by 10⁶.

``simulations.bench_robust`` applies them in in-process rounds; ``tests/hostile_clientapp.py`` through the real
ServerApp.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.updates import AdapterFactors, TrainReply

ATTACKS = ("scale-10", "scale-1000", "sign-flip", "inflate-examples", "noise", "huge-head")
"""Every attack :func:`attacked` knows."""
INFLATED_EXAMPLES = 10_000_000


def attacked(reply: TrainReply, attack: str, seed: int = 0) -> TrainReply:
    """``reply`` as the hostile node sends it."""
    adapter = reply.adapter
    if attack == "inflate-examples":
        return dataclasses.replace(reply, num_examples=INFLATED_EXAMPLES)
    if attack == "huge-head":
        head = {k: (v * 1e6).astype(v.dtype) for k, v in adapter.head.items()}
        return dataclasses.replace(reply, adapter=AdapterFactors(adapter.lora, head))
    factors = {"scale-10": 10.0, "scale-1000": 1000.0, "sign-flip": -1.0}
    if attack not in factors and attack != "noise":
        raise ValueError(f"unknown attack {attack!r}; choose one of {ATTACKS}")
    rng = np.random.default_rng(seed)
    lora = {}
    for module, (lora_A, lora_B) in adapter.lora.items():
        if attack == "noise":
            noise = rng.normal(size=lora_B.shape)
            lora_B = (noise * np.linalg.norm(lora_B) / max(float(np.linalg.norm(noise)), 1e-30)).astype(lora_B.dtype)
        else:
            lora_B = (lora_B * factors[attack]).astype(lora_B.dtype)
        lora[module] = (lora_A, lora_B)
    return dataclasses.replace(reply, adapter=AdapterFactors(lora, adapter.head))
