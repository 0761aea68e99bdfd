"""The reverse proxy in front of the SuperLink (``fedlora proxy``, server/proxy.py), with real nginx processes.

A SuperLink with TLS and node authentication listens on 127.0.0.1 (the coordinator's loopback); Debian's nginx runs
as a plain process with the configuration ``fedlora proxy`` wrote into tmp_path and listens on another 127.0.0.1
port, the one devices use. Two devices join THROUGH the proxy with ``fedlora client`` and finish a one-round tiny run;
a SuperNode with an unregistered key is refused through it. ``flwr`` Control API calls (list runs, register a key,
start a run) sent to the proxy's port are refused with 403; the same calls on the SuperLink's loopback port work.

nginx is required, never skipped: ``apt-get install -y nginx`` (``.ci/run`` does). Every wait is bounded and every
process is stopped on the way out (``Deployment``).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_SETTINGS, run_fedlora
from deploy import Deployment, bounded, free_port, running, wait_until

from server.certs import create_certs
from server.flwr_cli import FlwrCli, FlwrCliError
from server.proxy import FLEET_PREFIX, FLEET_ROUTES, REFUSAL, Address, ProxySettings, render_nginx_conf

PROJECT_DIR = Path(__file__).resolve().parents[1]
RANKS = {"node-0": 2, "node-1": 8}
RUN_CONFIG: dict[str, Any] = {**TINY_SETTINGS, "node-ranks": "2,8", "num-rounds": 1, "min-nodes": 2}
RUN_TIMEOUT_S = 1200
"""A deployed round of the tiny task took 3-5 min on 2 busy cores (a fresh ClientApp process per message)."""
INTRUDER_EXIT_S = 120.0
DOCKER_SETTINGS = ProxySettings(certs=Path("/certs"), superlink=Address("superlink", 9091))
"""What docker-compose.yml's proxy runs: the committed nginx.conf must be exactly this rendering."""


def nginx_binary() -> str:
    """Debian's nginx, on PATH or at /usr/sbin/nginx; a missing nginx fails the test with what to install."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if found is None:
        pytest.fail("nginx is not installed (not on PATH, not /usr/sbin/nginx): run `apt-get install -y nginx`")
    return found


# --- the configuration ----------------------------------------------------------------------------------------------


def test_the_fleet_routes_are_those_of_the_installed_superlink_and_supernode() -> None:
    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode import fleet_http_client

    served = {route.path for route in router.routes}  # type: ignore[attr-defined]
    called = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', Path(fleet_http_client.__file__).read_text()))

    assert served == called == {f"{FLEET_PREFIX}{route}" for route in FLEET_ROUTES}


def test_only_exact_fleet_routes_are_forwarded() -> None:
    conf = render_nginx_conf(ProxySettings(Path("/c"), Address("127.0.0.1", 9091), run_dir=Path("/r")))

    forwarded = re.findall(r"proxy_pass https://superlink_fleet(\S*);", conf)
    exact = re.findall(r"location = (\S+) \{ limit_except POST \{ deny all; \}", conf)

    assert forwarded == exact == [f"{FLEET_PREFIX}{route}" for route in FLEET_ROUTES]
    assert re.findall(r"location (\S+) \{\s*default_type text/plain;\s*return 403", conf) == ["/"]
    assert "proxy_ssl_verify on;" in conf and 'proxy_ssl_trusted_certificate "/c/ca.crt";' in conf
    assert "proxy_ssl_name localhost;" in conf  # nginx checks DNS names only; the certificate always lists it


def test_the_committed_docker_config_is_the_rendered_one() -> None:
    assert (PROJECT_DIR / "nginx.conf").read_text() == render_nginx_conf(DOCKER_SETTINGS)
    assert "proxy_ssl_name superlink;" in render_nginx_conf(DOCKER_SETTINGS)


def test_fedlora_proxy_writes_a_config_nginx_accepts(tmp_path: Path) -> None:
    nginx = nginx_binary()
    certs = create_certs(tmp_path / "certs", nodes=0)[0]
    conf, run_dir = tmp_path / "nginx.conf", tmp_path / "run"
    run_dir.mkdir()
    args = ["--certs", str(certs.ca_cert.parent), "--superlink", "127.0.0.1:9091", "--listen", "127.0.0.1:9092"]

    done = run_fedlora("proxy", str(conf), *args, "--run-dir", str(run_dir), timeout=120)
    checked = subprocess.run([nginx, "-t", "-c", str(conf), "-e", "stderr"], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--superlink", "127.0.0.1"], "--superlink '127.0.0.1' is not HOST:PORT"),
        (["--superlink", "h:1", "--listen", "0.0.0.0:70000"], "--listen '0.0.0.0:70000' is not HOST:PORT"),
        (["--superlink", "h:1", "--max-body-mb", "0"], "--max-body-mb must be >= 1, got 0"),
        (["--superlink", "h:1", "--superlink-name", "a b"], "--superlink-name 'a b' is not a DNS name"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    done = run_fedlora("proxy", str(tmp_path / "nginx.conf"), "--certs", str(tmp_path), *args, timeout=120)

    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"fedlora proxy: error: {expected}")
    assert not (tmp_path / "nginx.conf").exists()


# --- a federation through the proxy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxiedRun:
    """What a one-round run through the proxy, and the Control API calls around it, left behind."""

    status: str
    server_log: str
    metrics_rounds: list[int]
    through_proxy: dict[str, str]
    """Control API call → the error ``flwr`` reported when it was sent to the proxy's port."""
    on_loopback: dict[str, Any]
    """Control API call → what it returned on the SuperLink's loopback port."""
    raw: dict[str, tuple[int, str]]
    """Request line sent to the proxy → (status, body)."""
    intruder: tuple[int | None, str]
    access_log: str
    leftover: set[int]


