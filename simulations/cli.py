"""The ``fedlora`` command: one entry point for every command a user types."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from common.extras import missing_extra

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError,
)  # fmt: skip


DELEGATED: dict[str, tuple[str, str]] = {
    "dashboard": ("server.dashboard.cli", "serve the coordinator dashboard over a run store"),
    "certs": ("server.certs", "create a CA, SuperLink certificate and node keys"),
    "proxy": ("server.proxy", "write the nginx config that lets devices reach only the SuperLink's Fleet API"),
    "client": ("client.device", "join a federation from this device (starts a SuperNode)"),
    "submit": ("simulations.submit", "submit a run to a SuperLink and wait for its final status"),
    "generate": ("client.adapter_tools:generate_main", "complete prompts with the base and the fine-tuned model"),
    "export": ("client.adapter_tools:export_main", "merge an exported adapter into its base model (--merge)"),
}
"""Commands whose own parser lives in another module (``module`` runs ``module.main``, ``module:function`` that
function); the rest of the command line is passed on untouched."""


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    """A handler that passes the remaining arguments to ``module.main(argv)`` (imported only when used)."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        name, _, function = module.partition(":")
        main: Callable[[list[str]], int] = getattr(importlib.import_module(name), function or "main")
        return main(list(args.rest))

    return handler


def build_parser() -> argparse.ArgumentParser:
    """The ``fedlora`` parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    from simulations import centralized, simulate  # the coordinator's extras; a device's commands are delegated

    simulate.add_parsers(subparsers)

    centralized.add_parser(subparsers)
    for name, (module, text) in DELEGATED.items():
        sub = subparsers.add_parser(name, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(handler=_delegate(module))
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ``fedlora`` command; expected errors become one line on stderr and exit code 2."""
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the SuperLink and everything under it is stopped on the way out.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:  # argparse's catch-all would drop a first word that looks like an option
            args = argparse.Namespace(handler=_delegate(DELEGATED[argv[0]][0]), rest=argv[1:])
        else:
            args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except ModuleNotFoundError as err:
        line = missing_extra(err, f"fedlora {argv[0] if argv else ''}".strip())
        if line is None:
            raise
        print(f"fedlora: error: {line}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
