"""Command-line options of ``fedlora client``, validated at the boundary, and the node config they become."""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

MAX_RANK = 1024
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})$")
_PRESET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONFIG_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


class UsageError(Exception):
    """An invalid argument; the message is the one line shown to the user."""


@dataclass(frozen=True)
class DeviceOptions:
    """Validated ``fedlora client`` options; paths are absolute."""

    host: str
    """SuperLink host name or IP (no brackets)."""
    port: int
    """SuperLink port (its Fleet API, served with the Control and Runtime APIs on one HTTPS port)."""
    root_cert: Path
    """PEM CA certificate that signed the SuperLink's certificate."""
    key: Path
    """This node's OpenSSH EC private key, registered on the SuperLink with ``flwr supernode register``."""
    data: str
    """A packaged task name, or an absolute path to a JSONL/CSV file with ``text`` and ``label`` columns."""
    model: str
    """A model preset name, or an absolute path to a local Hugging Face model folder."""
    rank: int | None
    """LoRA rank, or None for ``auto``."""
    name: str
    """Display name of the node (default: the key file's stem)."""
    partition_id: int | None
    """Which share of a packaged task this node holds (with ``num_partitions``)."""
    num_partitions: int | None
    """Into how many shares the packaged task is split."""
    state_dir: Path | None
    """Folder for the node's persistent state (created if missing)."""
    connect_timeout: float
    """Seconds to keep retrying while the SuperLink is unreachable."""
    runtime_port: int | None
    """Local port of the SuperNode's Runtime API (None: a free one)."""
    threads: int | None = None
    """CPU threads for the node's training (``OMP_NUM_THREADS``); None: torch's default, every core."""
    warm: bool = True
    """Keep the model and data in this process across messages (:mod:`client.warm`); ``--cold`` turns it off."""
    prompt_window: float = 10.0
    """Seconds after each reply in which the SuperNode asks for the next message every 0.2 s instead of 3 s
    (:mod:`client.supernode_poll`); 0 runs Flower's SuperNode as it is."""

    @property
    def superlink(self) -> str:
        """``HOST:PORT`` as flower-supernode wants it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def node_config(
        self, rank: int, auto_rank: str = "", extra: Mapping[str, str] | None = None
    ) -> dict[str, int | str]:
        """Return the node-config (kebab-case keys) the ClientApp reads, for LoRA rank ``rank`` (``auto_rank``: what
        ``--rank auto`` measured, :class:`client.device_memory.AutoRank` as JSON, so each run chooses again; ``extra``:
        the warm node's entries, :meth:`client.warm.WarmNode.node_config`)."""
        config: dict[str, int | str] = {
            "lora-rank": rank,
            "model": self.model,
            "data": self.data,
            "node-name": self.name,
        }
        if self.partition_id is not None and self.num_partitions is not None:
            config["partition-id"] = self.partition_id
            config["num-partitions"] = self.num_partitions
        if self.state_dir is not None:
            config["state-dir"] = str(self.state_dir)
        if auto_rank:
            config["auto-rank"] = auto_rank
        return config | dict(extra or {})


def node_config_string(config: Mapping[str, int | str]) -> str:
    """Return ``config`` as flower-supernode's ``--node-config`` value: ``key=value`` pairs, strings quoted.

    Flower reads each pair as a TOML ``key = value`` line, and its pair pattern does not allow a string to contain
    its own quote character: strings go in TOML literal quotes ``'...'`` (no escapes, so Windows paths survive), or
    in ``"..."`` when they contain ``'``; a string with both quotes or a line break is refused.
    """
    pairs = []
    for key, value in config.items():
        if not _CONFIG_KEY.match(key):
            raise UsageError(f"node-config key {key!r} must be kebab-case")
        pairs.append(f"{key}={value if isinstance(value, int) else _toml_string(key, value)}")
    return " ".join(pairs)


def _toml_string(key: str, value: str) -> str:
    if "\n" in value or "\r" in value or ("'" in value and '"' in value):
        raise UsageError(f"{key} {value!r} cannot be passed to flower-supernode (line break, or both quote kinds)")
    if "'" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\")
    return f'"{escaped}"'


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedlora client`` argument parser (its errors raise ``UsageError`` instead of exiting)."""
    parser = _Parser(prog="fedlora client", description="Join a fedlora federation from this device.")
    add = parser.add_argument
    add("--superlink", required=True, metavar="HOST:PORT", help="SuperLink address, e.g. 192.168.1.10:9092")
    add("--root-cert", required=True, type=Path, metavar="CA.CRT", help="CA certificate that signed the SuperLink's")
    add("--key", required=True, type=Path, metavar="NODE.KEY", help="this node's private key (fedlora certs)")
    add(
        "--data",
        required=True,
        metavar="PATH|TASK",
        help=(
            "local file or a task name: JSONL/CSV (text, label) for a classifier; "
            "JSONL (prompt/response, messages or text) or .txt for a causal LM"
        ),
    )
    add("--model", required=True, metavar="PATH|PRESET", help="local Hugging Face model folder or a preset name")
    add("--rank", required=True, metavar="auto|N", help="LoRA rank, or 'auto' to pick it from free memory")
    add("--name", help="display name (default: the key file's name without .key)")
    add("--partition-id", type=int, metavar="I", help="share of a packaged task this node holds (0-based)")
    add("--num-partitions", type=int, metavar="N", help="number of shares the packaged task is split into")
    add("--state-dir", type=Path, metavar="DIR", help="folder for the node's persistent state")
    add("--connect-timeout", type=float, default=600.0, metavar="S", help="retry an unreachable SuperLink for S s")
    add("--runtime-port", type=int, metavar="P", help="local port of the SuperNode Runtime API (default: a free one)")
    add("--threads", type=int, metavar="N", help="CPU threads for training (default: every core)")
    add(
        "--cold",
        action="store_true",
        help="no warm node: every message loads the model and data again in a fresh process (slower; to compare)",
    )
    add(
        "--prompt-window",
        type=float,
        default=10.0,
        metavar="S",
        help="for S seconds after each reply, ask for the next message every 0.2 s instead of Flower's 3 s "
        "(default 10; 0: Flower's SuperNode as it is)",
    )
    return parser


def parse_options(argv: list[str] | None) -> DeviceOptions:
    """Parse and validate ``fedlora client`` arguments.

    Raises
    ------
    UsageError
        Naming the first invalid argument and its value, in one line.
    """
    args = build_parser().parse_args(argv)
    host, port = parse_host_port(args.superlink)
    partition_id, num_partitions = _check_partition(args.partition_id, args.num_partitions)
    if not args.connect_timeout > 0:
        raise UsageError(f"--connect-timeout must be > 0 seconds, got {args.connect_timeout}")
    if args.runtime_port is not None and not 1 <= args.runtime_port <= 65535:
        raise UsageError(f"--runtime-port must be in 1..65535, got {args.runtime_port}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if not 0.0 <= args.prompt_window < float("inf"):
        raise UsageError(f"--prompt-window must be a number of seconds >= 0, got {args.prompt_window}")
    key = check_node_key(args.key)
    return DeviceOptions(
        host=host,
        port=port,
        root_cert=check_root_cert(args.root_cert),
        key=key,
        data=_path_or_preset("--data", args.data, want_dir=False),
        model=_path_or_preset("--model", args.model, want_dir=True),
        rank=parse_rank(args.rank),
        name=args.name if args.name else key.stem,
        partition_id=partition_id,
        num_partitions=num_partitions,
        state_dir=_state_dir(args.state_dir),
        connect_timeout=args.connect_timeout,
        runtime_port=args.runtime_port,
        threads=args.threads,
        warm=not args.cold,
        prompt_window=args.prompt_window,
    )


def parse_host_port(value: str) -> tuple[str, int]:
    """Return ``(host, port)`` from ``HOST:PORT`` or ``[IPv6]:PORT``; raise ``UsageError`` naming the value."""
    hint = "e.g. 192.168.1.10:9092, superlink.example.org:9092 or [::1]:9092"
    if "://" in value:
        raise UsageError(f"--superlink takes HOST:PORT without a scheme ({hint}), got {value!r}")
    match = _HOST_PORT.match(value)
    if not match:
        raise UsageError(f"--superlink must be HOST:PORT ({hint}), got {value!r}")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise UsageError(f"--superlink port must be in 1..65535, got {value!r}")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError as err:
            raise UsageError(f"--superlink {value!r}: {match['v6']!r} is not an IPv6 address") from err
        return match["v6"], port
    return match["host"], port


def parse_rank(value: str) -> int | None:
    """Return the rank from ``auto`` (None) or a positive integer up to ``MAX_RANK``."""
    if value.strip().lower() == "auto":
        return None
    try:
        rank = int(value)
    except ValueError:
        rank = 0
    if not 1 <= rank <= MAX_RANK:
        raise UsageError(f"--rank must be 'auto' or an integer in 1..{MAX_RANK}, got {value!r}")
    return rank


def check_root_cert(path: Path) -> Path:
    """Return ``path`` made absolute if it holds at least one PEM certificate; raise ``UsageError`` otherwise."""
    data = _read("--root-cert", path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise UsageError(f"--root-cert {path} is not a PEM certificate ({err})") from err
    return path.resolve()


def check_node_key(path: Path) -> Path:
    """Return ``path`` made absolute if it holds an unencrypted OpenSSH EC private key (what flower-supernode loads)."""
    data = _read("--key", path)
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise UsageError(f"--key {path} is not an unencrypted OpenSSH private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"--key {path} is a {type(key).__name__}; flower-supernode needs an EC (NIST P-384) key")
    return path.resolve()


def _read(option: str, path: Path) -> bytes:
    if not path.exists():
        raise UsageError(f"{option} {path}: file not found")
    if not path.is_file():
        raise UsageError(f"{option} {path}: not a file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"{option} {path}: {err.strerror}") from err


def _path_or_preset(option: str, value: str, want_dir: bool) -> str:
    """Return a preset name as is, or a path made absolute (the ClientApp runs in another working directory)."""
    looks_like_path = any(sep in value for sep in ("/", "\\")) or value.startswith((".", "~"))
    path = Path(value).expanduser()
    if not looks_like_path and not path.exists():
        if not _PRESET.match(value):
            raise UsageError(f"{option} {value!r} is neither an existing path nor a preset name")
        return value
    if not path.exists():
        raise UsageError(f"{option} {value}: not found")
    if want_dir and not path.is_dir():
        raise UsageError(f"{option} {value}: expected a model folder (config.json, weights), got a file")
    if not want_dir and not path.is_file():
        raise UsageError(f"{option} {value}: expected a data file (.jsonl, .csv, .txt), got a folder")
    return str(path.resolve())


def _check_partition(partition_id: int | None, num_partitions: int | None) -> tuple[int | None, int | None]:
    if (partition_id is None) != (num_partitions is None):
        raise UsageError("--partition-id and --num-partitions go together")
    if partition_id is None or num_partitions is None:
        return None, None
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise UsageError(f"need 0 <= --partition-id < --num-partitions, got {partition_id} and {num_partitions}")
    return partition_id, num_partitions


def _state_dir(path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--state-dir {path}: {err.strerror}") from err
    return path
