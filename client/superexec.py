"""``python -m client.superexec ARGS``: Flower's ``flower-superexec``, with each ClientApp process started ahead.

For every message, Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process, which spends about a second
importing Flower before it asks the SuperNode for the message. Here the SuperExec runs with
:class:`StandbyExecutor`, a :class:`flwr.supercore.superexec.executor.SubprocessExecutor` that keeps one
process waiting with Flower already imported (``python -m client.superexec --standby``): a message's token is
handed to that process, which then runs Flower's own ``flwr-clientapp`` with the arguments the subprocess executor
would have used, and the next one is started at once. Every message still gets a fresh process, the app is still
loaded from the run's FAB, and tasks other than ClientApps go through Flower's executor unchanged. The cost: one idle
Python process with Flower imported per node.

:mod:`client.supernode_poll` starts this in place of ``flower-superexec``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, ExecutorType
from flwr.supercore.superexec import run_superexec as superexec_module
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

STANDBY = [sys.executable, "-m", "client.superexec", "--standby"]
"""The command of a process waiting for a ClientApp task."""
HANDED_LINE = "superexec: a ClientApp task went to a process started ahead"
"""Printed once, when the first task is handed over (the deployed tests look for it)."""


def task_arguments(spec: ExecutionSpec) -> list[str]:
    """The arguments (after the command) Flower's subprocess executor gives the task process of ``spec``."""
    args = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class StandbyExecutor(SubprocessExecutor):
    """Flower's subprocess executor, with one ``flwr-clientapp`` process started ahead (module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._standby: subprocess.Popen[str] | None = None
        self.handed = 0
        """Tasks handed to a standby process (a test reads it)."""

    def _start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(STANDBY, stdin=subprocess.PIPE, text=True)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Hand a visible ClientApp task to the waiting process and start the next; anything else as Flower does."""
        if TASK_TYPE_TO_COMMAND[spec.task_type] != "flwr-clientapp" or spec.suppress_output:
            return super().launch(spec)
        with self._lock:
            process, self._standby = self._standby or self._start(), None
            try:
                assert process.stdin is not None
                process.stdin.write(json.dumps(task_arguments(spec)) + "\n")
                process.stdin.close()
            except OSError:  # it died while waiting: start the task as Flower would
                return super().launch(spec)
            finally:
                self._standby = self._start()
            self.handed += 1
            if self.handed == 1:
                print(f"{HANDED_LINE} (client.superexec)", file=sys.stderr, flush=True)
        return LaunchResult.accepted()

    def close(self) -> None:
        """Let the waiting process go (it exits when its stdin closes)."""
        with self._lock:
            if self._standby is not None and self._standby.stdin is not None:
                self._standby.stdin.close()
            self._standby = None


def _executor(executor_type: ExecutorType, **kwargs: Any) -> Any:
    """``get_executor`` for the SuperExec: :class:`StandbyExecutor` in place of the subprocess executor."""
    if executor_type == ExecutorType.SUBPROCESS:
        return StandbyExecutor()
    return flower_get_executor(executor_type, **kwargs)


flower_get_executor = superexec_module.get_executor


def standby() -> None:
    """Wait, with Flower imported, for one task's arguments on stdin; run ``flwr-clientapp`` with them."""
    from flwr.supernode.cli import flwr_clientapp

    line = sys.stdin.readline()
    if not line.strip():
        return  # the SuperExec stopped before handing a task over
    sys.argv = ["flwr-clientapp", *json.loads(line)]
    flwr_clientapp()


def main(argv: Sequence[str] | None = None) -> None:
    """``--standby``: wait for a task; otherwise run Flower's SuperExec with :class:`StandbyExecutor`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--standby"]:
        standby()
        return
    from flwr.supercore.cli.flower_superexec import flower_superexec

    superexec_module.get_executor = _executor  # type: ignore[assignment]
    sys.argv = ["flower-superexec", *args]
    flower_superexec()


if __name__ == "__main__":
    main()
