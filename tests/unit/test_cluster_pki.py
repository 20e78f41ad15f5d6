"""The cluster CA and node certificates: what they name, who signed them, the files they live in,
and a real TLS handshake in both directions with them."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.cluster.pki import (
    ANY_NODE,
    Authority,
    ClusterFiles,
    PkiError,
    fingerprint,
    init_cluster,
    issued_by,
    make_csr,
    make_key,
    node_id_of,
)


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.make()


def _names(certificate: x509.Certificate) -> tuple[set[str], set[str]]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        {str(ip) for ip in san.get_values_for_type(x509.IPAddress)},
        set(san.get_values_for_type(x509.DNSName)),
    )


def test_the_ca_signs_nodes_only_and_its_fingerprint_is_sha256_of_der(
    authority: Authority,
) -> None:
    constraints = authority.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca and constraints.value.path_length == 0
    der = authority.certificate.public_bytes(serialization.Encoding.DER)
    assert authority.fingerprint == hashlib.sha256(der).hexdigest()
    assert len(authority.fingerprint) == 64


def test_a_node_certificate_names_its_id_and_addresses_for_server_and_client(
    authority: Authority,
) -> None:
    _key, certificate = authority.issue("node-a1", ["192.0.2.10", "2001:db8::10", "a1.example"])
    assert node_id_of(certificate) == "node-a1"
    ips, dns = _names(certificate)
    assert ips == {"192.0.2.10", "2001:db8::10", "127.0.0.1", "::1"}
    assert dns == {"node-a1", "a1.example", "localhost", ANY_NODE}
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued_by(certificate, authority.certificate)
    assert not issued_by(certificate, Authority.make().certificate)
    assert certificate.not_valid_after_utc <= authority.certificate.not_valid_after_utc


def test_a_joining_nodes_request_is_signed_with_what_the_ca_decides(
    authority: Authority,
) -> None:
    key = make_key()
    certificate = authority.sign(make_csr(key, "joiner", ["198.51.100.7"]))
    assert certificate.public_key() == key.public_key()
    assert node_id_of(certificate) == "joiner"
    assert "198.51.100.7" in _names(certificate)[0]
    assert certificate.issuer == authority.certificate.subject


def _request(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    common_name: str,
    names: list[x509.GeneralName],
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


@pytest.mark.parametrize(
    ("request_maker", "words"),
    [
        (lambda: _request(make_key(), "Not A Node", []), "is not a node id"),
        (lambda: _request(ed25519.Ed25519PrivateKey.generate(), "n1", []), "not ECDSA P-256"),
        (
            lambda: _request(ec.generate_private_key(ec.SECP384R1()), "n1", []),
            "not ECDSA P-256",
        ),
        (
            lambda: _request(make_key(), "n1", [x509.UniformResourceIdentifier("spiffe://x")]),
            "other than IP addresses and host names",
        ),
        (
            lambda: _request(
                make_key(),
                "n1",
                [
                    x509.IPAddress(ipaddress.ip_address(f"10.0.{i // 250}.{i % 250}"))
                    for i in range(40)
                ],
            ),
            "at most 32",
        ),
    ],
)
def test_requests_the_ca_refuses_say_why_in_a_sentence(
    authority: Authority, request_maker: object, words: str
) -> None:
    assert callable(request_maker)
    with pytest.raises(PkiError, match=words) as caught:
        authority.sign(request_maker())
    assert "\n" not in str(caught.value)


def test_a_request_whose_signature_does_not_match_is_refused(authority: Authority) -> None:
    der = bytearray(
        make_csr(make_key(), "n1", ["10.0.0.1"]).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 0x01  # inside the signature
    with pytest.raises(PkiError, match="not signed by its own key"):
        authority.sign(x509.load_der_x509_csr(bytes(der)))


def test_an_address_that_is_no_address_is_refused() -> None:
    with pytest.raises(PkiError, match="neither an IP address nor a host name"):
        make_csr(make_key(), "n1", ["10.0.0.1; rm -rf"])


def test_init_writes_0600_files_whole_and_refuses_a_second_ca(tmp_path: Path) -> None:
    files = ClusterFiles(tmp_path / "cluster")
    authority = init_cluster(files, "first", ["192.0.2.1"])
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    for path in (files.ca_cert, files.ca_key, files.node_cert, files.node_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in files.directory.iterdir()) == [
        "ca.crt",
        "ca.key",
        "node.crt",
        "node.key",
    ]
    again = files.authority()
    assert again.fingerprint == authority.fingerprint
    assert fingerprint(files.ca_certificate()) == authority.fingerprint
    assert node_id_of(files.node_certificate()) == "first"
    with pytest.raises(PkiError, match="already has a cluster CA"):
        init_cluster(files, "first", ["192.0.2.1"])
    assert files.authority().fingerprint == authority.fingerprint


def test_missing_files_are_a_sentence_naming_the_way_in(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"does not exist; this node is not in a cluster"):
        ClusterFiles(tmp_path / "none").pems()


def _context(server: bool, files: ClusterFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.node_cert, files.node_key)
    context.load_verify_locations(files.ca_cert)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_two_nodes_certificates_work_both_ways_in_tls(tmp_path: Path) -> None:
    """A real handshake, each side checking the other against the CA: the server by the
    client's certificate, the client by the server's node id and by its address."""
    server_files = ClusterFiles(tmp_path / "a")
    authority = init_cluster(server_files, "node-a", ["192.0.2.1"])
    client_files = ClusterFiles(tmp_path / "b")
    client_files.write_ca_certificate(authority.certificate)
    client_files.write_node(*authority.issue("node-b", ["192.0.2.2"]))
    server_context = _context(True, server_files)
    client_context = _context(False, client_files)
    for server_name in ("node-a", "127.0.0.1"):
        left, right = socket.socketpair()
        seen: dict[str, object] = {}

        def serve(sock: socket.socket = right, seen: dict[str, object] = seen) -> None:
            with server_context.wrap_socket(sock, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()

        thread = threading.Thread(target=serve)
        thread.start()
        with client_context.wrap_socket(left, server_hostname=server_name) as tls:
            server_certificate = tls.getpeercert()
            assert server_certificate is not None
            assert server_certificate["subject"] == ((("commonName", "node-a"),),)
        thread.join(10)
        peer = seen["peer"]
        assert isinstance(peer, dict)
        assert peer["subject"] == ((("commonName", "node-b"),),)
    # a certificate from another CA is refused by the server
    stranger = ClusterFiles(tmp_path / "c")
    init_cluster(stranger, "node-c", [])
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def refuse() -> None:
        try:
            with server_context.wrap_socket(right, server_side=True):
                pass
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=refuse)
    thread.start()
    stranger_context = _context(False, stranger)
    stranger_context.check_hostname = False
    stranger_context.verify_mode = ssl.CERT_NONE
    with (
        pytest.raises((ssl.SSLError, OSError)),
        stranger_context.wrap_socket(left, server_hostname="node-a") as tls,
    ):
        tls.recv(1)  # TLS 1.3: the server's refusal arrives after the client's handshake
    thread.join(10)
    assert errors and "certificate" in str(errors[0]).lower()
