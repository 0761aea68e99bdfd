"""A real deployment on 127.0.0.1 for tests: flower-superlink with TLS and SuperNode authentication, flower-supernodes.

Usage::

    with Deployment(tmp_path, nodes=2) as dep:          # certs, FLWR_HOME, SuperLink on a free port
        dep.register(0); dep.register(1)                  # flwr supernode register node-I.pub
        a = dep.start_supernode(0, node_config={"lora-rank": 2, "partition-id": 0, "num-partitions": 2})
        b = dep.start_supernode(1, node_config={"lora-rank": 8, "partition-id": 1, "num-partitions": 2})
        dep.wait_online([a, b])
        run_id = dep.run_app(APP_DIR, run_config={"num-rounds": 2})
        dep.wait_run(run_id)                              # polls `flwr ls --format json`
    # every process started here is stopped: SIGTERM to its process group, SIGKILL after a grace period,
    # and any descendant that left the group (SuperExec, ServerApp) as well

Commands that work in Flower 1.42 (all APIs share one HTTPS port; ``--host/--port`` replaced the old addresses)::

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key \\
        --enable-supernode-auth --host 127.0.0.1 --port P --disable-runtime-dependency-installation
    # $FLWR_HOME/config.toml:  [superlink] default = "fedlora"
    #                          [superlink.fedlora] address = "127.0.0.1:P"  root-certificates = "/abs/ca.crt"
    flwr supernode register node-0.pub fedlora --format json      # -> {"success": true, "node-id": N}
    flwr supernode ls fedlora --format json                        # status: registered | online | offline
    flower-supernode --superlink 127.0.0.1:P --root-certificates ca.crt --auth-supernode-private-key node-0.key \\
        --host 127.0.0.1 --port Q --node-config "lora-rank=8 partition-id=0 num-partitions=2"
    flwr run APP_DIR fedlora --format json
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from client.device_options import node_config_string
from server.certs import CertPaths, create_certs
from server.flwr_cli import CONNECTION, FLOWER_ENV, FlwrCli

BIN = Path(sys.executable).parent
STOP_GRACE_S = 10.0
_ONLINE = re.compile(r"SuperNode ID: (\d+)")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child if the test process dies without cleaning up (no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``predicate`` until it is true; raise ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def bounded(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread if the block runs past ``seconds`` (SIGALRM; Linux and macOS)."""

    def overrun(_signum: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, overrun)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@dataclass
