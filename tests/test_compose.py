"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The Compose-spec schema check and ``docker-compose config`` need Debian's ``docker-compose`` package (its schema lives
in ``compose/config/compose_spec.json``); without it they are skipped. Everything else needs only PyYAML.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

from client.device_options import build_parser as device_parser
from server.dashboard.cli import TOKEN_ENV
from server.dashboard.cli import add_arguments as add_dashboard_arguments
from simulations.submit import build_parser as submit_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_SCHEMAS = [Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")]
DEFAULTS = {"FEDLORA_MODEL": "tiny", "FEDLORA_DATA": "tiny", "FEDLORA_RUN_CONFIG": ""}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else [str(word) for word in command]
    return [re.sub(r"\$\{(\w+):-[^}]*\}", lambda m: DEFAULTS[m.group(1)], word) for word in words]


def _flags(command: list[str]) -> dict[str, str]:
    pairs = (word.split("=", 1) for word in command if word.startswith("--"))
    return {pair[0]: (pair[1] if len(pair) > 1 else "") for pair in pairs}


def test_compose_file_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = next((path for path in COMPOSE_SCHEMAS if path.exists()), None)
    if schema_path is None:
        pytest.skip("Compose spec schema not found (apt-get install docker-compose)")

    schema = json.loads(schema_path.read_text())
    errors = [error.message for error in jsonschema.Draft201909Validator(schema).iter_errors(compose)]

    assert errors == []


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )

    assert done.returncode == 0, done.stderr


def test_every_image_but_the_proxy_is_built_by_the_repo_dockerfile(compose: dict[str, Any]) -> None:
    services = _services(compose)
    repo = {"context": ".", "dockerfile": "Dockerfile"}
    built = {service["image"] for service in services.values() if service.get("build") == repo}
    devices = {s["image"] for s in services.values() if s.get("build") == {**repo, "target": "device"}}

    assert DOCKERFILE.is_file() and re.search(r"^FROM base AS device$", DOCKERFILE.read_text(), re.MULTILINE)
    assert {services[f"supernode-{i}"]["image"] for i in (0, 1)} == devices == {"fedlora-device:latest"}
    assert all(service.get("image") in built | devices for name, service in services.items() if name != "proxy")
    assert re.fullmatch(r"nginx:\d+\.\d+", services["proxy"]["image"])  # the official image, a pinned release


def test_devices_reach_only_the_proxy_and_the_superlink_port_is_published_nowhere(compose: dict[str, Any]) -> None:
    services = _services(compose)
    proxy = services["proxy"]

    assert "ports" not in services["superlink"]
    assert _flags(_command(services["superlink"]))["--port"] == "9091"
    assert proxy["ports"] == ["9092:9092"] and set(proxy["networks"]) == {"coordinator", "devices"}
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    for name in ("supernode-0", "supernode-1"):
        assert services[name]["networks"] == ["devices"]  # superlink:9091 does not even resolve there
    for name in ("superlink", "register", "coordinator", "dashboard"):
        assert "devices" not in services[name]["networks"], name
    for name in ("register", "coordinator"):  # the Control API, on the coordinator's side
        assert _flags(_command(services[name]))["--superlink"] == "superlink:9091"


def test_dockerfile_is_python_slim_with_pinned_cpu_torch_and_no_secrets() -> None:
    text = DOCKERFILE.read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()

    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.MULTILINE)
    assert '"torch==${TORCH_VERSION}"' in text and "whl/cpu" in text
    assert not re.search(r"^(COPY|ADD)\b.*\b(certs|\.key|\.crt)\b", text, re.MULTILINE)
    assert {"certs/", "**/*.key"} <= set(ignored)


