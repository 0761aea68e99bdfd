"""``fedlora dashboard [--db PATH] [--host 127.0.0.1] [--port 8050] [--token T]``: serve the dashboard."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_DB = Path("runs/fedlora.db")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
TOKEN_ENV = "FEDLORA_DASHBOARD_TOKEN"
DESCRIPTION = "Serve the read-only web dashboard (pages and JSON API) over a fedlora run store."


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The dashboard's options, for a standalone parser or the ``fedlora dashboard`` subcommand."""
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"run store to read (default: {DEFAULT_DB})")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"require this token (Bearer header or ?token=); needed to bind a non-loopback host (env: {TOKEN_ENV})",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dashboard`` on a ``fedlora`` subparsers object; dispatch with ``args.func(args)``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dashboard", help="serve the read-only web dashboard over a run store", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; refuse a non-loopback host without a token (exit status 2)."""
    import uvicorn

    from server.dashboard.app import create_app

    if not is_loopback(args.host) and not args.token:
        print(
            f"fedlora dashboard: refusing to bind {args.host} without a token; pass --token or set {TOKEN_ENV}",
            file=sys.stderr,
        )
        return 2
    if not 0 < args.port < 65536:
        print(f"fedlora dashboard: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if not args.db.is_file():
        print(f"fedlora dashboard: no run store at {args.db} yet; pages will say so until one appears", file=sys.stderr)
    print(f"fedlora dashboard: http://{args.host}:{args.port}/ (run store: {args.db})", flush=True)
    # With a token, access logs would record ?token= query strings.
    uvicorn.run(create_app(args.db, token=args.token), host=args.host, port=args.port, access_log=not args.token)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m server.dashboard``."""
    parser = argparse.ArgumentParser(prog="fedlora dashboard", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
