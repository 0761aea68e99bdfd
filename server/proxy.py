"""The reverse proxy in front of the SuperLink: ``fedlora proxy OUT --certs DIR --superlink HOST:PORT``.

Flower 1.42's ``flower-superlink`` serves every API on its one HTTPS port (``--host/--port``): the Fleet API the
devices use, and the Control API (submit a run, register a node key, read logs), the Runtime API (ServerApps) and
FastAPI's ``/docs``, none of which authenticates its caller. A device that can reach that port can register a key of
its own or submit an app that runs as code on the coordinator. So the SuperLink listens on the coordinator's
loopback (or an internal network), and nginx listens where the devices connect::

    device ──TLS──► nginx :9092 ──TLS──► SuperLink 127.0.0.1:9091   only POST /v1/fleet/<one of FLEET_ROUTES>
                      └─ anything else: 403                           flwr / simulations.submit: 127.0.0.1:9091

``flower-supernode`` speaks protobuf over HTTPS/1.1 (httpx, no HTTP/2, no gRPC) to ``POST /v1/fleet/<rpc>``
(``flwr/supernode/fleet_http_client.py``), so plain ``proxy_pass`` of those routes is all it needs. Node
authentication survives the proxy: each request carries the node's public key, a signed timestamp and the signature
in ``flwr-*`` headers, which nginx passes on untouched and the SuperLink checks
(``flwr/superlink/routers/fleet/node_auth.py``). nginx presents the SuperLink's own certificate (``superlink.crt``, so
devices keep their ``ca.crt``) and verifies the SuperLink's certificate against ``ca.crt`` on the way in.

The file is a complete nginx main configuration: run it with ``nginx -c OUT -e stderr -g 'daemon off;'``. With
``--run-dir`` the pid file, logs and temporary files go there, so nginx runs as an unprivileged user.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FLEET_ROUTES: tuple[str, ...] = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
"""The Fleet API of Flower 1.42, under ``/v1/fleet/`` (``flwr/superlink/routers/fleet/router.py``); tests check it
against the installed SuperLink and SuperNode, so a Flower upgrade that adds a route fails loudly."""
FLEET_PREFIX = "/v1/fleet/"
UPSTREAM = "superlink_fleet"
DEFAULT_LISTEN = "0.0.0.0:9092"
DEFAULT_MAX_BODY_MB = 64
"""Flower sends arrays as objects of at most 5 MB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``); this leaves headroom."""
REFUSAL = "fedlora proxy: only the Fleet API is served on this port"
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})$")
_UNSAFE_IN_PATH = re.compile(r'["\\$\x00-\x1f]')


@dataclass(frozen=True)
class Address:
    """A ``HOST:PORT`` (an IPv6 host in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, option: str) -> Address:
        """Parse ``HOST:PORT``; raise ``ValueError`` naming ``option`` and the value when it is not one."""
        match = _ADDRESS.match(text)
        port = int(match["port"]) if match else 0
        if match is None or not 1 <= port <= 65535:
            raise ValueError(f"{option} {text!r} is not HOST:PORT (an IPv6 host in brackets, port 1-65535)")
        return cls(match["v6"] or match["host"], port)


@dataclass(frozen=True)
class ProxySettings:
    """What the nginx configuration needs; every path is as nginx will see it."""

    certs: Path
    """Folder holding ``ca.crt``, ``superlink.crt`` and ``superlink.key`` (``fedlora certs``)."""
    superlink: Address
    """Where nginx reaches the SuperLink's HTTPS port: its loopback or internal-network address."""
    listen: Address = Address.parse(DEFAULT_LISTEN, "--listen")
    """Where devices connect (the address the SuperLink certificate names)."""
    superlink_name: str | None = None
    """Name to verify the SuperLink's certificate for; None: the SuperLink's host, or ``localhost`` for an IP
    (nginx matches DNS names only, and ``fedlora certs`` always lists ``localhost``)."""
    run_dir: Path | None = None
    """Folder for the pid file, logs and temporary files (an unprivileged nginx); None: nginx's own defaults and
    logs on stderr/stdout (the official image)."""
    max_body_mb: int = DEFAULT_MAX_BODY_MB
    """Largest request a device may send, in MiB."""

    def __post_init__(self) -> None:
        for path in (self.certs, self.run_dir):
            if path is not None and _UNSAFE_IN_PATH.search(str(path)):
                raise ValueError(f"path {str(path)!r} holds a quote, backslash, '$' or control character")
        if self.superlink_name is not None and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", self.superlink_name):
            raise ValueError(f"--superlink-name {self.superlink_name!r} is not a DNS name")
        if self.max_body_mb < 1:
            raise ValueError(f"--max-body-mb must be >= 1, got {self.max_body_mb}")

    @property
    def tls_name(self) -> str:
        """The name nginx checks the SuperLink's certificate against."""
        if self.superlink_name is not None:
            return self.superlink_name
        try:
            ipaddress.ip_address(self.superlink.host)
        except ValueError:
            return self.superlink.host
        return "localhost"


