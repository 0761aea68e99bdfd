"""Certificates and node keys for a deployed federation: ``fedlora certs DIR [--host H ...] [--nodes N]``.

One folder holds everything a small federation needs::

    DIR/ca.crt           CA certificate          → every SuperNode (``--root-certificates``) and the ``flwr`` CLI
    DIR/ca.key   (0600)  CA private key          → stays with the operator; signs superlink.crt
    DIR/superlink.crt    SuperLink certificate   → flower-superlink ``--ssl-certfile`` (SANs: hosts it is reached at)
    DIR/superlink.key (0600)                     → flower-superlink ``--ssl-keyfile``
    DIR/node-I.key (0600) node I's private key   → that device only (``--auth-supernode-private-key``)
    DIR/node-I.pub       node I's public key     → ``flwr supernode register DIR/node-I.pub`` on the coordinator

Keys are ECDSA on NIST P-384 (SECP384R1), the curve Flower's own docs generate (``ssh-keygen -t ecdsa -b 384``);
``flower-supernode`` loads the node key with ``load_ssh_private_key`` (OpenSSH format, EC only) and ``flwr supernode
register`` accepts an OpenSSH ``ecdsa-sha2-nistp384`` public key on any NIST curve.

Re-running is safe: a file that exists is kept (and listed as ``kept``), only missing files are created, so
``--nodes 5`` after ``--nodes 2`` adds nodes 2..4 without touching anything else. An existing SuperLink certificate
whose SANs miss a requested host is an error, not a silent re-issue. ``--force`` re-creates every file this command
writes (new CA, so every device needs the new ``ca.crt``; new node keys, so each must be registered again).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
"""Always in the SuperLink certificate, so a local test works whatever else is listed."""
CURVE = ec.SECP384R1
CA_DAYS = 3650
SERVER_DAYS = 825
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertsError(Exception):
    """A request ``fedlora certs`` refuses; the message is one line for the user."""


@dataclass(frozen=True)
class NodeKeyPaths:
    """The two files of one node's authentication key pair."""

    private: Path
    """OpenSSH private key for ``flower-supernode --auth-supernode-private-key``."""
    public: Path
    """OpenSSH public key for ``flwr supernode register``."""


