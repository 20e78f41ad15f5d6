"""TLS certificates for the HTTPS listener and the L4 ``stream.tls`` listeners.

Certificates come from the settings (a directory of ``<hostname>.crt`` /
``<hostname>.key`` pairs and/or a list of files); each one answers for the
names in its subject alternative names (and its common name), wildcards
included. SNI picks one: an exact name, then ``*.<parent>``, then the first
certificate configured. With none configured, a self-signed certificate is
made once (for development) and kept in the state directory.

cryptography is imported to read or make a certificate, not with this module:
proxyd reads its certificates with its first TLS listener, or at start when
some are configured.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from daemons.proxyd.settings import ProxySettings
from shared.statefile import write_atomically

if TYPE_CHECKING:
    from cryptography import x509

L7_ALPN = ["h2", "http/1.1"]
SELF_SIGNED_NAME = "zlayer-proxyd"


class TlsConfigError(Exception):
    """A certificate or key that cannot be used, in one sentence."""


class CertificateStore:
    """The certificates proxyd serves, and which names each one answers for."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path, list[str]]] = []  # cert, key, names
        self.self_signed = False

    @classmethod
    def load(cls, settings: ProxySettings, state_dir: Path) -> CertificateStore:
        """Blocking: reads files, and may write the self-signed pair."""
        store = cls()
        if settings.tls_cert_dir is not None:
            directory = settings.tls_cert_dir
            if not directory.is_dir():
                raise TlsConfigError(
                    f"tls_cert_dir {directory} is not a directory; create it or unset the key"
                )
            for cert in sorted(directory.glob("*.crt")):
                key = cert.with_suffix(".key")
                if not key.is_file():
                    raise TlsConfigError(
                        f"{cert} has no key beside it; put it in {key} or remove the certificate"
                    )
                store.add(cert, key)
        for pair in settings.tls_certificates:
            store.add(pair.cert, pair.key)
        if not store.pairs:
            cert, key = make_self_signed(state_dir / "tls")
            store.add(cert, key)
            store.self_signed = True
        return store

    def add(self, cert: Path, key: Path) -> None:
        from cryptography import x509

        try:
            loaded = x509.load_pem_x509_certificate(cert.read_bytes())
        except OSError as exc:
            raise TlsConfigError(f"cannot read the certificate {cert}: {exc.strerror}") from None
        except ValueError:
            raise TlsConfigError(f"{cert} is not a PEM certificate") from None
        names = certificate_names(loaded)
        # Load once now so a key that does not match fails at start, not at the first handshake.
        _context(cert, key, None)
        self.pairs.append((cert, key, names))

    def server_context(self, alpn: list[str] | None) -> ServerTls:
        """The listener's TLS: the first certificate, switched by SNI."""
        return ServerTls(self, alpn)


class ServerTls:
    """One listener's SSL context, whose certificates can be replaced while it serves.

    The listener keeps this one context object for its lifetime: a reload
    loads the new default certificate into it and swaps the SNI table the
    callback reads, so new handshakes get the new certificates and
    established connections keep theirs.
    """

    def __init__(self, store: CertificateStore, alpn: list[str] | None) -> None:
        self.alpn = alpn
        self.by_name: dict[str, ssl.SSLContext] = {}
        cert, key, _ = store.pairs[0]
        self.context = _context(cert, key, alpn)
        self.context.sni_callback = _sni_chooser(self)
        self._fill(store)

    def reload(self, store: CertificateStore) -> None:
        """Serve ``store``'s certificates from the next handshake on."""
        cert, key, _ = store.pairs[0]
        self.context.load_cert_chain(cert, key)
        self._fill(store)

    def _fill(self, store: CertificateStore) -> None:
        by_name: dict[str, ssl.SSLContext] = {}
        for cert, key, names in store.pairs:
            context = _context(cert, key, self.alpn)
            for name in names:
                by_name.setdefault(name.lower(), context)
        self.by_name = by_name  # one assignment: a handshake sees the old table or the new


def _sni_chooser(
    tls: ServerTls,
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
    def choose(ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if not server_name:
            return None
        by_name = tls.by_name
        name = server_name.lower().rstrip(".")
        context = by_name.get(name)
        if context is None and "." in name:
            context = by_name.get("*." + name.split(".", 1)[1])
        if context is not None:
            ssl_object.context = context
        return None

    return choose


def _context(cert: Path, key: Path, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:
        raise TlsConfigError(f"cannot read {cert} or {key}: {exc.strerror}") from None
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"{key} is not the private key of {cert} or not PEM ({exc.reason})"
        ) from None
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """DNS names a certificate answers for: its SANs, else its common name."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names: list[str] = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return names


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """The development certificate: made once, reused after (it is in browsers' exceptions)."""
    cert_path = directory / "self-signed.crt"
    key_path = directory / "self-signed.key"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SELF_SIGNED_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.DNSName(hostname), x509.DNSName(SELF_SIGNED_NAME)]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: the certificate's presence says the pair is complete.
    write_atomically(key_path, key_bytes, mode=0o600)
    write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
