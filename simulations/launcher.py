"""Run the fedlora Flower app on Flower's simulation engine, with a private SuperLink that never outlives us.

``flwr run .`` alone starts a detached local SuperLink that outlives the run and exits 0 even when the run failed.
Here we start our own ``flower-superlink --simulation`` on free loopback ports with a throw-away ``FLWR_HOME``,
submit the run with ``flwr run --stream``, read the run's final status with ``flwr ls --format json``, and stop the
SuperLink and every process under it on the way out, then any process still marked as ours (a Ray worker that was
re-parented while the tree went down). A run that outlives its deadline is stopped the same way. If this command is
killed before it can do any of that (SIGKILL, a closed terminal), its reaper (:mod:`client.reaper`) does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from client.reaper import marked_processes, start_reaper, stop_reaper, terminate
from server.flwr_cli import staged_app

CONNECTION = "fedlora-sim"
LAUNCH_ID = "FEDLORA_LAUNCH_ID"
"""Environment variable that marks every process of one launch (Flower and Ray pass the environment down)."""
PROJECT_DIR = Path(__file__).resolve().parents[1]


class LaunchError(RuntimeError):
    """The simulation could not be started or did not complete; the message says why."""


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended."""

    run_id: str
    status: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's CLI tools: project-local home, no telemetry, no runtime dependency installs.

    The (unique, temporary) home's name also marks the launch's processes (``LAUNCH_ID``), for :func:`stop_launch`.
    """
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            LAUNCH_ID: flwr_home.name,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PYTHONUNBUFFERED": "1",
            # Flower's processes start one another by name (flower-superexec, flwr-simulation).
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (falls back to PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def stop_process_tree(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM a process and all its descendants, then SIGKILL whatever is left after ``grace`` seconds."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    terminate(tree, grace)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def launch_processes(launch_id: str) -> list[psutil.Process]:
    """Live processes marked with ``launch_id`` (see :func:`flower_env`), wherever they were re-parented."""
    return marked_processes(LAUNCH_ID, launch_id)


def stop_launch(launch_id: str, grace: float = 10.0, attempts: int = 3) -> list[psutil.Process]:
    """Stop every process still marked with ``launch_id``; return those that survived (none, normally).

    Stopping a process tree is not enough: while the SuperLink goes down, Ray can start a worker whose parent then
    dies, so the worker is re-parented out of the tree and would outlive the launch.
    """
    for _ in range(attempts):
        left = launch_processes(launch_id)
        if not left:
            return []
        terminate(left, grace)
    return launch_processes(launch_id)


@contextmanager
def private_superlink(flwr_home: Path, log_path: Path, startup_timeout: float = 60.0) -> Iterator[str]:
    """Start ``flower-superlink --simulation`` on a free port; yield its address; stop it and its children."""
    port, health = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    command = [
        _bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation=subprocess",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--health-server-address=127.0.0.1:{health}",
        f"--database={flwr_home / 'superlink.db'}",
        "--disable-runtime-dependency-installation",
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            command, env=flower_env(flwr_home), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_healthy(proc, port, startup_timeout, log_path)
        yield address
    finally:
        stop_process_tree(proc)


def _wait_healthy(proc: subprocess.Popen[Any], port: int, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise LaunchError(f"flower-superlink did not become healthy within {timeout:.0f} s; see {log_path}")


def write_connection(flwr_home: Path, address: str) -> None:
    """Point Flower's CLI at our SuperLink."""
    config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "insecure": True}}}
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def run_simulation(
    run_config: Mapping[str, Any],
    num_nodes: int,
    log_dir: Path,
    on_line: Callable[[str], None],
    cpus_per_node: int = 2,
    deadline_s: float | None = None,
    app_dir: Path = PROJECT_DIR,
    gpus_per_node: float = 0.0,
) -> RunOutcome:
    """Submit the Flower app in ``app_dir`` (fedlora's own by default) with ``run_config`` to a private simulation
    SuperLink and wait for it to end.

    With ``deadline_s``, a run still going after that many seconds is stopped and :class:`LaunchError` raised.
    """
    flwr_home = Path(tempfile.mkdtemp(prefix="fedlora-flwr-"))
    started = time.monotonic()
    reaper = start_reaper(LAUNCH_ID, flwr_home.name, remove=[flwr_home])  # if we are killed, it stops the rest
    try:
        with private_superlink(flwr_home, log_dir / "superlink.log") as address:
            write_connection(flwr_home, address)
            config_file = flwr_home / "run-config.toml"
            config_file.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
            federation = f"num_supernodes={num_nodes} client_resources_num_cpus={cpus_per_node}"
            if gpus_per_node > 0:
                federation += f" client_resources_num_gpus={gpus_per_node}"
            with staged_app(app_dir) as staged:
                command = [
                    _bin("flwr"), "run", str(staged), CONNECTION, "--stream",
                    "--run-config", str(config_file), "--federation-config", federation,
                ]  # fmt: skip
                _stream(command, flwr_home, log_dir / "flwr.log", on_line, deadline_s)
            return RunOutcome(*_last_run_status(flwr_home), seconds=time.monotonic() - started)
    finally:
        survivors = stop_launch(flwr_home.name)
        shutil.rmtree(flwr_home, ignore_errors=True)
        stop_reaper(reaper)
        if survivors:
            on_line(f"fedlora | WARNING: processes of this run survived SIGKILL: {[p.pid for p in survivors]}")


def _stream(
    command: list[str], flwr_home: Path, log_path: Path, on_line: Callable[[str], None], deadline_s: float | None
) -> None:
    """Run ``command``, passing each output line to ``on_line``; stop it (and fail) past ``deadline_s``."""
    expired = threading.Event()
    with log_path.open("a", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            command, env=flower_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None

        def expire() -> None:
            expired.set()
            stop_process_tree(proc)

        watchdog = threading.Timer(deadline_s or 0.0, expire)
        watchdog.daemon = True
        if deadline_s is not None:
            watchdog.start()
        try:
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                on_line(line.rstrip("\n"))
            with contextlib.suppress(subprocess.TimeoutExpired):  # output closed: the process is on its way out
                proc.wait(timeout=60)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                stop_process_tree(proc)
    if expired.is_set():
        raise LaunchError(f"the run did not finish within its deadline of {deadline_s:.0f} s; stopped it")


def _last_run_status(flwr_home: Path) -> tuple[str, str]:
    """(run id, status) of the newest run on our SuperLink, from ``flwr ls --format json``."""
    done = subprocess.run(
        [_bin("flwr"), "ls", CONNECTION, "--format", "json"],
        env=flower_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(done.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise LaunchError(f"could not read the run status from `flwr ls`: {done.stdout or done.stderr}") from None
    if not runs:
        raise LaunchError("the SuperLink knows no run: the submission failed (see flwr.log)")
    newest = max(runs, key=lambda r: str(r.get("pending-at", "")))
    return str(newest["run-id"]), str(newest["status"])
