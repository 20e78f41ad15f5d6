"""The cluster's certificate authority and each node's key and certificate.

``zlayerctl node init`` makes the authority (:meth:`Authority.make`) and the
first node's certificate; a node that joins sends a certificate signing
request (:func:`make_csr`) and gets it signed (:meth:`Authority.sign`). One
certificate per node serves every use between nodes: etcd's peer and client
traffic and gRPC, as server and as client (both extended key usages).

- Keys are ECDSA P-256, signatures ECDSA-SHA256. Ed25519 would be smaller,
  but grpcio's TLS (BoringSSL) offers no Ed25519 signature algorithm: its
  handshakes fail with NO_COMMON_SIGNATURE_ALGORITHMS. etcd's Go TLS takes
  either.
- A node's certificate names its id as common name and as a DNS name, so a
  peer can check it reached the node it meant, and the node's addresses as
  IP and DNS names (loopback always, for its own etcd and daemons), and
  :data:`ANY_NODE`, the name a client of several nodes at once checks.
- The authority is named by its fingerprint: SHA-256 of its certificate's
  DER, in lowercase hex (:func:`fingerprint`), which a join token carries.
- The files (:class:`ClusterFiles`) are written 0600 in a 0700 directory,
  each whole (fsync, rename, fsync of the directory).

cryptography is imported with this module: only the cluster's commands and
daemons import it, and they use it at once.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.cluster import filestamp
from shared.paths import Paths
from shared.statefile import write_atomically

CA_VALID_DAYS = 3650
NODE_VALID_DAYS = 730
# Certificates start a little in the past: a node whose clock is behind the
# signer's still accepts one made this second.
BACKDATE = datetime.timedelta(minutes=5)
# A request naming more is not a node's.
MAX_NAMES = 32
LOOPBACK: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
# A DNS name every node certificate carries: a client of several nodes at once
# (etcd's members behind one gRPC target) checks this name, as the target's
# several addresses are no one name (grpc.ssl_target_name_override).
ANY_NODE = "zlayer-cluster"
# A node id is a DNS label, so it can be a certificate's DNS name.
NODE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")

FILE_MODE = 0o600
DIR_MODE = 0o700


class PkiError(ValueError):
    """A key, certificate or request that cannot be used, in one sentence."""


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (64 characters)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the file's mode protects it (etcd and gRPC read it as is)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_certificate(data: bytes, what: str = "the certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{what} is not a PEM certificate") from None


def load_key(data: bytes, what: str = "the key") -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{what} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PkiError(f"{what} is not an ECDSA P-256 key, the only kind the cluster uses")
    return key


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError:
        raise PkiError("the certificate request is not a PEM certificate signing request") from None


def check_node_id(node_id: str) -> str:
    if not NODE_ID.fullmatch(node_id):
        raise PkiError(
            f"{node_id!r} is not a node id: use 1 to 63 lowercase letters, digits and "
            "hyphens, starting and ending with a letter or digit"
        )
    return node_id


def _general_names(node_id: str, addresses: list[str]) -> list[x509.GeneralName]:
    """The node id, its addresses and loopback, each once: IP addresses as such, names as DNS."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for address in [node_id, *addresses, *LOOPBACK, ANY_NODE]:
        text = address.strip().strip("[]")
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            if not _DNS_NAME.fullmatch(text):
                raise PkiError(
                    f"{address!r} is neither an IP address nor a host name; "
                    "give the node's addresses as other nodes reach it"
                ) from None
            key, name = text.lower().rstrip("."), None
            general: x509.GeneralName = x509.DNSName(key)
        else:
            key, name = str(ip), ip
            general = x509.IPAddress(name)
        if key not in seen:
            seen.add(key)
            names.append(general)
    if len(names) > MAX_NAMES:
        raise PkiError(f"a node certificate names at most {MAX_NAMES} addresses, not {len(names)}")
    return names