def _start_proxy(dep: Deployment, nginx: str) -> Address:
    """Write the proxy's config with ``fedlora proxy`` and start nginx on a free port; return where it listens."""
    listen = Address("127.0.0.1", free_port())
    conf, run_dir = dep.workdir / "proxy" / "nginx.conf", dep.workdir / "proxy"
    run_dir.mkdir(parents=True, exist_ok=True)
    written = run_fedlora(
        *("proxy", str(conf), "--certs", str(dep.certs.ca_cert.parent), "--superlink", dep.address),
        *("--listen", str(listen), "--run-dir", str(run_dir)),
        timeout=120,
    )
    assert written.returncode == 0, written.stderr
    proc = dep.spawn("nginx", [nginx, "-c", str(conf), "-e", "stderr", "-g", "daemon off;"])

    def accepting() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"nginx exited ({proc.popen.returncode}):\n{proc.log()}")
        try:
            socket.create_connection((listen.host, listen.port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_until(accepting, 30, f"nginx to accept connections on {listen}")
    return listen


def _raw_requests(listen: Address, ca_cert: Path) -> dict[str, tuple[int, str]]:
    """Send requests that are not the Fleet API (or try to sneak past it) straight to the proxy."""
    requests = [
        "GET /docs",
        "POST /v1/runtime/get-run",
        "POST /v1/fleet/../control/list-runs",
        "POST /v1/fleet/%2e%2e/control/list-runs",
        "GET /v1/fleet/pull-messages",
    ]
    answers = {}
    context = ssl.create_default_context(cafile=str(ca_cert))
    for line in requests:
        method, path = line.split()
        connection = http.client.HTTPSConnection(listen.host, listen.port, context=context, timeout=30)
        try:
            connection.request(method, path, body=b"" if method == "POST" else None)
            response = connection.getresponse()
            answers[line] = (response.status, response.read().decode(errors="replace"))
        finally:
            connection.close()
    return answers


def _control_calls(cli: FlwrCli, key: Path, run: bool) -> dict[str, Any]:
    """List runs, register ``key`` and (when ``run``) start a run; return each result or error message."""
    calls = {
        "list runs": lambda: cli.json("ls", cli.connection)["runs"],
        "register a key": lambda: cli.register(key),
        "start a run": lambda: cli.submit(PROJECT_DIR, 'num-rounds=1 model="tiny" task="tiny"'),
    }
    if not run:
        del calls["start a run"]
    results: dict[str, Any] = {}
    for name, call in calls.items():
        try:
            results[name] = call()
        except FlwrCliError as err:
            results[name] = err
    return results


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> ProxiedRun:
    nginx = nginx_binary()
    tmp = tmp_path_factory.mktemp("proxied-run")
    outputs = {"out-dir": str(tmp / "run"), "store": str(tmp / "fedlora.db")}
    with bounded(RUN_TIMEOUT_S + 300), Deployment(tmp / "deployment", nodes=len(RANKS) + 2) as dep:
        listen = _start_proxy(dep, nginx)
        proxy_cli = FlwrCli(tmp / "flwr-proxy")
        proxy_cli.configure(str(listen), dep.certs.ca_cert)
        through_proxy = _control_calls(proxy_cli, dep.certs.nodes[len(RANKS)].public, run=True)
        devices = []
        for index, (name, rank) in enumerate(RANKS.items()):
            dep.register(index)
            partition = ("--partition-id", str(index), "--num-partitions", str(len(RANKS)))
            args = dep.client_args(index, rank, "--name", name, *partition, superlink=str(listen))
            devices.append(dep.start_client(args, name=name))
        dep.wait_online(devices, timeout=300)
        # A device whose key was never registered tries to join through the proxy as the run starts.
        unregistered = dep.client_args(len(RANKS) + 1, 4, "--name", "intruder", superlink=str(listen))
        intruder = dep.start_client(
            [*unregistered, "--partition-id", "1", "--num-partitions", "2"], name="unregistered"
        )
        run_id = dep.run_app(PROJECT_DIR, {**RUN_CONFIG, **outputs})
        status = dep.wait_run(run_id, timeout=RUN_TIMEOUT_S)
        on_loopback = _control_calls(dep.cli, dep.certs.nodes[len(RANKS)].public, run=False)
        on_loopback["start a run"] = run_id
        raw = _raw_requests(listen, dep.certs.ca_cert)
        try:
            intruder_result: tuple[int | None, str] = (intruder.wait(INTRUDER_EXIT_S), intruder.log())
        except subprocess.TimeoutExpired:
            intruder_result = (None, intruder.log())
        server_log = dep.cli.run_log(run_id)
        started_here = dep.process_tree()
    try:
        wait_until(lambda: not any(running(pid) for pid in started_here), 30, "the deployment's processes to end")
    except TimeoutError:
        pass  # what is left is reported by test_every_process_the_test_started_is_gone
    metrics = Path(outputs["out-dir"]) / "metrics.json"
    return ProxiedRun(
        status=status,
        server_log=server_log,
        metrics_rounds=[row["round"] for row in json.loads(metrics.read_text())],
        through_proxy={name: str(result) for name, result in through_proxy.items()},
        on_loopback=on_loopback,
        raw=raw,
        intruder=intruder_result,
        access_log=(tmp / "deployment" / "proxy" / "access.log").read_text(),
        leftover={pid for pid in started_here if running(pid)},
    )


@pytest.mark.slow
def test_devices_ran_a_round_through_the_proxy(proxied: ProxiedRun) -> None:
    assert proxied.status == "finished:completed", proxied.server_log[-4000:]
    assert proxied.metrics_rounds == [0, 1]
    for node, rank in RANKS.items():
        assert f"({node}) trains at rank {rank}" in proxied.server_log
    fleet = re.findall(r'"POST (/v1/fleet/[a-z-]+) HTTP/1\.1" 200 ', proxied.access_log)
    assert {"/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/v1/fleet/push-messages"} <= set(fleet)


@pytest.mark.slow
@pytest.mark.parametrize("call", ["list runs", "register a key", "start a run"])
def test_control_api_calls_to_the_proxy_are_refused(proxied: ProxiedRun, call: str) -> None:
    assert "403 Forbidden" in proxied.through_proxy[call], proxied.through_proxy[call]
    assert "/v1/control/" in proxied.through_proxy[call]


@pytest.mark.slow
def test_the_same_calls_on_the_loopback_control_address_succeed(proxied: ProxiedRun) -> None:
    runs = proxied.on_loopback["list runs"]

    assert [int(run["run-id"]) for run in runs] == [proxied.on_loopback["start a run"]]  # only the loopback run
    assert isinstance(proxied.on_loopback["register a key"], int)  # the key the proxy refused to register


@pytest.mark.slow
def test_an_unregistered_key_is_refused_through_the_proxy(proxied: ProxiedRun) -> None:
    code, log = proxied.intruder

    assert code == 5, log[-2000:]  # fedlora client: the SuperLink refused the node key
    assert "refused" in log


@pytest.mark.slow
@pytest.mark.parametrize(
    "request_line",
    [
        "GET /docs",
        "POST /v1/runtime/get-run",
        "POST /v1/fleet/../control/list-runs",
        "POST /v1/fleet/%2e%2e/control/list-runs",
        "GET /v1/fleet/pull-messages",
    ],
)
def test_nothing_but_fleet_posts_passes_the_proxy(proxied: ProxiedRun, request_line: str) -> None:
    status, body = proxied.raw[request_line]

    assert status == 403, body
    if request_line != "GET /v1/fleet/pull-messages":  # limit_except answers with nginx's own 403 page
        assert body.strip() == REFUSAL


@pytest.mark.slow
def test_the_proxy_answered_everything_but_the_fleet_api_itself(proxied: ProxiedRun) -> None:
    requests = re.findall(r'"(GET|POST) (\S+) HTTP/1\.1" (\d{3}) ', proxied.access_log)
    refused = [(method, path) for method, path, status in requests if status == "403"]

    assert all(path.startswith(FLEET_PREFIX) for method, path, status in requests if status != "403")
    assert ("POST", "/v1/control/list-runs") in refused and ("POST", "/v1/control/register-node") in refused
    assert ("POST", "/v1/control/start-run") in refused


@pytest.mark.slow
def test_every_process_the_test_started_is_gone(proxied: ProxiedRun) -> None:
    assert proxied.leftover == set()
