"""Processes a ``fedlora`` command starts die with it, whatever kills it.

A command marks every process it starts with an environment variable (Flower and Ray pass the environment down to
their own children, wherever they are re-parented) and starts a reaper: a small process in a session of its own that
watches the command. When the command ends for any reason (its own ``finally``, Ctrl-C, SIGKILL from an OOM killer,
a closed terminal, a CI timeout that kills its process group), the reaper SIGKILLs every process that still carries
the mark and removes the command's temporary folders. A command that cleans up after itself stops its reaper on the
way out.

    python -m client.reaper --pid PID --started T --mark VAR=VALUE [--remove DIR ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

POLL_S = 0.2
"""How often the reaper looks at the command it watches."""
SWEEP_S = 5.0
"""How long it keeps killing marked processes after the command died (Ray may start a worker meanwhile)."""


def marked_processes(variable: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment sets ``variable`` to ``value``, wherever they were re-parented."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if proc.environ().get(variable) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def terminate(procs: Sequence[psutil.Process], grace: float) -> None:
    """SIGTERM ``procs``, then SIGKILL those still alive after ``grace`` seconds (at once when it is 0)."""
    first = signal.SIGKILL if grace <= 0 else signal.SIGTERM
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(first)
    _, alive = psutil.wait_procs(list(procs), timeout=max(grace, 0.5))
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def start_reaper(variable: str, value: str, remove: Sequence[Path] = ()) -> subprocess.Popen[bytes]:
    """Start a reaper for this process and the processes marked ``variable=value``; stop it with :func:`stop_reaper`.

    The reaper is not marked itself, runs in its own session (a signal to this command's process group does not
    reach it), and holds no terminal or pipe of ours.
    """
    me = psutil.Process()
    env = {k: v for k, v in os.environ.items() if k != variable}
    command = [sys.executable, "-m", "client.reaper", "--pid", str(me.pid), "--started", repr(me.create_time())]
    command += ["--mark", f"{variable}={value}", *(arg for path in remove for arg in ("--remove", str(path)))]
    return subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )


def stop_reaper(reaper: subprocess.Popen[bytes]) -> None:
    """Stop a reaper whose command has cleaned up by itself."""
    if reaper.poll() is None:
        reaper.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=5)


def _alive(pid: int, started: float) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (not another one that reused the pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1e-3
    except psutil.NoSuchProcess:
        return False


def reap(variable: str, value: str, remove: Sequence[Path]) -> None:
    """SIGKILL every marked process until two looks in a row find none (at most :data:`SWEEP_S` seconds: a dying
    Ray can start a worker meanwhile), then remove the folders."""
    deadline, quiet = time.monotonic() + SWEEP_S, 0
    while quiet < 2 and time.monotonic() < deadline:
        left = marked_processes(variable, value)
        quiet = 0 if left else quiet + 1
        if left:
            terminate(left, grace=0)
        else:
            time.sleep(POLL_S)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Watch ``--pid``; when it is gone, reap. SIGTERM (the command's own clean exit) stops the watch quietly."""
    parser = argparse.ArgumentParser(prog="python -m client.reaper", description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--started", type=float, required=True, help="the watched process's create time")
    parser.add_argument("--mark", required=True, metavar="VAR=VALUE")
    parser.add_argument("--remove", action="append", default=[], type=Path)
    args = parser.parse_args(argv)
    variable, _, value = args.mark.partition("=")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the command, which cleans up and stops us
    while _alive(args.pid, args.started):
        time.sleep(POLL_S)
    reap(variable, value, args.remove)
    return 0


if __name__ == "__main__":
    sys.exit(main())