def test_superlink_runs_with_tls_and_node_authentication(compose: dict[str, Any]) -> None:
    superlink = _services(compose)["superlink"]
    command = _command(superlink)

    args = _parse_args_run_superlink().parse_args(command[1:])  # flags as flower-superlink 1.42 parses them

    assert command[0] == "flower-superlink"
    assert args.enable_supernode_auth and not args.insecure
    assert (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile) == (
        "/certs/ca.crt",
        "/certs/superlink.crt",
        "/certs/superlink.key",
    )
    assert "--insecure" not in json.dumps(compose)


def test_two_supernodes_with_ranks_2_and_8_on_different_partitions(compose: dict[str, Any]) -> None:
    nodes = [s for s in _services(compose).values() if _command(s)[:3] == ["python", "-m", "client.device"]]

    parsed = [device_parser().parse_args(_command(node)[3:]) for node in nodes]

    assert sorted(args.rank for args in parsed) == ["2", "8"]
    assert sorted(args.partition_id for args in parsed) == [0, 1]
    assert {args.num_partitions for args in parsed} == {2}
    assert {args.superlink for args in parsed} == {"proxy:9092"}
    assert len({str(args.key) for args in parsed}) == 1  # each mounts its own key file at the same path
    keys = [v for node in nodes for v in node["volumes"] if v.endswith(":/certs/node.key:ro")]
    assert sorted(keys) == ["./certs/node-0.key:/certs/node.key:ro", "./certs/node-1.key:/certs/node.key:ro"]


def test_certificates_are_mounted_read_only_and_outputs_use_a_named_volume(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if target.startswith("/certs/"):
                assert source.startswith("./certs/") and mode == ["ro"], (name, volume)

    superlink = _services(compose)["superlink"]
    assert "outputs:/outputs" in superlink["volumes"] and superlink["working_dir"] == "/outputs"
    assert "outputs" in compose["volumes"]


def test_nodes_start_after_registration_and_the_coordinator_submits_the_app(compose: dict[str, Any]) -> None:
    services = _services(compose)
    register = submit_parser().parse_args(_command(services["register"])[3:])
    coordinator = submit_parser().parse_args(_command(services["coordinator"])[3:])

    assert [p.name for p in register.register] == ["node-0.pub", "node-1.pub"] and register.app is None
    assert coordinator.app == Path("/app") and coordinator.min_nodes == 2
    for name in ("supernode-0", "supernode-1", "coordinator"):
        assert services[name]["depends_on"]["register"]["condition"] == "service_completed_successfully"
    assert services["register"]["depends_on"]["superlink"]["condition"] == "service_healthy"


def _coordinator_run_config(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    coordinator = submit_parser().parse_args(_command(services["coordinator"])[3:])
    return dict(parse_config_args([part for part in coordinator.run_config if part]))


def test_the_coordinator_passes_only_run_config_keys_the_app_declares(compose: dict[str, Any]) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    overrides = _coordinator_run_config(_services(compose))

    assert set(overrides) <= set(declared)  # the SuperLink refuses a run with an unknown key
    assert (overrides["model"], overrides["task"]) == (DEFAULTS["FEDLORA_MODEL"], DEFAULTS["FEDLORA_DATA"])


def test_the_dashboard_serves_the_run_store_with_a_token_from_the_environment(compose: dict[str, Any]) -> None:
    services = _services(compose)
    dashboard = services["dashboard"]
    parser = argparse.ArgumentParser()
    add_dashboard_arguments(parser)

    command = _command(dashboard)
    args = parser.parse_args(command[3:])

    assert command[:3] == ["python", "-m", "server.dashboard"]  # `fedlora dashboard`
    assert (args.db, args.host, args.port) == (Path("/outputs/fedlora.db"), "0.0.0.0", 8050)
    assert str(args.db) == _coordinator_run_config(services)["store"]  # the store the ServerApp writes
    assert "outputs:/outputs" in dashboard["volumes"] and "8050:8050" in dashboard["ports"]
    assert dashboard["environment"] == {TOKEN_ENV: f"${{{TOKEN_ENV}:-}}"}  # never a token in the file
    assert "--token" not in " ".join(command)
