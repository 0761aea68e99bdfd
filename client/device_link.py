"""How a device's connection to the SuperLink fails, and the one line that tells the user why.

Two sources, both measured against flower-superlink/flower-supernode 1.42:

- ``probe_superlink`` opens a TCP connection and a TLS handshake with the device's CA certificate before a SuperNode
  is started. It tells "not reachable" (refused, timed out, unknown host: worth retrying) from "reachable but the
  certificate is wrong" (not signed by this CA, or not valid for this host name: retrying cannot help).
- ``classify_supernode_exit`` reads how ``flower-supernode`` ended. On any failure to connect it exits with status 1
  after logging ``Exit Code: 305`` and ``Failed to initialize the connection to the SuperLink.`` followed by the cause:
  ``[code: 2004] Failed to activate SuperNode.`` when the SuperLink does not know the node's public key (or a
  SuperNode with that key is already online), ``[SSL: CERTIFICATE_VERIFY_FAILED] ...`` for a certificate it cannot
  verify, ``[Errno 111] Connection refused`` when nothing listens. A SuperNode the SuperLink stops recognising later
  (HTTP 401, e.g. after ``flwr supernode unregister``) sends itself SIGINT and exits with status 0.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography import x509

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
_API_CODE = re.compile(r"\[code: (\d+)\]\s*(.*)")
_UNREACHABLE_HINTS = ("connection refused", "errno", "timed out", "name or service not known", "unreachable")
_TLS_HINTS = ("certificate", "ssl", "tls")
_NODE_REFUSED = {2001, 2004}
"""Fleet API codes: 2001 registration through the Fleet API disabled (no key sent), 2004 activation failed."""


class FailureKind(Enum):
    """Why a SuperNode could not serve; ``retry`` says whether waiting can help."""

    UNREACHABLE = "unreachable"
    CERTIFICATE = "certificate"
    NODE_REFUSED = "node refused"
    FAILED = "failed"

    @property
    def retry(self) -> bool:
        """Whether trying again later can succeed without a change on this device."""
        return self is FailureKind.UNREACHABLE


@dataclass(frozen=True)
class Failure:
    """A classified failure and its one-line explanation."""

    kind: FailureKind
    message: str


def plain(line: str) -> str:
    """Return a log line without ANSI colour codes and surrounding whitespace."""
    return _ANSI.sub("", line).strip()


def probe_superlink(host: str, port: int, root_cert: Path, timeout: float = 10.0) -> Failure | None:
    """Connect to ``host:port`` and verify its TLS certificate against ``root_cert``; return what failed, or None.

    Parameters
    ----------
    host, port : str, int
        The SuperLink address as the SuperNode will use it (the certificate must be valid for ``host``).
    root_cert : Path
        PEM CA certificate (bundle) the SuperNode is given with ``--root-certificates``.
    timeout : float
        Seconds allowed for the TCP connect and for the handshake.

    Returns
    -------
    Failure | None
        ``UNREACHABLE`` or ``CERTIFICATE`` failure, or None when the handshake succeeded.
    """
    context = ssl.create_default_context(cafile=str(root_cert))
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as err:
        return Failure(FailureKind.CERTIFICATE, _verify_message(err, host, port, root_cert, timeout))
    except ssl.SSLError as err:
        reason = err.reason or str(err)
        return Failure(FailureKind.CERTIFICATE, f"TLS handshake with {where} failed ({reason}); is it a TLS SuperLink?")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return Failure(FailureKind.UNREACHABLE, f"cannot reach the SuperLink at {where} ({reason})")


def _verify_message(err: ssl.SSLCertVerificationError, host: str, port: int, root_cert: Path, timeout: float) -> str:
    where = f"{host}:{port}"
    detail = err.verify_message or str(err)
    if "mismatch" in detail or "doesn't match" in detail:
        names = presented_names(host, port, timeout)
        return (
            f"the SuperLink certificate at {where} is not valid for {host!r} (it names {names}); "
            f"connect by one of those names or re-issue it: fedlora certs DIR --host {host} --force"
        )
    return (
        f"the SuperLink certificate at {where} is not signed by {root_cert} ({detail}); "
        "use the ca.crt that signed the SuperLink's certificate"
    )


def presented_names(host: str, port: int, timeout: float = 10.0) -> list[str]:
    """Return the SAN names of the certificate ``host:port`` presents, fetched without verifying it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except OSError:
        return []
    if der is None:
        return []
    try:
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san.value]


def classify_supernode_exit(returncode: int, lines: Sequence[str], key: Path, stopping: bool) -> Failure | None:
    """Map how ``flower-supernode`` ended to a failure, or None for a requested or clean stop.

    Parameters
    ----------
    returncode : int
        Its exit status (negative: killed by that signal).
    lines : Sequence[str]
        The last lines it logged (ANSI colours allowed).
    key : Path
        The node's private key, named in the message when the SuperLink refuses it.
    stopping : bool
        Whether this side asked it to stop (then any ending is a clean stop).

    Returns
    -------
    Failure | None
        The classified failure, or None.
    """
    if stopping:
        return None
    text = [plain(line) for line in lines]
    if returncode == 0:
        return Failure(
            FailureKind.NODE_REFUSED,
            "flower-supernode stopped by itself; the SuperLink stopped recognising this node "
            "(was it unregistered with `flwr supernode unregister`?)",
        )
    if returncode < 0:
        return Failure(FailureKind.FAILED, f"flower-supernode was killed by signal {-returncode}")
    code = _flower_exit_code(text)
    if code == 305:
        return _connection_failure(text, key)
    cause = _line_after(text, "Exit Code:") or (text[-1] if text else "no output")
    label = f"Flower exit code {code}" if code is not None else f"status {returncode}"
    return Failure(FailureKind.FAILED, f"flower-supernode failed ({label}): {cause}")


def _flower_exit_code(text: Sequence[str]) -> int | None:
    for line in reversed(text):
        if match := _EXIT_CODE.search(line):
            return int(match.group(1))
    return None


def _line_after(text: Sequence[str], marker: str) -> str | None:
    for index, line in enumerate(text):
        if marker in line and index + 1 < len(text):
            return text[index + 1]
    return None


def _connection_failure(text: Sequence[str], key: Path) -> Failure:
    cause = _line_after(text, "Failed to initialize the connection to the SuperLink.") or ""
    if (match := _API_CODE.search(cause)) and int(match.group(1)) in _NODE_REFUSED:
        public = key.with_suffix(".pub")
        return Failure(
            FailureKind.NODE_REFUSED,
            f"the SuperLink refused node key {key} ([code: {match.group(1)}] {match.group(2)}): register its public "
            f"key on the coordinator (flwr supernode register {public.name}), or stop the SuperNode that is already "
            "online with this key",
        )
    lowered = cause.lower()
    if any(hint in lowered for hint in _TLS_HINTS):
        return Failure(FailureKind.CERTIFICATE, f"TLS certificate check failed: {cause}")
    if any(hint in lowered for hint in _UNREACHABLE_HINTS):
        return Failure(FailureKind.UNREACHABLE, f"cannot reach the SuperLink ({cause})")
    return Failure(FailureKind.FAILED, f"flower-supernode could not connect to the SuperLink: {cause or 'no cause'}")
