"""``fedlora client`` against a real SuperLink (TLS + SuperNode authentication): each refusal (another CA, an
unregistered key, no SuperLink) becomes one line and its exit status; a registered device joins and stops cleanly.

The refusals of bare ``flower-supernode`` processes (no CA certificate, another CA, an unregistered key) are tested
against the SuperLink of the deployed run itself, while it runs: tests/test_deploy_run.py.

Every test is bounded: each wait has a timeout, and SIGALRM ends a test that overruns ``TEST_TIMEOUT_S``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy import Deployment, Proc, bounded, free_port, running, wait_until

from server.certs import CertPaths, create_certs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="process groups, SIGALRM")]
TEST_TIMEOUT_S = 240
EXIT_TIMEOUT_S = 120.0
REFUSED_KEY = 2  # node-2's key is never registered


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    with bounded(TEST_TIMEOUT_S):
        yield


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with Deployment(tmp_path_factory.mktemp("deploy"), nodes=3) as deployment:
        deployment.register(0)
        deployment.register(1)
        yield deployment


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return create_certs(tmp_path_factory.mktemp("other-ca"), nodes=0)[0]


def _client_args(dep: Deployment, node: int, root_cert: Path, superlink: str | None = None) -> list[str]:
    args = dep.client_args(node, 2, "--connect-timeout", "4", superlink=superlink)
    args[args.index("--root-cert") + 1] = str(root_cert)
    return args


def _one_error_line(proc: Proc) -> str:
    errors = [line for line in proc.log().splitlines() if line.startswith("fedlora client: error:")]
    assert len(errors) == 1, proc.log()
    assert "Traceback" not in proc.log()
    return errors[0]


def test_the_public_keys_from_fedlora_certs_register(dep: Deployment) -> None:
    nodes = {int(node["node-id"]): node["status"] for node in dep.list_nodes()}

    assert nodes == {node_id: "registered" for node_id in dep.registered.values()}


def test_registering_a_key_again_is_recognised(dep: Deployment) -> None:
    assert dep.cli.register(dep.certs.nodes[0].public) is None


def test_a_registered_node_with_the_ca_goes_online(dep: Deployment) -> None:
    proc = dep.start_supernode(0, node_config={"lora-rank": 2, "partition-id": 0, "num-partitions": 2})
    try:
        assert dep.wait_online([proc]) == {dep.registered[0]}
    finally:
        proc.stop()


def test_fedlora_client_reports_a_wrong_ca_in_one_line(dep: Deployment, other_ca: CertPaths) -> None:
    proc = dep.start_client(_client_args(dep, 1, other_ca.ca_cert))

    assert proc.wait(EXIT_TIMEOUT_S) == 4
    assert "is not signed by" in _one_error_line(proc)


def test_fedlora_client_reports_an_unregistered_key_in_one_line(dep: Deployment) -> None:
    proc = dep.start_client(_client_args(dep, REFUSED_KEY, dep.certs.ca_cert))

    assert proc.wait(EXIT_TIMEOUT_S) == 5
    assert "flwr supernode register node-2.pub" in _one_error_line(proc)
    assert dep.online_node_ids() == set()


def test_fedlora_client_retries_an_unreachable_superlink_then_gives_up(dep: Deployment) -> None:
    proc = dep.start_client(_client_args(dep, 1, dep.certs.ca_cert, superlink=f"127.0.0.1:{free_port()}"))

    assert proc.wait(EXIT_TIMEOUT_S) == 3
    assert "gave up after" in _one_error_line(proc)
    assert "retrying in" in proc.log()


def warm_folder(log: str) -> Path:
    """The warm node's private folder, from the node-config in the client's ``starting: flower-supernode`` line."""
    match = re.search(r"warm-socket='([^']+)'", log)
    assert match, log[-2000:]
    return Path(match.group(1)).parent


def test_fedlora_client_joins_and_stops_cleanly_on_sigterm(dep: Deployment) -> None:
    proc = dep.start_client([*_client_args(dep, 1, dep.certs.ca_cert), "--partition-id", "1", "--num-partitions", "2"])
    assert dep.wait_online([proc]) == {dep.registered[1]}
    proc.remember_descendants()

    os.kill(proc.popen.pid, signal.SIGTERM)  # the client alone: it must forward the signal to flower-supernode

    assert proc.wait(EXIT_TIMEOUT_S) == 0
    assert "fedlora client: stopped (SIGTERM)" in proc.log()
    wait_until(lambda: not any(running(pid) for pid in proc.descendants), 15, "flower-supernode and its children")
    assert dep.online_node_ids() == set()
    assert not warm_folder(proc.log()).exists()  # the warm node's socket and secret are gone


def test_a_sigkilled_fedlora_client_takes_its_supernode_with_it(dep: Deployment) -> None:
    proc = dep.start_client([*_client_args(dep, 1, dep.certs.ca_cert), "--partition-id", "1", "--num-partitions", "2"])
    assert dep.wait_online([proc]) == {dep.registered[1]}
    proc.remember_descendants()
    assert proc.descendants, "the SuperNode runs in a session of its own, out of reach of a signal to the client"

    folder = warm_folder(proc.log())
    assert (folder / "secret").is_file()

    os.kill(proc.popen.pid, signal.SIGKILL)  # no chance to forward anything: its reaper must act

    wait_until(lambda: not any(running(pid) for pid in proc.descendants), 15, "flower-supernode and its children")
    wait_until(lambda: not folder.exists(), 15, "the warm node's folder (its socket and secret) to be removed")
