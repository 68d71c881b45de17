"""Real-socket TLS tests for imgproxy.netpolicy: verified certificates through the policed Agent.

A test CA and server certificates are generated at test time; the origin is a twisted.web Site on
127.0.0.1, port 0. Names are mapped to 127.0.0.1 by a table resolver, and the address policy
allows 127.0.0.0/8.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Site

from imgproxy.netpolicy import AddressPolicy, PolicyEndpointFactory, make_tls_policy
from tests.conftest import FakeResolver

LOOPBACK_ALLOWED = AddressPolicy(allow_networks=("127.0.0.0/8",))
LOOPBACK_NAMES = ("origin.test", "other.test")  # the test names, resolved to 127.0.0.1


@attrs.frozen
class _Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _issue(
    common_name: str,
    issuer: _Issued | None,
    names: Sequence[x509.GeneralName] = (),
) -> _Issued:
    """A CA certificate (issuer None: self-signed) or a server certificate for ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), False)
    signer = issuer.key if issuer else key
    return _Issued(builder.sign(signer, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def ca() -> _Issued:
    return _issue("imageproxy test CA", None)


@pytest.fixture(scope="module")
def other_ca() -> _Issued:
    return _issue("imageproxy other test CA", None)


def _server_names() -> list[x509.GeneralName]:
    return [
        x509.DNSName("origin.test"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]


@pytest.fixture()
def ca_file(tmp_path: Path, ca: _Issued) -> str:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.pem())
    return str(path)


@pytest.fixture(autouse=True)
def _no_env_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSSL's environment overrides of the platform roots are off unless a test sets them."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:  # noqa: N802 - twisted.web API
        return b"hello"


class _Body(Protocol):
    """Collect a response body (readBody warns about the proxy transport)."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted API
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _read_body(response: IResponse) -> Deferred[bytes]:
    body = _Body()
    response.deliverBody(body)
    return body.done


async def _serve_and_fetch(server: _Issued, tls_policy: IPolicyForHTTPS, host: str) -> bytes:
    """Serve HTTPS with ``server``'s certificate on 127.0.0.1 and GET it as ``host``."""
    from twisted.internet import reactor

    options = CertificateOptions(privateKey=server.key, certificate=server.certificate)
    port = reactor.listenSSL(0, Site(_Hello()), options, interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    factory = PolicyEndpointFactory(
        reactor, LOOPBACK_ALLOWED, tls_policy, connect_timeout=5,
        resolver=FakeResolver(dict.fromkeys(LOOPBACK_NAMES, ["127.0.0.1"])),
    )
    agent = Agent.usingEndpointFactory(reactor, factory, pool)
    url = f"https://{host}:{port.getHost().port}/".encode("ascii")
    try:
        response = await agent.request(b"GET", url)
        return await _read_body(response)
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_valid_certificate_is_accepted(ca: _Issued, ca_file: str) -> None:
    """A certificate from the ca_file's CA, issued for the requested name, works."""
    server = _issue("origin.test", ca, _server_names())
    assert await _serve_and_fetch(server, make_tls_policy(ca_file), "origin.test") == b"hello"


@pytest_twisted.ensureDeferred
async def test_ip_literal_is_verified_against_ip_san(ca: _Issued, ca_file: str) -> None:
    """An https URL with an IP literal is verified against the certificate's IP address."""
    server = _issue("origin.test", ca, _server_names())
    assert await _serve_and_fetch(server, make_tls_policy(ca_file), "127.0.0.1") == b"hello"


@pytest_twisted.ensureDeferred
async def test_wrong_hostname_is_refused(ca: _Issued, ca_file: str) -> None:
    """A trusted certificate for another name fails the hostname check."""
    server = _issue("origin.test", ca, _server_names())
    with pytest.raises(ResponseNeverReceived) as info:
        await _serve_and_fetch(server, make_tls_policy(ca_file), "other.test")
    assert info.value.reasons[0].check(VerificationError)


@pytest_twisted.ensureDeferred
async def test_unknown_ca_is_refused(other_ca: _Issued, ca_file: str) -> None:
    """A certificate from a CA that is neither in ca_file nor a platform root fails."""
    server = _issue("origin.test", other_ca, _server_names())
    with pytest.raises(ResponseNeverReceived) as info:
        await _serve_and_fetch(server, make_tls_policy(ca_file), "origin.test")
    assert info.value.reasons[0].check(SSL.Error)


@pytest_twisted.ensureDeferred
async def test_ca_file_keeps_platform_roots(
    other_ca: _Issued, ca_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ca_file set, the platform roots (here set through SSL_CERT_FILE) are still trusted."""
    platform_roots = tmp_path / "platform.pem"
    platform_roots.write_bytes(other_ca.pem())
    monkeypatch.setenv("SSL_CERT_FILE", str(platform_roots))
    server = _issue("origin.test", other_ca, _server_names())
    assert await _serve_and_fetch(server, make_tls_policy(ca_file), "origin.test") == b"hello"


@pytest_twisted.ensureDeferred
async def test_default_policy_trusts_platform_roots_only(
    ca: _Issued, other_ca: _Issued, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ca_file, a platform root works and an unlisted CA does not."""
    platform_roots = tmp_path / "platform.pem"
    platform_roots.write_bytes(other_ca.pem())
    monkeypatch.setenv("SSL_CERT_FILE", str(platform_roots))
    trusted = _issue("origin.test", other_ca, _server_names())
    assert await _serve_and_fetch(trusted, make_tls_policy(), "origin.test") == b"hello"
    untrusted = _issue("origin.test", ca, _server_names())
    with pytest.raises(ResponseNeverReceived) as info:
        await _serve_and_fetch(untrusted, make_tls_policy(), "origin.test")
    assert info.value.reasons[0].check(SSL.Error)


def test_missing_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    """A ca_file that cannot be read raises ValueError naming it."""
    with pytest.raises(ValueError, match="cannot read CA file .*missing.pem"):
        make_tls_policy(str(tmp_path / "missing.pem"))


def test_ca_file_without_certificates_is_a_clear_error(tmp_path: Path) -> None:
    """A ca_file without PEM certificates raises ValueError naming it."""
    path = tmp_path / "empty.pem"
    path.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no valid PEM certificate"):
        make_tls_policy(str(path))