def make_csr(
    key: ec.EllipticCurvePrivateKey, node_id: str, addresses: list[str]
) -> x509.CertificateSigningRequest:
    """The request a joining node sends: its id and addresses, signed by its key."""
    check_node_id(node_id)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName(_general_names(node_id, addresses)), False)
        .sign(key, hashes.SHA256())
    )


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def node_id_of_request(csr: x509.CertificateSigningRequest) -> str:
    """The node id a request asks a certificate for; PkiError if it names none or a bad one."""
    common = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common) != 1:
        raise PkiError("the certificate request names no node id (its common name)")
    return check_node_id(str(common[0].value))


def node_id_of(certificate: x509.Certificate) -> str:
    """The node id a node certificate was issued to (its common name)."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclass(frozen=True)
class Authority:
    """The cluster's CA: its certificate and, on a node that signs, its key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls, cluster_name: str = "zlayer cluster") -> Authority:
        key = make_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cluster_name)])
        now = datetime.datetime.now(datetime.UTC)
        identifier = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
            # path length 0: it signs nodes, never another CA
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(identifier, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    def sign(
        self, csr: x509.CertificateSigningRequest, valid_days: int = NODE_VALID_DAYS
    ) -> x509.Certificate:
        """A node certificate for the request, once checked: signed by its own key, a
        P-256 key, a node id as common name, IP and DNS names only.

        What the certificate may do is decided here, not taken from the request:
        server and client authentication, never a CA, never outliving the CA.
        """
        if not csr.is_signature_valid:
            raise PkiError("the certificate request is not signed by its own key")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise PkiError("the certificate request's key is not ECDSA P-256")
        node_id = node_id_of_request(csr)
        addresses: list[str] = []
        try:
            requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            requested = x509.SubjectAlternativeName([])
        for general in requested:
            if isinstance(general, x509.IPAddress):
                addresses.append(str(general.value))
            elif isinstance(general, x509.DNSName):
                addresses.append(general.value)
            else:
                raise PkiError(
                    "the certificate request names something other than IP addresses and "
                    "host names; a node certificate names only those"
                )
        return self._issue(public, node_id, _general_names(node_id, addresses), valid_days)

    def issue(
        self, node_id: str, addresses: list[str], valid_days: int = NODE_VALID_DAYS
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A new key and its certificate, for the node that holds this authority (init)."""
        key = make_key()
        return key, self.sign(make_csr(key, node_id, addresses), valid_days)

    def _issue(
        self,
        public: ec.EllipticCurvePublicKey,
        node_id: str,
        names: list[x509.GeneralName],
        valid_days: int,
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        until = min(now + datetime.timedelta(days=valid_days), self.certificate.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


def issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca``'s key signed ``certificate`` (the signature only; TLS checks the rest)."""
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class ClusterFiles:
    """The PEM files of a node in a cluster, in one directory (``/var/lib/zlayer/cluster``).

    ``ca.crt`` on every node; ``ca.key`` only where the authority signs (the
    node that ran init); ``node.crt`` and ``node.key`` the node's own;
    ``secrets.key`` the cluster's secrets key, on every node.
    """

    directory: Path

    @classmethod
    def of(cls, paths: Paths) -> ClusterFiles:
        return cls(paths.state_dir / "cluster")

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def node_cert(self) -> Path:
        return self.directory / "node.crt"

    @property
    def node_key(self) -> Path:
        return self.directory / "node.key"

    @property
    def crl(self) -> Path:
        """The CA's revocation list (PEM), which this node's etcd member reads."""
        return self.directory / "crl.pem"

    @property
    def secrets_key(self) -> Path:
        """The cluster's secrets key (:mod:`shared.cluster.secretkey`), on every node."""
        return self.directory / "secrets.key"

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        write_atomically(path, data, FILE_MODE)

    def write_authority(self, authority: Authority) -> None:
        self._write(self.ca_key, key_pem(authority.key))
        self._write(self.ca_cert, certificate_pem(authority.certificate))

    def write_crl(self, crl: x509.CertificateRevocationList) -> None:
        self._write(self.crl, crl.public_bytes(serialization.Encoding.PEM))

    def write_ca_certificate(self, certificate: x509.Certificate) -> None:
        self._write(self.ca_cert, certificate_pem(certificate))

    def write_node(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        # the key first: a certificate on disk always has its key beside it
        self._write(self.node_key, key_pem(key))
        self._write(self.node_cert, certificate_pem(certificate))

    def _read(self, path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise PkiError(
                f"{what} {path} does not exist; this node is not in a cluster "
                "(zlayerctl node init or node join)"
            ) from None
        except OSError as exc:
            raise PkiError(f"cannot read {what} {path} ({exc.strerror}); run as root") from None

    def ca_certificate(self) -> x509.Certificate:
        return load_certificate(self._read(self.ca_cert, "the cluster CA"), str(self.ca_cert))

    def node_certificate(self) -> x509.Certificate:
        return load_certificate(
            self._read(self.node_cert, "the node certificate"), str(self.node_cert)
        )

    def authority(self) -> Authority:
        """The CA with its key: only on a node that signs."""
        key = load_key(self._read(self.ca_key, "the cluster CA key"), str(self.ca_key))
        return Authority(self.ca_certificate(), key)

    def stamp(self) -> tuple[int, ...]:
        """Blocking: the modification times (ns) of the CA certificate, the node key and
        the node certificate (:mod:`shared.cluster.filestamp`); a renewal changes them."""
        return filestamp.stamp(self.ca_cert, self.node_key, self.node_cert)

    def pems(self) -> tuple[bytes, bytes, bytes]:
        """The CA certificate, the node's key and the node's certificate, as PEM (for TLS)."""
        return (
            self._read(self.ca_cert, "the cluster CA"),
            self._read(self.node_key, "the node key"),
            self._read(self.node_cert, "the node certificate"),
        )


def init_cluster(
    files: ClusterFiles, node_id: str, addresses: list[str], cluster_name: str = "zlayer cluster"
) -> Authority:
    """``node init``: a new CA and this node's certificate, written; refused if a CA exists
    (a second one would cut this node off from the cluster it is in)."""
    if files.ca_cert.exists():
        raise PkiError(
            f"this node already has a cluster CA ({files.ca_cert}); "
            "it is in a cluster: leave it (node rm) before making a new one"
        )
    authority = Authority.make(cluster_name)
    key, certificate = authority.issue(node_id, addresses)
    files.write_authority(authority)
    files.write_node(key, certificate)
    return authority


def serial_hex(certificate: x509.Certificate) -> str:
    return format(certificate.serial_number, "x")


NONCE_BYTES = 12


def _associated(ca: x509.Certificate) -> bytes:
    # bound to its CA: a sealed key put under another cluster's CA does not open
    return b"zlayer-ca-key\0" + fingerprint(ca).encode()


def seal_key(authority: Authority, secrets_key: bytes) -> tuple[bytes, bytes]:
    """The CA's key (PKCS#8 DER) sealed with AES-256-GCM under the cluster's secrets key:
    (nonce, ciphertext with its tag)."""
    nonce = os.urandom(NONCE_BYTES)
    der = authority.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return nonce, AESGCM(secrets_key).encrypt(nonce, der, _associated(authority.certificate))


def open_key(ca: x509.Certificate, nonce: bytes, sealed: bytes, secrets_key: bytes) -> Authority:
    """The authority whose key :func:`seal_key` sealed; PkiError if it does not open with
    this secrets key or is not the key of ``ca``."""
    from cryptography.exceptions import InvalidTag

    try:
        der = AESGCM(secrets_key).decrypt(nonce, sealed, _associated(ca))
    except (InvalidTag, ValueError):
        raise PkiError(
            "the cluster CA's key in the cluster's store does not open with this node's "
            "secrets key; join this node to the cluster again"
        ) from None
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != ca.public_key():
        raise PkiError("the cluster CA's key in the cluster's store is not the CA's key")
    return Authority(ca, key)


CRL_VALID_DAYS = 3650


def make_crl(
    authority: Authority, revoked: list[tuple[str, datetime.datetime]]
) -> x509.CertificateRevocationList:
    """The CA's revocation list of ``revoked`` (serial in hex, when). Its next update is
    far off: it is made again whenever a node is removed, not on a schedule."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.certificate.subject)
        .last_update(now - BACKDATE)
        .next_update(
            min(
                now + datetime.timedelta(days=CRL_VALID_DAYS),
                authority.certificate.not_valid_after_utc,
            )
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(when)
            .build()
        )
    return builder.sign(authority.key, hashes.SHA256())
