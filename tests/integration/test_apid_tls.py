"""apid's TLS: HTTPS from the configured certificate files, plain HTTP on loopback only.

Against the real zlayer-apid on a private bus:
- with tls_cert_file and tls_key_file it answers HTTPS (a client trusting the
  certificate gets its answers) and nothing in plain HTTP;
- bound to another address without them it refuses to start (exit 78, one
  sentence in its log), as it does for a certificate file that is missing.
"""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path

import pytest

from daemons.proxyd.tls import make_self_signed
from shared.busdaemon import PrivateBus
from shared.daemon import EX_CONFIG
from shared.paths import Paths
from tests.api_client import running_apid
from tests.daemon_process import daemon_process


def test_https_with_the_configured_certificate_and_no_plain_http(
    private_bus: PrivateBus, zlayer_prefix: Paths, tmp_path: Path
) -> None:
    cert, key = make_self_signed(tmp_path / "tls")
    settings = f'\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    with running_apid(private_bus, zlayer_prefix, settings) as apid:
        port = int(apid.url.rsplit(":", 1)[1])
        assert "(HTTPS)" in apid.log.read_text()
        trusting = ssl.create_default_context(cafile=str(cert))
        trusting.check_hostname = False  # the certificate names localhost, we dial 127.0.0.1
        secure = http.client.HTTPSConnection("127.0.0.1", port, context=trusting, timeout=10)
        secure.request("GET", "/health/live")
        assert secure.getresponse().status == 200
        secure.close()

        # a client that does not trust it is refused by its own TLS check
        with pytest.raises(ssl.SSLCertVerificationError):
            stranger = http.client.HTTPSConnection("127.0.0.1", port, timeout=10)
            stranger.request("GET", "/health/live")
        # plain HTTP gets no answer from an HTTPS listener
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/health/live")
            plain.getresponse()
        plain.close()


@pytest.mark.parametrize(
    ("settings", "sentence"),
    [
        ('\nhttp_bind = "0.0.0.0"\n', "plain HTTP is served on 127.0.0.1 only"),
        (
            '\ntls_cert_file = "/nonexistent/api.crt"\ntls_key_file = "/nonexistent/api.key"\n',
            "the API's TLS file /nonexistent/api.crt does not exist",
        ),
        ('\ntls_cert_file = "/nonexistent/api.crt"\n', "tls_key_file together"),
    ],
)
def test_no_plain_http_beyond_loopback_and_unusable_files_stop_it_with_a_sentence(
    private_bus: PrivateBus, zlayer_prefix: Paths, settings: str, sentence: str
) -> None:
    config = zlayer_prefix.daemon_config("apid")
    config.write_text(config.read_text() + settings)
    with daemon_process("apid", private_bus, zlayer_prefix) as (process, log):
        assert process.wait(timeout=30) == EX_CONFIG
        text = log.read_text()
    assert sentence in text, text
    assert "Traceback" not in text, text
