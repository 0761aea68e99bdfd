"""Which of fedlora's optional installs provides a module, so a missing one is one line with the fix.

The default install is a device's (``pip install fedlora``: torch, transformers, peft, flwr, cryptography); the
coordinator, Flower's simulation engine, local DP and the experiments are extras (``pyproject.toml``).
"""

from __future__ import annotations

EXTRA_OF = {
    "ray": "simulation",
    "flwr_datasets": "tasks",
    "datasets": "tasks",
    "pyarrow": "tasks",
    "matplotlib": "coordinator",
    "tomli_w": "coordinator",
    "pathspec": "coordinator",
    "opacus": "dp",
    "gguf": "llm",
}
"""Top-level module → the extra that installs it."""


def missing_extra(err: ModuleNotFoundError, what: str) -> str | None:
    """One line for ``err`` when an extra provides the missing module (``what`` needs it), else None."""
    module = (err.name or "").split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return (
        f"{what} needs {module}, which this install lacks; install the {extra!r} extra: pip install 'fedlora[{extra}]'"
    )