def _quoted(path: Path) -> str:
    return f'"{path}"'


def _where_nginx_writes(settings: ProxySettings) -> tuple[list[str], list[str]]:
    """Main-level and ``http``-level lines for the pid file, logs and temporary files."""
    run = settings.run_dir
    if run is None:
        return ["error_log stderr notice;"], ["access_log /dev/stdout;"]
    main = [f"pid {_quoted(run / 'nginx.pid')};", f"error_log {_quoted(run / 'error.log')} notice;"]
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # each defaults to a root-owned /var/lib/nginx/...
    http = [f"access_log {_quoted(run / 'access.log')};"]
    return main, http + [f"{kind}_temp_path {_quoted(run / f'{kind}-temp')};" for kind in kinds]


def _fleet_locations() -> list[str]:
    """One exact location per Fleet route, each forwarding to its own canonical path.

    Exact matches on nginx's normalised URI, with the path spelled out in ``proxy_pass``, mean that what reaches
    the SuperLink is always one of these paths, whatever dot segments or escapes a client sent.
    """
    return [
        f"location = {FLEET_PREFIX}{route} {{ limit_except POST {{ deny all; }} "
        f"proxy_pass https://{UPSTREAM}{FLEET_PREFIX}{route}; }}"
        for route in FLEET_ROUTES
    ]


def render_nginx_conf(settings: ProxySettings) -> str:
    """Return the nginx main configuration that forwards only the Fleet API to the SuperLink."""
    main, http = _where_nginx_writes(settings)
    certs = settings.certs
    main_lines, http_lines = "\n".join(main), "\n    ".join(http)
    locations = "\n        ".join(_fleet_locations())
    return f"""# Written by `fedlora proxy` (server/proxy.py): TLS for the devices on {settings.listen}; only the
# Fleet API (POST {FLEET_PREFIX}...) goes on to the SuperLink at {settings.superlink}, so its Control and Runtime
# APIs stay out of the devices' reach. Run: nginx -c THIS_FILE -e stderr -g 'daemon off;'
worker_processes 1;
{main_lines}

events {{
    worker_connections 1024;
}}

http {{
    {http_lines}
    server_tokens off;

    upstream {UPSTREAM} {{
        server {settings.superlink};
        keepalive 8;
    }}

    server {{
        listen {settings.listen} ssl;
        ssl_certificate {_quoted(certs / "superlink.crt")};
        ssl_certificate_key {_quoted(certs / "superlink.key")};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {settings.max_body_mb}m;

        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_read_timeout 120s;
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_trusted_certificate {_quoted(certs / "ca.crt")};
        proxy_ssl_name {settings.tls_name};
        proxy_ssl_server_name on;
        proxy_ssl_session_reuse on;

        {locations}

        location / {{
            default_type text/plain;
            return 403 "{REFUSAL}\\n";
        }}
    }}
}}
"""


def write_nginx_conf(path: Path, settings: ProxySettings) -> Path:
    """Write ``render_nginx_conf(settings)`` to ``path`` (atomically, 0644); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_nginx_conf(settings), encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _absolute(path: Path) -> Path:
    """``path`` made absolute without resolving links: nginx would read a relative path from its own prefix."""
    return Path(os.path.abspath(path))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora proxy",
        description="Write an nginx configuration that terminates TLS for the devices and forwards only the Fleet "
        "API to the SuperLink, so its Control API stays on the coordinator.",
    )
    parser.add_argument("out", type=Path, help="nginx configuration file to write")
    parser.add_argument("--certs", type=Path, required=True, help="folder with ca.crt, superlink.crt, superlink.key")
    parser.add_argument(
        "--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's loopback or internal address"
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help=f"default {DEFAULT_LISTEN}")
    parser.add_argument("--superlink-name", metavar="NAME", help="name in the SuperLink's certificate to verify")
    parser.add_argument("--run-dir", type=Path, help="pid file, logs and temporary files here (unprivileged nginx)")
    parser.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY_MB, metavar="N", help="default 64")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fedlora proxy``; return 0 on success, 1 on a refused request, 2 on bad usage."""
    args = _parser().parse_args(argv)
    try:
        settings = ProxySettings(
            certs=_absolute(args.certs),
            superlink=Address.parse(args.superlink, "--superlink"),
            listen=Address.parse(args.listen, "--listen"),
            superlink_name=args.superlink_name,
            run_dir=None if args.run_dir is None else _absolute(args.run_dir),
            max_body_mb=args.max_body_mb,
        )
        if settings.run_dir is not None:
            settings.run_dir.mkdir(parents=True, exist_ok=True)  # nginx creates its temp folders, not this one
        path = write_nginx_conf(args.out, settings)
    except (ValueError, OSError) as err:
        print(f"fedlora proxy: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}: devices connect to {settings.listen}; only {FLEET_PREFIX}* reaches {settings.superlink}")
    print(f"start it with: nginx -c {_absolute(path)} -e stderr -g 'daemon off;'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
