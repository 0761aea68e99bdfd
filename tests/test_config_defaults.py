"""The run config has one set of defaults: `[tool.flwr.app.config]` (what `flwr run .` uses) and `RunConfig()`."""

from __future__ import annotations

import tomllib
from pathlib import Path

from common.config import RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_equals_the_runconfig_defaults() -> None:
    declared = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    extra_keys = {"labels"}  # passed through to local data files, not a RunConfig field

    from_pyproject = RunConfig.from_mapping(declared).to_mapping()
    defaults = RunConfig().to_mapping()

    assert set(declared) - extra_keys == set(defaults)
    differ = {k: (from_pyproject[k], defaults[k]) for k in defaults if from_pyproject[k] != defaults[k]}
    assert differ == {}, f"pyproject.toml and RunConfig disagree (pyproject, RunConfig): {differ}"
