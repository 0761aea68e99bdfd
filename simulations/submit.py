"""Register node keys with a deployed SuperLink, submit a fedlora run, wait for it and check how it ended.

::

    # register the nodes' public keys, then exit (compose service `register`)
    python -m simulations.submit --superlink superlink:9092 --root-cert /certs/ca.crt \\
        --register /certs/node-0.pub --register /certs/node-1.pub
    # wait for 2 online SuperNodes, run the app, wait for the run (compose service `coordinator`)
    python -m simulations.submit --superlink superlink:9092 --root-cert /certs/ca.crt \\
        --min-nodes 2 --app /app --run-config 'num-rounds=2' --run-config 'store="/outputs/fedlora.db"'

Waits until the SuperLink answers (TLS verified with ``--root-cert``), registers the given node public keys (a key
registered before is fine) and, with ``--app``, waits until ``--min-nodes`` SuperNodes are online, submits ``flwr
run APP``, waits for the run to finish and prints its ServerApp log. ``flwr run`` itself exits 0 as soon as the run
is accepted, however the run ends; this command reads the final status with ``flwr ls`` instead. Exit status: 0 when
the keys are registered and the run (if any) finished ``completed``, 1 when a command or the run failed or timed out,
2 on bad arguments, 3 when the SuperLink stayed unreachable, 4 on a certificate problem.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from client.device_link import FailureKind, probe_superlink
from client.device_options import UsageError, check_root_cert, parse_host_port
from server.flwr_cli import FlwrCli, FlwrCliError

log = logging.getLogger("fedlora.submit")
POLL_S = 5.0
"""Seconds between ``flwr ls`` polls (each starts the ``flwr`` CLI: about 2 CPU seconds)."""
STREAM_GRACE_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    """Return the submitter's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m simulations.submit", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    add("--root-cert", required=True, type=Path, metavar="CA.CRT", help="CA certificate of the SuperLink")
    add("--register", action="append", default=[], type=Path, metavar="NODE.PUB", help="node public key (repeatable)")
    add("--min-nodes", type=int, default=2, metavar="N", help="wait for N online SuperNodes before the run (2)")
    add("--app", type=Path, default=None, help="Flower app folder (pyproject.toml) to run; none: register only")
    add(
        "--run-config",
        action="append",
        default=[],
        metavar="'K=V ...'",
        help="run-config overrides, e.g. 'num-rounds=2 model=\"tiny\"' (repeatable; keys must exist in the app)",
    )
    add("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", ".flwr")), help="$FLWR_HOME or .flwr")
    add("--timeout", type=float, default=3600.0, metavar="S", help="seconds for each wait (default 3600)")
    return parser


def wait_reachable(host: str, port: int, root_cert: Path, timeout: float) -> int:
    """Probe the SuperLink until its TLS handshake succeeds; return 0, 3 (unreachable) or 4 (certificate)."""
    deadline, delay = time.monotonic() + timeout, 1.0
    while (failure := probe_superlink(host, port, root_cert)) is not None:
        if failure.kind is not FailureKind.UNREACHABLE:
            log.error("error: %s", failure.message)
            return 4
        if time.monotonic() > deadline:
            log.error("error: %s; gave up after %.0f s", failure.message, timeout)
            return 3
        log.info("%s; retrying in %.0f s", failure.message, delay)
        time.sleep(delay)
        delay = min(2 * delay, 30.0)
    return 0


def wait_for_nodes(cli: FlwrCli, count: int, timeout: float) -> set[int]:
    """Wait until at least ``count`` nodes are online; return their ids (``TimeoutError`` after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while len(online := cli.online_node_ids()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(online)} of {count} SuperNodes online after {timeout:.0f} s")
        time.sleep(POLL_S)
    return online


def submit_and_wait(cli: FlwrCli, args: argparse.Namespace) -> int:
    """Register keys and, given an app, wait for nodes and run it; return 0 if all went well, else 1."""
    for public_key in args.register:
        node_id = cli.register(public_key)
        log.info("%s: %s", public_key, f"registered as node {node_id}" if node_id else "registered before")
    if args.app is None:
        return 0
    online = wait_for_nodes(cli, args.min_nodes, args.timeout)
    log.info("%d SuperNodes online: %s", len(online), sorted(online))
    run_id = cli.submit(args.app, " ".join(part.strip() for part in args.run_config if part.strip()) or None)
    log.info("run %d submitted; its ServerApp log follows", run_id)
    status = follow_run(cli, run_id, args.timeout)
    log.info("run %d %s", run_id, status)
    return 0 if status == "finished:completed" else 1


def follow_run(cli: FlwrCli, run_id: int, timeout: float) -> str:
    """Stream the run's log to stdout until it finishes; return its final status (``finished:completed``, ...).

    The log stream ends by itself when the run does; if it ends early (e.g. a dropped connection), ``flwr ls`` is
    polled instead until the run has finished.
    """
    deadline = time.monotonic() + timeout
    streamer = cli.stream_log(run_id)
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            streamer.wait(timeout=timeout)
        return cli.wait_run(run_id, max(deadline - time.monotonic(), 0.0), poll_s=POLL_S)
    finally:
        if streamer.poll() is None:
            streamer.terminate()
            streamer.wait(timeout=STREAM_GRACE_S)


def main(argv: list[str] | None = None) -> int:
    """Run the submitter; return its exit status (module docstring lists them)."""
    logging.basicConfig(level=logging.INFO, format="fedlora submit: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        host, port = parse_host_port(args.superlink)
        root_cert = check_root_cert(args.root_cert)
    except UsageError as err:
        log.error("error: %s", err)
        return 2
    if (code := wait_reachable(host, port, root_cert, args.timeout)) != 0:
        return code
    cli = FlwrCli(args.flwr_home)
    cli.configure(args.superlink, root_cert)
    try:
        return submit_and_wait(cli, args)
    except (FlwrCliError, TimeoutError) as err:
        log.error("error: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
