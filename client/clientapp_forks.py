"""``python -m client.clientapp_forks FLOWER-SUPEREXEC-ARGS``: Flower's SuperExec, starting ClientApps by fork.

For every message, Flower 1.42's SuperNode has its SuperExec start a fresh ``flwr-clientapp`` process, which spends
about 0.5 s of a 2-core device importing Flower before it asks for the message. With the message's arrays packed
(:mod:`common.codec.packing`), that import became the largest wait of a deployed round, twice per round.

This runs Flower's own ``flower-superexec`` with one change: a ``flwr-clientapp`` command is started from Python's
fork server (:mod:`multiprocessing.forkserver`), a process that imported Flower's ClientApp runtime once, when the
node started, and forks a copy of itself per message. The copy runs ``flwr-clientapp`` with the very arguments the
SuperExec built (token, address, TLS, parent pid), so everything after the imports is Flower's code, as before:
one process per message, which exits when its message is answered. Any other command is started as Flower does.

The fork server holds no thread, connection or state of a run: it only imported modules. It ends with the SuperExec.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

CLIENTAPP_COMMAND = "flwr-clientapp"
PRELOAD = ("client.clientapp_forks", "flwr.supernode.cli", "flwr.supernode.runtime.run_clientapp", "flwr.clientapp")
"""What the fork server imports once: Flower's ClientApp runtime (about 0.5 s of imports per message without it)."""


class ForkingPopen:
    """Stands in for the ``subprocess`` module inside Flower's ``SubprocessExecutor``: ``Popen`` of a
    ``flwr-clientapp`` command forks it from the fork server; every other attribute is the real module's."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.started = 0
        """ClientApps started by fork, for tests and logs."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, args: Sequence[str], **kwargs: Any) -> Any:  # noqa: N802  (the name subprocess uses)
        """Fork a ``flwr-clientapp`` (its output silenced when Flower asked for that); else ``subprocess.Popen``."""
        if not args or args[0] != CLIENTAPP_COMMAND or set(kwargs) - {"stdout", "stderr"}:
            return subprocess.Popen(args, **kwargs)
        multiprocessing.active_children()  # reap the ClientApps that have finished
        quiet = kwargs.get("stdout") == subprocess.DEVNULL
        process = self.context.Process(target=run_clientapp, args=(list(args[1:]), quiet), daemon=False)
        process.start()
        self.started += 1
        return process


def run_clientapp(argv: list[str], quiet: bool) -> None:
    """In the forked copy: Flower's ``flwr-clientapp`` entry point with ``argv``."""
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = [CLIENTAPP_COMMAND, *argv]
    flwr_clientapp()


def install() -> tuple[ForkingPopen | None, str]:
    """Start the fork server and patch Flower's SubprocessExecutor; (the stand-in, "") or (None, why not)."""
    import flwr
    from flwr.supercore.superexec.executor import subprocess_executor

    if getattr(subprocess_executor, "subprocess", None) is not subprocess or not flwr.__version__.startswith("1.42."):
        return None, f"flwr {flwr.__version__}'s SuperExec is not the one this fork server knows (flwr 1.42)"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    from multiprocessing import forkserver

    forkserver.ensure_running()
    popen = ForkingPopen(context)
    subprocess_executor.subprocess = popen  # type: ignore[assignment]  # every attribute but Popen is subprocess's
    return popen, ""


class SuperExecByFork:
    """Stands in for the ``subprocess`` module inside Flower's SuperNode loop: its ``Popen`` of ``flower-superexec``
    runs this module instead (:func:`superexec_command`); every other attribute is the real module's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, args: Sequence[str], **kwargs: Any) -> Any:  # noqa: N802  (the name subprocess uses)
        """``subprocess.Popen`` of the rewritten command."""
        return subprocess.Popen(superexec_command(args), **kwargs)


def superexec_command(command: Sequence[str]) -> list[str]:
    """The SuperNode's ``flower-superexec ARGS`` command → this module with the same ARGS; others unchanged."""
    if command and command[0] == "flower-superexec":
        return [sys.executable, "-m", "client.clientapp_forks", *command[1:]]
    return list(command)


def main(argv: Sequence[str] | None = None) -> None:
    """Start the fork server (or say why not) and run ``flower-superexec`` with ``argv``."""
    _, why_not = install()
    if why_not:
        print(f"fedlora client: {why_not}; each ClientApp starts as a fresh process", file=sys.stderr)
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *(sys.argv[1:] if argv is None else argv)]
    flower_superexec()


if __name__ == "__main__":  # a forked copy unpickles run_clientapp from this module, re-run as __mp_main__
    main()
