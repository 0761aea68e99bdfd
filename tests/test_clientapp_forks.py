"""``client.clientapp_forks``: Flower's SuperExec starting each ``flwr-clientapp`` from a fork server.

The deployed tests (``tests/test_deploy_run.py``) run every message of a real run through it; these pin the parts:
the Flower code it patches is still there, a forked ClientApp runs Flower's entry point with the SuperExec's
arguments and exit status, and it starts faster than a fresh process."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

from test_supernode_poll import in_fresh_process

from client.clientapp_forks import CLIENTAPP_COMMAND, superexec_command


def test_flwr_s_superexec_and_supernode_start_processes_the_way_the_patch_expects() -> None:
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supernode import start_client_internal as loop

    assert CLIENTAPP_COMMAND in TASK_TYPE_TO_COMMAND.values()
    assert "subprocess.Popen(" in inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    assert 'command = ["flower-superexec"]' in inspect.getsource(loop.start_client_internal)


def test_the_supernode_s_superexec_command_becomes_this_module_with_the_same_arguments() -> None:
    command = ["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "7"]

    assert superexec_command(command) == [sys.executable, "-m", "client.clientapp_forks", *command[1:]]
    assert superexec_command(["flower-supernode", "--x"]) == ["flower-supernode", "--x"]


def test_a_forked_clientapp_runs_flower_s_entry_point_with_its_arguments_and_exit_status() -> None:
    # Arrange: the real install in a fresh interpreter, then Flower's SubprocessExecutor's module-level Popen
    code = (
        "import subprocess, time\n"
        "from client import clientapp_forks as forks\n"
        "from client.device import flower_bin\n"
        "popen, why = forks.install()\n"
        "assert why == '' and popen is not None, why\n"
        "from flwr.supercore.superexec.executor import subprocess_executor as ex\n"
        "assert ex.subprocess is popen and ex.subprocess.DEVNULL == subprocess.DEVNULL\n"
        # Act: flwr-clientapp without its required arguments exits non-zero, like the real command
        "bad = ex.subprocess.Popen(['flwr-clientapp'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "bad.join(60)\n"
        "real = subprocess.run([flower_bin('flwr-clientapp')], capture_output=True)\n"
        "assert bad.exitcode == real.returncode != 0, (bad.exitcode, real.returncode)\n"
        "ok = ex.subprocess.Popen(['flwr-clientapp', '--help'], stdout=subprocess.DEVNULL)\n"
        "ok.join(60)\n"
        "assert ok.exitcode == 0 and popen.started == 2, ok.exitcode\n"
        # any other command is Popen's
        "other = ex.subprocess.Popen([__import__('sys').executable, '-c', 'pass'])\n"
        "assert isinstance(other, subprocess.Popen) and other.wait(30) == 0\n"
    )
    in_fresh_process(code)


def test_a_forked_clientapp_starts_faster_than_a_fresh_process() -> None:
    # Arrange: `flwr-clientapp --help` imports Flower's ClientApp runtime, then prints and exits
    code = (
        "import subprocess, sys, time\n"
        "from client import clientapp_forks as forks\n"
        "from client.device import flower_bin\n"
        "popen, _ = forks.install()\n"
        "def forked():\n"
        "    p = popen.Popen(['flwr-clientapp', '--help'], stdout=subprocess.DEVNULL)\n"
        "    p.join(60)\n"
        "    assert p.exitcode == 0\n"
        "def fresh():\n"
        "    subprocess.run([flower_bin('flwr-clientapp'), '--help'], check=True, capture_output=True)\n"
        "def best(f):\n"
        "    times = []\n"
        "    for _ in range(3):\n"
        "        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)\n"
        "    return min(times)\n"
        "forked()\n"  # the fork server's first fork
        "a, b = best(forked), best(fresh)\n"
        "print(f'forked {a:.2f} s, fresh {b:.2f} s', file=sys.stderr)\n"
        "assert a < 0.6 * b, (a, b)\n"
    )
    started = time.monotonic()
    in_fresh_process(code)
    assert time.monotonic() - started < 120


def test_the_fork_server_ends_with_the_superexec() -> None:
    code = (
        "from client import clientapp_forks as forks\n"
        "from multiprocessing import forkserver\n"
        "forks.install()\n"
        "print(forkserver._forkserver._forkserver_pid)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
