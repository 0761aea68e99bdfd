"""The ``flwr`` commands a coordinator runs against a deployed SuperLink, with a private Flower home.

Flower 1.42's CLI reads its SuperLink connections from ``$FLWR_HOME/config.toml``::

    [superlink]
    default = "fedlora"

    [superlink.fedlora]
    address = "superlink.example.org:9092"
    root-certificates = "/abs/path/ca.crt"

and every command names the connection (``flwr supernode register KEY.pub fedlora``). Register, list, run and
status all go to the SuperLink's one HTTPS port (Control API); none needs an account login while the SuperLink runs
without an account-authentication plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pathspec

CONNECTION = "fedlora"
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
"""No ``uv sync`` of the app's dependencies (it would pull a CUDA torch), no telemetry, no update check."""
CLI_TIMEOUT_S = 120.0


class FlwrCliError(RuntimeError):
    """A ``flwr`` command failed; the message holds its output."""


@contextmanager
def staged_app(app_dir: Path) -> Iterator[Path]:
    """A throw-away copy of ``app_dir`` without the folders its ``.gitignore`` excludes (and ``.git``).

    ``flwr run APP_DIR`` walks every file under the folder, resolving each path, before it applies ``.gitignore``: a
    ``.venv`` inside the project (some 57,000 files) made each submission 10-15 s slower. Ignored folders are skipped
    here while walking; Flower then applies its own rules to the copy, so the app package (FAB) holds the same files.
    """
    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise FlwrCliError(f"{app_dir} is not a Flower app folder: it has no pyproject.toml")
    gitignore = app_dir / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines() if gitignore.is_file() else []
    ignored = pathspec.GitIgnoreSpec.from_lines(lines)
    with tempfile.TemporaryDirectory(prefix="fedlora-app-") as tmp:
        staged = Path(tmp) / app_dir.resolve().name
        for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
            here = Path(dirpath)
            rel = here.relative_to(app_dir)
            dirnames[:] = [d for d in dirnames if d != ".git" and not ignored.match_file(f"{(rel / d).as_posix()}/")]
            for name in filenames:
                source = here / name
                if source.is_symlink() or ignored.match_file((rel / name).as_posix()):
                    continue
                (staged / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, staged / rel / name)
        yield staged


def toml_string(value: str) -> str:
    """Return ``value`` as a TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value)


class FlwrCli:
    """Runs ``flwr`` with its own ``FLWR_HOME`` and one named SuperLink connection.

    Parameters
    ----------
    flwr_home : Path
        Flower home folder (config.toml, installed apps); created by ``configure``.
    connection : str
        Name of the SuperLink connection in config.toml.
    env : Mapping[str, str] | None
        Extra environment for every command.
    """

    def __init__(self, flwr_home: Path, connection: str = CONNECTION, env: Mapping[str, str] | None = None) -> None:
        self.flwr_home = flwr_home.resolve()
        self.connection = connection
        self.executable = str(Path(sys.executable).parent / "flwr")
        self.env = {**os.environ, **FLOWER_ENV, **(env or {}), "FLWR_HOME": str(self.flwr_home)}

    def configure(self, address: str, root_cert: Path) -> Path:
        """Write config.toml with this connection to ``address`` verified by ``root_cert``; return its path."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(
            f"[superlink]\ndefault = {toml_string(self.connection)}\n\n"
            f"[superlink.{self.connection}]\naddress = {toml_string(address)}\n"
            f"root-certificates = {toml_string(str(root_cert.resolve()))}\n",
            encoding="utf-8",
        )
        return path

    def run(self, *args: str, timeout: float = CLI_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS``; raise ``FlwrCliError`` with its output if it fails and ``check``, or if it hangs."""
        try:
            done = subprocess.run(
                [self.executable, *args],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise FlwrCliError(f"flwr {' '.join(args)} did not answer within {timeout:.0f} s") from None
        if check and done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise FlwrCliError(f"flwr {' '.join(args)} failed ({done.returncode}): {output}")
        return done

    def json(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and return its JSON object; raise ``FlwrCliError`` unless it succeeded.

        With ``--format json`` a refused command still exits 0 and prints ``{"success": false, "error-message":
        ...}`` (e.g. ``[code: 23] Public key already in use.``), so success is read from the JSON.
        """
        out = self.run(*args, "--format", "json", timeout=timeout).stdout
        start = out.find("{")
        if start < 0:
            raise FlwrCliError(f"flwr {' '.join(args)} printed no JSON: {out.strip()}")
        result = dict(json.loads(out[start:]))
        if not result.get("success", False):
            message = " ".join(str(result.get("error-message", result)).split())
            raise FlwrCliError(f"flwr {' '.join(args)} failed: {message}")
        return result

    def register(self, public_key: Path) -> int | None:
        """Register a node's OpenSSH public key; return its node id, or None if the key was registered before."""
        try:
            return int(self.json("supernode", "register", str(public_key), self.connection)["node-id"])
        except FlwrCliError as err:
            if "already in use" in str(err):
                return None
            raise

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return the SuperLink's nodes as ``flwr supernode ls`` reports them (``node-id``, ``status``, ...)."""
        return list(self.json("supernode", "ls", self.connection)["nodes"])

    def online_node_ids(self) -> set[int]:
        """Return the ids of the nodes whose status is ``online``."""
        return {int(node["node-id"]) for node in self.list_nodes() if node["status"] == "online"}

    def submit(self, app_dir: Path, run_config: str | None = None, timeout: float = CLI_TIMEOUT_S) -> int:
        """Submit ``flwr run APP_DIR`` (``run_config``: ``'k1=v1 k2="s"'``); return the run id without waiting."""
        with staged_app(app_dir) as staged:
            args = ["run", str(staged), self.connection]
            if run_config:
                args += ["--run-config", run_config]
            result = self.json(*args, timeout=timeout)
        if result.get("run-id") is None:
            raise FlwrCliError(f"flwr run {app_dir} was not accepted: {result}")
        return int(result["run-id"])

    def run_status(self, run_id: int) -> str:
        """Return the run's status text from ``flwr ls`` (``pending``, ``running``, ``finished:completed``, ...)."""
        runs = self.json("ls", self.connection, "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"])

    def wait_run(self, run_id: int, timeout: float, poll_s: float = 5.0) -> str:
        """Poll until the run is finished and return its status; ``TimeoutError`` after ``timeout`` seconds.

        ``flwr run`` returns as soon as the run is submitted, and its exit status says nothing about how the run
        ends: ``finished:completed`` is success, ``finished:failed`` or ``finished:stopped`` is not.
        """
        deadline = time.monotonic() + timeout
        while not (status := self.run_status(run_id)).startswith("finished"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {status} after {timeout:.0f} s")
            time.sleep(poll_s)
        return status

    def run_log(self, run_id: int) -> str:
        """Return the run's ServerApp log so far (``flwr log RUN_ID --show``)."""
        return self.run("log", str(run_id), self.connection, "--show", check=False).stdout

    def stream_log(self, run_id: int) -> subprocess.Popen[bytes]:
        """Start ``flwr log RUN_ID --stream``, which copies the ServerApp log to this process's stdout as it grows.

        It ends by itself shortly after the run finishes; the caller stops it if it does not.
        """
        command = [self.executable, "log", str(run_id), self.connection, "--stream"]
        return subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL)
