"""The run config: one set of defaults (`[tool.flwr.app.config]`, what `flwr run .` uses, and `RunConfig()`), nested
sections flattened to the same kebab-case keys, and a clear error for every bad value."""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
import typing
from pathlib import Path

import pytest

from common.config import SECTIONS, RunConfig, flat_keys

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
DECLARED = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_equals_the_runconfig_defaults() -> None:
    from_pyproject = RunConfig.from_mapping(DECLARED).to_mapping()
    defaults = RunConfig().to_mapping()

    assert set(DECLARED) == set(defaults) == set(flat_keys())
    differ = {k: (from_pyproject[k], defaults[k]) for k in defaults if from_pyproject[k] != defaults[k]}
    assert differ == {}, f"pyproject.toml and RunConfig disagree (pyproject, RunConfig): {differ}"


def test_flat_keys_land_in_their_sections_and_flatten_back() -> None:
    cfg = RunConfig.from_mapping({"local-steps": 3, "secagg-num-shares": 4, "secure-aggregation": False, "seed": 9})

    assert (cfg.training.local_steps, cfg.secagg.num_shares, cfg.seed) == (3, 4.0, 9)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize("cls", [RunConfig, *(typing.get_type_hints(RunConfig)[name] for name in SECTIONS)])
def test_every_setting_has_a_docstring(cls: type) -> None:
    lines = inspect.getsource(cls).splitlines()
    for field in dataclasses.fields(cls):
        if field.name in SECTIONS:
            continue
        (line,) = (i for i, text in enumerate(lines) if text.startswith(f"    {field.name}: "))
        following = next(text for text in lines[line + 1 :] if not text.startswith("        "))
        assert following.strip().startswith('"""'), f"{cls.__name__}.{field.name} has no docstring"


def test_an_unknown_key_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'local_steps'; known keys: .*local-steps"):
        RunConfig.from_mapping({"local_steps": 3})


WRONG_VALUES: dict[str, object] = {
    **{key: "many" for key, value in RunConfig().to_mapping().items() if isinstance(value, int | float)},
    **{key: "maybe" for key, value in RunConfig().to_mapping().items() if isinstance(value, bool)},
    "num-rounds": 0, "rule": "fedmedian", "node-ranks": "2,0", "lora-alpha": -1.0, "max-rank": 0, "local-steps": 0,
    "batch-size": -4, "learning-rate": float("nan"), "baseline-learning-rate": 0.0, "head-lr-ratio": float("inf"),
    "warmup-ratio": 1.0, "schedule": "step", "schedule-span": "epoch", "max-length": 0, "train-examples": -1,
    "eval-examples": 0, "partitioner": "random", "dirichlet-alpha": 0.0, "fraction-train": 1.5,
    "fraction-evaluate": 0.0, "min-nodes": 0, "round-timeout": -5.0, "norm-factor": 0.0, "dp": "on",
    "noise-multiplier": -1.0, "target-epsilon": float("inf"), "max-grad-norm": 0.0, "clip-norm": -1.0, "delta": 1.0,
    "accountant": "gdp", "noise-seed": -2, "secagg-num-shares": 2, "secagg-reconstruction-threshold": 1.5,
    "secagg-clipping-range": 0.0, "secagg-quantization-range": 1, "secagg-modulus-range": 3000,
    "secagg-max-weight": 0.0, "keep-checkpoints": "three", "global-eval-examples": -1, "weighting": "trust",
    "weight-cap": 0.5, "norm-bound": "mean", "norm-bound-value": 0.0, "byzantine-nodes": -1,
    "collapse-warning-share": 1.0, "server-learning-rate": 0.0, "server-momentum": 1.0,
}  # fmt: skip
"""A wrong value for every key whose values can be wrong by themselves (names and paths are checked where used)."""


@pytest.mark.parametrize("key", sorted(WRONG_VALUES))
def test_a_wrong_value_is_refused_naming_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=key) as raised:
        RunConfig.from_mapping({key: WRONG_VALUES[key]})
    assert str(raised.value).count("\n") == 0, "one line"


def test_every_checked_key_has_a_wrong_value() -> None:
    free_form = {"model", "task", "target-modules", "labels", "out-dir", "store", "audit-dir", "inject-faults"}
    free_form |= {"server-eval-data"}
    assert set(flat_keys()) - free_form - set(WRONG_VALUES) == set()