class Proc:
    """A process started by the harness, in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    descendants: set[int] = field(default_factory=set)

    def log(self) -> str:
        """Return everything it logged so far (ANSI colours removed)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return re.sub(r"\x1b\[[0-9;]*m", "", text)

    def wait(self, timeout: float) -> int:
        """Wait for it to exit; return its status (``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
        return self.popen.wait(timeout=timeout)

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until its log matches ``pattern``; raise ``RuntimeError`` with its log if it exits first."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
                return True
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before {pattern!r}:\n{self.log()}")
            return False

        wait_until(seen, timeout, f"{pattern!r} in the log of {self.name}")
        return found[0]

    def remember_descendants(self) -> None:
        """Record its current descendants, which may have left its process group, so ``stop`` reaches them too."""
        try:
            import psutil

            self.descendants |= {child.pid for child in psutil.Process(self.popen.pid).children(recursive=True)}
        except Exception:  # noqa: BLE001 - best effort; psutil missing or the process already gone
            pass

    def terminate(self) -> None:
        """Send SIGTERM to its process group without waiting (``stop`` waits)."""
        self.remember_descendants()
        if self.popen.poll() is None:
            _killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM its process group, SIGKILL it after ``grace`` seconds, then kill recorded descendants."""
        self.terminate()
        if self.popen.poll() is None:
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace)
        _killpg(self.popen.pid, signal.SIGKILL)
        for pid in self.descendants:
            _kill(pid)
        return self.popen.returncode


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Deployment:
    """A SuperLink with TLS and node auth on 127.0.0.1, its certificates, a private FLWR_HOME, and what it started.

    Parameters
    ----------
    workdir : Path
        Folder for certificates (``certs/``), ``flwr-home/`` and process logs (``logs/``).
    nodes : int
        Node key pairs to create (``certs/node-I.key``/``.pub``); none is registered until ``register``.
    env : Mapping[str, str] | None
        Extra environment for every process.
    """

    def __init__(self, workdir: Path, nodes: int = 2, env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir.resolve()
        self.certs: CertPaths = create_certs(self.workdir / "certs", nodes=nodes)[0]
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.port = 0
        self.procs: list[Proc] = []
        self.superlink: Proc | None = None
        self.registered: dict[int, int] = {}
        """Node index -> node id, for the keys ``register`` registered by index."""
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(self.flwr_home),
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            **(env or {}),
        }
        self.cli = FlwrCli(self.flwr_home, CONNECTION, env=env)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the SuperLink (Fleet, Control and Runtime APIs)."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Deployment:
        """Start the SuperLink and wait until it accepts connections."""
        try:
            self.start_superlink()
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop every process this deployment started."""
        self.stop_all()

    def spawn(self, name: str, command: Sequence[str], cwd: Path | None = None) -> Proc:
        """Start ``command`` in a new process group with this deployment's environment, logging to ``logs/NAME.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                list(command),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=cwd or self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_superlink(self, timeout: float = 60.0, extra_args: Sequence[str] = (), cwd: Path | None = None) -> Proc:
        """Start flower-superlink with TLS and ``--enable-supernode-auth`` on a free port; write FLWR_HOME config.

        ``cwd`` (default: the work folder) is also the working directory of the ServerApps it runs.
        """
        self.port = free_port()
        self._write_flwr_config()
        self.superlink = self.spawn(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                *extra_args,
            ],
            cwd=cwd,
        )
        self.superlink.wait_for_log(r"Uvicorn running on https://", timeout)
        return self.superlink

    def _write_flwr_config(self) -> None:
        self.cli.configure(self.address, self.certs.ca_cert)

    def register(self, node: int | Path) -> int:
        """Register node ``I``'s public key (or the key file given) with the SuperLink; return its node id."""
        public = self.certs.nodes[node].public if isinstance(node, int) else node
        node_id = self.cli.register(public)
        if node_id is None:
            raise RuntimeError(f"{public} was registered before")
        if isinstance(node, int):
            self.registered[node] = node_id
        return node_id

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return ``flwr supernode ls``'s nodes (``node-id``, ``status``: registered/online/offline, ...)."""
        return self.cli.list_nodes()

    def online_node_ids(self) -> set[int]:
        """Return the ids of the nodes the SuperLink reports as online."""
        return self.cli.online_node_ids()

    def supernode_command(
        self,
        key: Path | None,
        root_cert: Path | None,
        node_config: Mapping[str, int | str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> list[str]:
        """Return a flower-supernode command for this SuperLink (``None`` leaves that flag out)."""
        command = [str(BIN / "flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1"]
        command += ["--port", str(free_port())]
        if root_cert is not None:
            command += ["--root-certificates", str(root_cert)]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        if node_config:
            command += ["--node-config", node_config_string(node_config)]
        return command + list(extra_args)

    def start_supernode(
        self,
        node: int | Path | None,
        *,
        root_cert: Path | None | bool = True,
        node_config: Mapping[str, int | str] | None = None,
        extra_args: Sequence[str] = (),
        name: str | None = None,
    ) -> Proc:
        """Start flower-supernode with node ``I``'s key (or the key given; None: no key).

        ``root_cert=True`` passes this deployment's ``ca.crt``, ``False``/``None`` passes none (system CAs).
        """
        key = self.certs.nodes[node].private if isinstance(node, int) else node
        cert = self.certs.ca_cert if root_cert is True else (root_cert or None)
        label = name or (f"supernode-{node}" if isinstance(node, int) else "supernode")
        command = self.supernode_command(key, cert, node_config, extra_args)
        return self.spawn(self._unique(label), command)

    def start_client(self, args: Sequence[str], name: str = "fedlora-client") -> Proc:
        """Start ``fedlora client ARGS`` (``python -m client.device``) as a device would."""
        return self.spawn(self._unique(name), [sys.executable, "-m", "client.device", *args])

    def client_args(self, node: int, rank: int | str, *extra: str, superlink: str | None = None) -> list[str]:
        """Return ``fedlora client`` arguments for node ``I``'s key and this SuperLink, tiny model and task."""
        return [
            *("--superlink", superlink or self.address, "--root-cert", str(self.certs.ca_cert)),
            *("--key", str(self.certs.nodes[node].private), "--model", "tiny", "--data", "tiny"),
            *("--rank", str(rank), *extra),
        ]

    def _unique(self, name: str) -> str:
        taken = {proc.name for proc in self.procs}
        index, candidate = 1, name
        while candidate in taken:
            index, candidate = index + 1, f"{name}-{index}"
        return candidate

    def wait_online(self, procs: Iterable[Proc], timeout: float = 90.0) -> set[int]:
        """Wait until each SuperNode logged its node id and the SuperLink lists them all online; return the ids."""
        ids = {int(proc.wait_for_log(_ONLINE.pattern, timeout).group(1)) for proc in procs}
        wait_until(lambda: ids <= self.online_node_ids(), timeout, f"nodes {sorted(ids)} online", interval=1.0)
        return ids

    def run_app(self, app_dir: Path, run_config: Mapping[str, Any] | None = None) -> int:
        """Submit ``flwr run APP_DIR`` to this SuperLink; return the run id (the run goes on in the background)."""
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in (run_config or {}).items())
        return self.cli.submit(app_dir, overrides or None)

    def wait_run(self, run_id: int, timeout: float = 600.0) -> str:
        """Wait until the run is finished; return its final status (``finished:completed`` when it succeeded)."""
        return self.cli.wait_run(run_id, timeout, poll_s=3.0)

    def process_tree(self) -> set[int]:
        """Return the ids of the processes started here and their descendants that are still running.

        The descendants seen now are remembered, so ``stop_all`` reaches them even after they left their group.
        """
        for proc in self.procs:
            proc.remember_descendants()
        pids = {proc.popen.pid for proc in self.procs} | {pid for proc in self.procs for pid in proc.descendants}
        return {pid for pid in pids if running(pid)}

    def stop_all(self) -> None:
        """Stop every process this deployment started, SuperNodes first and the SuperLink last."""
        nodes = [proc for proc in self.procs if proc is not self.superlink]
        for proc in nodes:
            proc.terminate()
        for proc in nodes:
            proc.stop()
        if self.superlink is not None:
            self.superlink.stop()
