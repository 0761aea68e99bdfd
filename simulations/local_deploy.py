"""A real deployment on 127.0.0.1 for benchmarks: a TLS SuperLink with node authentication and ``fedlora client``
devices, each a process of its own, exactly as ``docs/deployment.md`` sets them up on separate machines.

Every process carries this launch's mark (:data:`simulations.launcher.LAUNCH_ID`), and a reaper stops them all should
the caller be killed; leaving the ``with`` block stops them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.reaper import start_reaper, stop_reaper
from server.certs import CertPaths, create_certs
from server.flwr_cli import FLOWER_ENV, FlwrCli
from simulations.launcher import LAUNCH_ID, free_port, stop_launch

BIN = Path(sys.executable).parent
STARTUP_S = 120.0


@dataclass
class LocalFederation:
    """A running SuperLink and its devices; ``submit`` runs the fedlora app on them."""

    workdir: Path
    certs: CertPaths
    cli: FlwrCli
    env: dict[str, str]
    address: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``command`` with this launch's environment, its output in ``logs/NAME.log``."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        with (self.workdir / "logs" / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                list(command), stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        """The output of process ``name`` so far."""
        return (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")

    def start_devices(self, devices: Sequence[Sequence[str]], timeout: float = STARTUP_S) -> None:
        """Register a key per device and start ``fedlora client`` with its arguments; wait until all are online."""
        for index, args in enumerate(devices):
            self.cli.register(self.certs.nodes[index].public)
            command = [sys.executable, "-m", "client.device", "--superlink", self.address]
            command += ["--root-cert", str(self.certs.ca_cert), "--key", str(self.certs.nodes[index].private)]
            self.spawn(f"device-{index}", [*command, *args])
        deadline = time.monotonic() + timeout
        while len(self.cli.online_node_ids()) < len(devices):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.cli.online_node_ids())} of {len(devices)} devices came online")
            time.sleep(1.0)

    def run(self, app_dir: Path, run_config: Mapping[str, Any], timeout: float) -> str:
        """Run the app with these run-config overrides; return its final status (``finished:completed``)."""
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
        return self.cli.wait_run(self.cli.submit(app_dir, overrides), timeout, poll_s=2.0)


@contextlib.contextmanager
def local_federation(workdir: Path, nodes: int) -> Iterator[LocalFederation]:
    """A SuperLink on a free loopback port with certificates and ``nodes`` node keys under ``workdir``."""
    workdir = workdir.resolve()
    launch = uuid.uuid4().hex
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(workdir / "flwr-home"), LAUNCH_ID: launch}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    certs = create_certs(workdir / "certs", nodes=nodes)[0]
    port = free_port()
    federation = LocalFederation(workdir, certs, FlwrCli(workdir / "flwr-home", env=env), env, f"127.0.0.1:{port}")
    reaper = start_reaper(LAUNCH_ID, launch)
    try:
        tls = ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert)]
        tls += ["--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"]
        where = ["--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
        federation.spawn("superlink", [str(BIN / "flower-superlink"), *tls, *where])
        _wait_for(lambda: "Uvicorn running on https://" in federation.log("superlink"), STARTUP_S, "the SuperLink")
        federation.cli.configure(federation.address, certs.ca_cert)
        yield federation
    finally:
        stop_launch(launch)
        stop_reaper(reaper)


def _wait_for(ready: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start within {timeout:.0f} s")
        time.sleep(0.25)
