"""``fedlora client``: join a deployed federation from this device by running a ``flower-supernode``.

::

    fedlora client --superlink HOST:PORT --root-cert ca.crt --key node-0.key \\
        --data PATH|TASK --model PATH|PRESET --rank auto|N [--name NAME] \\
        [--partition-id I --num-partitions N] [--state-dir DIR]

It validates the inputs, picks the LoRA rank (``--rank auto``: the largest that training the model fits in free
memory, see :mod:`client.device_memory`), checks that the
SuperLink is reachable and presents a certificate signed by ``--root-cert``, then starts::

    flower-supernode --superlink HOST:PORT --root-certificates ca.crt --auth-supernode-private-key node-0.key \\
        --port FREE_PORT --node-config "lora-rank=8 model='tiny' data='tiny' node-name='node-0' ..."

and waits on it, forwarding SIGINT/SIGTERM/SIGHUP to its process group and echoing its log to stderr. While the
SuperLink cannot be reached it retries with exponential backoff (1 s doubling to 30 s) for ``--connect-timeout``
seconds; a certificate or node-key problem fails at once. Exit status:

==  ==========================================================================================
0   the SuperNode stopped because this command was asked to stop (SIGINT/SIGTERM/SIGHUP)
1   flower-supernode failed for another reason (its last log lines say why)
2   invalid arguments (missing certificate or key file, bad rank, bad HOST:PORT, ...)
3   the SuperLink could not be reached within ``--connect-timeout``
4   TLS: the SuperLink's certificate is not signed by ``--root-cert`` or not valid for HOST
5   the SuperLink refused this node's key (not registered, or already online elsewhere)
==  ==========================================================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from client.device_link import Failure, FailureKind, classify_supernode_exit, probe_superlink
from client.device_memory import AutoRank, ModelShape, free_memory
from client.device_options import DeviceOptions, UsageError, node_config_string, parse_options
from client.reaper import start_reaper, stop_reaper
from client.warm import WarmNode
from common.config import RunConfig

__all__ = ["main", "run_device", "supernode_command"]

log = logging.getLogger("fedlora.client")
EXIT_CODES: dict[FailureKind, int] = {
    FailureKind.FAILED: 1,
    FailureKind.UNREACHABLE: 3,
    FailureKind.CERTIFICATE: 4,
    FailureKind.NODE_REFUSED: 5,
}
EXIT_USAGE = 2
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEVICE_MARK = "FEDLORA_DEVICE_MARK"
"""Environment variable that marks the processes one ``fedlora client`` starts (see :mod:`client.reaper`)."""
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
TAIL_LINES = 200
CHILD_GRACE_S = 5.0
CONNECTED_LINE = "SuperNode ID:"
"""flower-supernode logs this once the SuperLink has activated the node."""
FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}
"""Set unless the user set them: no telemetry from a device, no ``uv sync`` of the app's dependencies, and the local
SuperExec looks for a new message's task every 0.1 s instead of every second (a local call; it starts the ClientApp
process sooner)."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_bin(name: str) -> str:
    """Return the path of Flower's console script ``name``: next to this Python first, else on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file():
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name} not found next to {sys.executable} or on PATH; is flwr installed?")
    return found


def supernode_command(
    opts: DeviceOptions,
    rank: int,
    runtime_port: int,
    measured: AutoRank | None = None,
    warm: Mapping[str, str] | None = None,
) -> list[str]:
    """Return the ``flower-supernode`` command line for this device (``warm``: the warm node's node-config).

    With a ``--prompt-window``, Flower's SuperNode runs through :mod:`client.supernode_poll`."""
    window = opts.prompt_window
    prompt = [sys.executable, "-m", "client.supernode_poll", "--prompt-window", f"{window:g}", "--"]
    return [
        *(prompt if window > 0 else [flower_bin("flower-supernode")]),
        "--superlink",
        opts.superlink,
        "--root-certificates",
        str(opts.root_cert),
        "--auth-supernode-private-key",
        str(opts.key),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--node-config",
        node_config_string(opts.node_config(rank, measured.to_json() if measured else "", warm)),
    ]


def supernode_env(mark: str) -> dict[str, str]:
    """Return the environment for flower-supernode: Flower's defaults above, and its bin folder first on PATH.

    flower-supernode starts ``flower-superexec`` by name, so it must be on PATH even when this command was run as
    ``.venv/bin/fedlora`` from a shell without the virtual environment activated. Every process it starts carries
    ``DEVICE_MARK=mark``, for the reaper that stops them should this command be killed.
    """
    env = dict(os.environ)
    for key, value in FLOWER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env["PATH"] = os.pathsep.join([str(Path(flower_bin("flower-supernode")).parent), env.get("PATH", "")])
    env[DEVICE_MARK] = mark
    return env


def choose_rank(opts: DeviceOptions) -> tuple[int, AutoRank | None]:
    """Return the rank: ``--rank N`` as given, or the largest that training ``--model`` fits in this device's free
    memory at the run defaults (logged with why; each run chooses again with its own settings, see
    :class:`client.device_memory.AutoRank`)."""
    if opts.rank is not None:
        return opts.rank, None
    from client.causal_lm import CAUSAL_PRESETS, resolve_causal_model  # torch and transformers: only for auto
    from client.model import resolve_model

    resolve = resolve_causal_model if opts.model in CAUSAL_PRESETS else resolve_model

    free, where = free_memory()
    try:
        measured = AutoRank(free, ModelShape.of(resolve(opts.model)))
        defaults = RunConfig()
        rank, why = measured.rank_for(
            defaults.training.batch_size, defaults.training.max_length, defaults.lora.max_rank, per_sample=False
        )
    except (OSError, ValueError) as err:
        raise UsageError(f"--rank auto: {err}") from None
    log.info("--rank auto (%s, run defaults; each run chooses again): %s", where, why)
    return rank, measured


class StopFlag:
    """Set by a forwarded signal; wakes a backoff sleep at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True if a stop was requested meanwhile."""
        return self.event.wait(seconds)


@contextmanager
def forwarding_signals(stop: StopFlag, target: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP set ``stop`` and go to the process group of ``target[0]``, if any.

    A second signal while stopping kills the process group.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        again = stop.event.is_set()
        stop.signum = signum
        stop.event.set()
        if target and target[0].poll() is None:
            _signal_group(target[0], signal.SIGKILL if again else signum)

    previous = {sig: signal.signal(sig, handler) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class SupernodeExit:
    """How one flower-supernode process ended."""

    returncode: int
    tail: list[str]
    """Its last ``TAIL_LINES`` output lines."""
    connected: bool
    """Whether the SuperLink had activated the node (``CONNECTED_LINE`` was logged)."""


def run_supernode(command: list[str], stop: StopFlag, target: list[subprocess.Popen[str]], mark: str) -> SupernodeExit:
    """Run ``command`` in its own process group, echo its output to stderr; return how it ended.

    Its output is read on a thread while this one waits for it to exit: flower-supernode's child flower-superexec
    shares the output pipe and only exits once its parent is reaped, so waiting for the end of the output first
    would wait forever after flower-supernode fails early.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    connected = threading.Event()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=supernode_env(mark),
        start_new_session=True,
    )
    target[:] = [proc]
    if stop.event.is_set():
        _signal_group(proc, stop.signum or signal.SIGTERM)
    reader = threading.Thread(target=_echo, args=(proc, tail, connected), name="supernode-output", daemon=True)
    reader.start()
    returncode = proc.wait()
    target.clear()
    for signum, grace in ((signal.SIGTERM, CHILD_GRACE_S), (signal.SIGKILL, 1.0)):
        if reader.is_alive():
            _signal_group(proc, signum)  # what is left of its group: SuperExec, a ClientApp mid-message
            reader.join(timeout=grace)
    return SupernodeExit(returncode, list(tail), connected.is_set())


def _echo(proc: subprocess.Popen[str], tail: deque[str], connected: threading.Event) -> None:
    assert proc.stdout is not None  # guaranteed by stdout=PIPE
    for line in proc.stdout:
        sys.stderr.write(line)
        tail.append(line)
        if CONNECTED_LINE in line:
            connected.set()


def wait_for_superlink(opts: DeviceOptions, stop: StopFlag, deadline: float) -> Failure | None:
    """Probe the SuperLink until it answers with a valid certificate; back off while it is unreachable."""
    delay, attempt = BACKOFF_START_S, 1
    while True:
        failure = probe_superlink(opts.host, opts.port, opts.root_cert, timeout=min(10.0, opts.connect_timeout))
        if failure is None or not failure.kind.retry or stop.event.is_set():
            return failure
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Failure(failure.kind, f"{failure.message}; gave up after {attempt} attempts")
        wait = min(delay * random.uniform(0.8, 1.2), remaining)
        log.warning("%s; attempt %d, retrying in %.1f s", failure.message, attempt, wait)
        if stop.sleep(wait):
            return None
        delay, attempt = min(delay * 2, BACKOFF_MAX_S), attempt + 1


def run_device(opts: DeviceOptions, rank: int, measured: AutoRank | None = None) -> int:
    """Keep a SuperNode for this device running until it is stopped; return the exit status (see module doc)."""
    stop, target = StopFlag(), list[subprocess.Popen[str]]()
    deadline = time.monotonic() + opts.connect_timeout
    mark = uuid.uuid4().hex
    warm = WarmNode() if opts.warm else None
    # Should this command be killed, its SuperNode goes with it, and the warm node's socket and secret are removed.
    reaper = start_reaper(DEVICE_MARK, mark, remove=[warm.folder] if warm else [])
    with forwarding_signals(stop, target), contextlib.ExitStack() as cleanup:
        cleanup.callback(stop_reaper, reaper)
        if warm is not None:
            cleanup.callback(warm.close)
            warm.start()
            log.info("warm node: the model and data stay loaded across messages (--cold turns this off)")
        while not stop.event.is_set():
            failure = wait_for_superlink(opts, stop, deadline)
            if failure is None and not stop.event.is_set():
                warm_config = warm.node_config() if warm else None
                command = supernode_command(opts, rank, opts.runtime_port or free_port(), measured, warm_config)
                log.info("starting: %s", " ".join(command))
                ended = run_supernode(command, stop, target, mark)
                failure = classify_supernode_exit(ended.returncode, ended.tail, opts.key, stop.event.is_set())
                if ended.connected:  # it had joined: give the next reconnection a fresh window
                    deadline = time.monotonic() + opts.connect_timeout
            if failure is None:
                break
            if not failure.kind.retry or time.monotonic() >= deadline:
                log.error("error: %s", failure.message)
                return EXIT_CODES[failure.kind]
            log.warning("%s; starting again", failure.message)
    log.info("stopped (%s)", signal.Signals(stop.signum).name if stop.signum else "SuperNode ended")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``fedlora client``; return its exit status (module docstring lists them)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="fedlora client: %(message)s", stream=sys.stderr)
    try:
        opts = parse_options(argv)
        if opts.threads is not None:  # before torch is imported here (--rank auto) or in the processes started
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(opts.threads)
        rank, measured = choose_rank(opts)
        flower_bin("flower-supernode")
    except UsageError as err:
        log.error("error: %s", err)
        return EXIT_USAGE
    except SystemExit as done:  # --help
        return int(done.code or 0)
    return run_device(opts, rank, measured)


if __name__ == "__main__":
    sys.exit(main())