@dataclass(frozen=True)
class CertPaths:
    """Where ``create_certs`` put (or found) each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: tuple[NodeKeyPaths, ...]


def cert_paths(out_dir: Path, nodes: int) -> CertPaths:
    """Return the file layout of ``out_dir`` for ``nodes`` node key pairs (nothing is read or written)."""
    node_paths = tuple(NodeKeyPaths(out_dir / f"node-{i}.key", out_dir / f"node-{i}.pub") for i in range(nodes))
    return CertPaths(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "superlink.crt",
        server_key=out_dir / "superlink.key",
        nodes=node_paths,
    )


def parse_san(host: str) -> x509.GeneralName:
    """Return the subject alternative name for ``host``: an IPAddress for an IP, else a DNSName.

    Raises
    ------
    CertsError
        If ``host`` is neither an IP address nor a valid DNS name (an optional leading ``*.`` is allowed).
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if not host or len(host) > 253 or not labels or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertsError(f"--host {host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(host.rstrip("."))


def san_hosts(cert: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses a certificate is valid for, as strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def generate_ca(
    common_name: str = "fedlora CA", days: int = CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a new self-signed CA key and certificate (P-384, SHA-384, may sign leaf certificates only)."""
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a new SuperLink key and a certificate signed by the CA, valid for every host in ``hosts``."""
    if not hosts:
        raise CertsError("the SuperLink certificate needs at least one host")
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([parse_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def node_key_bytes(key: ec.EllipticCurvePrivateKey, comment: str) -> tuple[bytes, bytes]:
    """Return ``(private, public)`` of a node key in OpenSSH format, the public line ending in ``comment``."""
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def write_file(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600 (``private``) or 0644.

    The file is created with its final mode (never briefly world-readable). Without ``overwrite`` it is created
    exclusively, so an existing file raises ``CertsError``; with it, a temporary file replaces the old one.
    """
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.tmp") if overwrite else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if overwrite:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError as err:
        raise CertsError(f"{path} already exists; refusing to overwrite it (pass --force to re-create)") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed the mode given to os.open
    if overwrite:
        os.replace(tmp, path)


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return an unencrypted PKCS#8 PEM private key (what flower-superlink ``--ssl-keyfile`` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_certificate(cert: x509.Certificate) -> bytes:
    """Return a certificate in PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(paths: CertPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{paths.ca_key} is not an EC private key")
    return key, x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())


def _ensure_ca(paths: CertPaths, force: bool, report: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    have_cert, have_key = paths.ca_cert.exists(), paths.ca_key.exists()
    if not force and have_cert and have_key:
        report.append(f"kept     {paths.ca_cert} (and ca.key)")
        return _load_ca(paths)
    if not force and (have_cert or have_key):
        present, missing = (paths.ca_cert, paths.ca_key) if have_cert else (paths.ca_key, paths.ca_cert)
        raise CertsError(f"{present} exists but {missing} is missing; restore it, or pass --force to start a new CA")
    key, cert = generate_ca()
    write_file(paths.ca_key, pem_private_key(key), private=True, overwrite=force)
    write_file(paths.ca_cert, pem_certificate(cert), private=False, overwrite=force)
    report.append(f"created  {paths.ca_cert} (and ca.key, 0600)")
    return key, cert


def _ensure_server(
    paths: CertPaths,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    hosts: Sequence[str],
    force: bool,
    report: list[str],
) -> None:
    have_cert, have_key = paths.server_cert.exists(), paths.server_key.exists()
    if not force and have_cert and have_key:
        _check_server_cert(paths, ca[1], hosts)
        report.append(f"kept     {paths.server_cert} (and superlink.key)")
        return
    if not force and (have_cert or have_key):
        present = paths.server_cert if have_cert else paths.server_key
        raise CertsError(f"{present} exists without its pair; remove it or pass --force to re-issue both")
    key, cert = issue_server_certificate(*ca, hosts)
    write_file(paths.server_key, pem_private_key(key), private=True, overwrite=force)
    write_file(paths.server_cert, pem_certificate(cert), private=False, overwrite=force)
    report.append(f"created  {paths.server_cert} (and superlink.key, 0600; SANs: {', '.join(hosts)})")


def _check_server_cert(paths: CertPaths, ca_cert: x509.Certificate, hosts: Sequence[str]) -> None:
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertsError(f"{paths.server_cert} was not issued by {paths.ca_cert}; pass --force to re-issue it") from err
    have = san_hosts(cert)
    missing = [h for h in hosts if str(parse_san(h).value) not in have]
    if missing:
        raise CertsError(f"{paths.server_cert} exists with SANs {have}, missing {missing}; pass --force to re-issue it")


def _ensure_node(index: int, node: NodeKeyPaths, force: bool, report: list[str]) -> None:
    if not force and node.private.exists():
        if not node.public.exists():
            key = serialization.load_ssh_private_key(node.private.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CertsError(f"{node.private} is not an EC key")
            write_file(node.public, node_key_bytes(key, f"fedlora-node-{index}")[1], private=False, overwrite=False)
            report.append(f"created  {node.public} (from the existing {node.private.name})")
        else:
            report.append(f"kept     {node.private} (and {node.public.name})")
        return
    if not force and node.public.exists():
        raise CertsError(f"{node.public} exists without its private key {node.private.name}; remove it or pass --force")
    private, public = node_key_bytes(ec.generate_private_key(CURVE()), f"fedlora-node-{index}")
    write_file(node.private, private, private=True, overwrite=force)
    write_file(node.public, public, private=False, overwrite=force)
    report.append(f"created  {node.private} (0600) and {node.public.name}")


def create_certs(
    out_dir: Path, hosts: Sequence[str] = (), nodes: int = 2, force: bool = False
) -> tuple[CertPaths, list[str]]:
    """Create whatever of the CA, SuperLink certificate and node keys is missing in ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Folder to write to (created if missing).
    hosts : Sequence[str]
        Extra names or IPs the SuperLink is reached at; ``DEFAULT_HOSTS`` are always included.
    nodes : int
        Number of node key pairs ``node-0`` .. ``node-{nodes-1}``.
    force : bool
        Re-create every file instead of keeping existing ones.

    Returns
    -------
    tuple[CertPaths, list[str]]
        The file layout and one ``created``/``kept`` line per item.

    Raises
    ------
    CertsError
        On an invalid host, a negative node count, or existing files that cannot be kept consistently.
    """
    if nodes < 0:
        raise CertsError(f"--nodes must be >= 0, got {nodes}")
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    for host in all_hosts:
        parse_san(host)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = cert_paths(out_dir, nodes)
    report: list[str] = []
    ca = _ensure_ca(paths, force, report)
    _ensure_server(paths, ca, all_hosts, force, report)
    for index, node in enumerate(paths.nodes):
        _ensure_node(index, node, force, report)
    return paths, report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora certs",
        description="Create a CA, a SuperLink TLS certificate and SuperNode authentication keys. "
        "Existing files are kept; only missing ones are created (--force re-creates all).",
    )
    parser.add_argument("dir", type=Path, help="output folder")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="H",
        help="a DNS name or IP the SuperLink is reached at (repeatable); 127.0.0.1 and localhost are always included",
    )
    parser.add_argument("--nodes", type=int, default=2, metavar="N", help="node key pairs to create (default 2)")
    parser.add_argument("--force", action="store_true", help="re-create every file (devices need the new ca.crt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fedlora certs``; return 0 on success, 1 on a refused request, 2 on bad usage."""
    args = _parser().parse_args(argv)
    try:
        paths, report = create_certs(args.dir, args.host, args.nodes, args.force)
    except (CertsError, OSError, ValueError) as err:
        print(f"fedlora certs: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(report))
    if paths.nodes:
        print("next, on the coordinator, register each node's public key:")
        print("\n".join(f"  flwr supernode register {node.public} [CONNECTION]" for node in paths.nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
