"""``fedlora certs``: SANs, key formats Flower accepts, 0600 private keys, no silent overwrite."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key

from server.certs import CertsError, create_certs, main, parse_san


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(path: Path) -> tuple[list[str], list[str]]:
    san = x509.load_pem_x509_certificate(path.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    ips = [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)]
    return san.value.get_values_for_type(x509.DNSName), ips


def test_server_certificate_has_ip_and_dns_sans_and_is_signed_by_the_ca(tmp_path: Path) -> None:
    # Act
    paths, _ = create_certs(tmp_path, hosts=["superlink", "10.0.0.7", "::1"], nodes=0)

    # Assert
    dns, ips = _sans(paths.server_cert)
    assert dns == ["localhost", "superlink"]
    assert ips == ["127.0.0.1", "10.0.0.7", "::1"]
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(paths.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_0600_and_public_files_0644(tmp_path: Path) -> None:
    paths, _ = create_certs(tmp_path, nodes=2)

    for private in [paths.ca_key, paths.server_key, *(node.private for node in paths.nodes)]:
        assert _mode(private) == 0o600, private
    for public in [paths.ca_cert, paths.server_cert, *(node.public for node in paths.nodes)]:
        assert _mode(public) == 0o644, public


def test_node_keys_are_in_the_formats_flower_loads(tmp_path: Path) -> None:
    paths, _ = create_certs(tmp_path, nodes=1)
    node = paths.nodes[0]

    private = load_ssh_private_key(node.private.read_bytes(), password=None)  # as flower-supernode loads it
    public = load_ssh_public_key(node.public.read_bytes())

    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert node.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(node.public)  # what `flwr supernode register` runs before contacting the SuperLink


def test_rerun_keeps_every_existing_file_and_adds_missing_nodes(tmp_path: Path) -> None:
    paths, _ = create_certs(tmp_path, nodes=1)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    paths2, report = create_certs(tmp_path, nodes=2)

    assert all(path.read_bytes() == data for path, data in before.items())
    assert paths2.nodes[1].private.exists()
    assert sum(line.startswith("kept") for line in report) == 3
    assert sum(line.startswith("created") for line in report) == 1


def test_existing_certificate_without_a_requested_host_is_refused_not_reissued(tmp_path: Path) -> None:
    paths, _ = create_certs(tmp_path, nodes=0)
    before = paths.server_cert.read_bytes()

    with pytest.raises(CertsError, match="missing \\['superlink'\\].*--force"):
        create_certs(tmp_path, hosts=["superlink"], nodes=0)
    assert paths.server_cert.read_bytes() == before


def test_force_recreates_everything(tmp_path: Path) -> None:
    paths, _ = create_certs(tmp_path, nodes=1)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    create_certs(tmp_path, hosts=["superlink"], nodes=1, force=True)

    assert all(path.read_bytes() != data for path, data in before.items())
    assert _mode(paths.nodes[0].private) == 0o600
    assert "superlink" in _sans(paths.server_cert)[0]


def test_half_a_key_pair_is_refused(tmp_path: Path) -> None:
    paths, _ = create_certs(tmp_path, nodes=1)
    paths.ca_key.unlink()

    with pytest.raises(CertsError, match="ca.key is missing"):
        create_certs(tmp_path, nodes=1)


def test_missing_public_key_is_derived_from_the_private_key(tmp_path: Path) -> None:
    paths, _ = create_certs(tmp_path, nodes=1)
    public = paths.nodes[0].public.read_bytes()
    paths.nodes[0].public.unlink()

    create_certs(tmp_path, nodes=1)

    assert paths.nodes[0].public.read_bytes() == public


@pytest.mark.parametrize("host", ["", "bad host", "-leading.dash", "ümlaut.example", "a" * 64 + ".example"])
def test_invalid_hosts_are_refused(host: str) -> None:
    with pytest.raises(CertsError, match="neither an IP address nor a valid DNS name"):
        parse_san(host)


def test_ipv6_in_brackets_is_an_ip_san() -> None:
    assert parse_san("[::1]") == x509.IPAddress(ipaddress.ip_address("::1"))


def test_cli_reports_and_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--host", "superlink", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "flwr supernode register" in out and "node-0.pub" in out

    assert main([str(tmp_path), "--host", "other.example"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
