"""TLS listeners: ``listen = ssl:...`` serves wss:// with a real certificate, refuses TLS
before 1.2, and survives a plain-HTTP client on its TLS port."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from db_fixtures import insert_ready
from e2e_support import banner_echo_close, exchange
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS

from twisted_novnc.testing import recording_client_factory, upgrade_request

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

EVENT_LIMIT = 15.0

with warnings.catch_warnings():
    # The old versions are deprecated names; naming them is the point here.
    warnings.simplefilter("ignore", DeprecationWarning)
    TLS_1_0, TLS_1_1 = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1


def within(d: defer.Deferred, seconds: float = EVENT_LIMIT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A fresh key and a self-signed certificate for 127.0.0.1: (key.pem, cert.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def endpoint_arg(path: Path) -> str:
    """A path as a Twisted endpoint-string argument (colons escaped)."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


@pytest.fixture
def tls_daemon(daemon_factory, tmp_path):
    """A daemon listening with TLS only, and the certificate a client must trust."""
    key, cert = self_signed(tmp_path)
    listen = (
        f"ssl:0:interface=127.0.0.1:privateKey={endpoint_arg(key)}:certKey={endpoint_arg(cert)}"
    )
    daemon = pytest_twisted.blockon(daemon_factory(listen=listen))
    return daemon, cert



@pytest_twisted.inlineCallbacks
def wss_banner_and_echo(port: int, cert: Path, sid: str):
    """A real TLS WebSocket client (Autobahn over Twisted TLS, trusting only ``cert``) gets
    the banner and its echo through the daemon."""
    options = optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(cert.read_bytes()))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    factory = recording_client_factory(f"wss://127.0.0.1:{port}/websockify/{sid}")
    client = yield connectProtocol(endpoint, factory.buildProtocol(None))
    yield within(client.opened)
    assert client.subprotocol == "binary"
    yield banner_echo_close(client, b"over tls", EVENT_LIMIT)


class Handshake(Protocol):
    """A TLS client handshake by Python's ``ssl`` module, carried over a Twisted connection:
    fires with the negotiated version, or fails with why the handshake did not complete."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.done: defer.Deferred[str] = defer.Deferred()

    def connectionMade(self) -> None:
        self._step()

    def dataReceived(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(ConnectionError("closed before the handshake completed"))

    def _step(self) -> None:
        if self.done.called:
            return
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.transport.write(self.outgoing.read())
            return
        except ssl.SSLError as e:
            self.transport.write(self.outgoing.read())
            self.done.errback(e)
            self.transport.loseConnection()
            return
        self.transport.write(self.outgoing.read())
        self.done.callback(self.tls.version())
        self.transport.loseConnection()


def client_context(cert: Path, lowest: ssl.TLSVersion, highest: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = lowest
        context.maximum_version = highest
    # OpenSSL 3 will not offer TLS 1.0/1.1 at its default security level; level 0 lets this
    # client offer them, so that refusing them is left to the server under test.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def lenient_server_context(key: Path, cert: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = TLS_1_0
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def handshake_in_memory(client: ssl.SSLContext, server: ssl.SSLContext) -> str:
    """Run a client and a server handshake against each other in memory; the version agreed."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, side in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return c.version() or ""
    raise AssertionError("the in-memory handshake did not finish")


@pytest_twisted.inlineCallbacks
def handshake_with(port: int, context: ssl.SSLContext):
    proto = Handshake(context)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    try:
        version = yield within(proto.done)
    except (ssl.SSLError, ConnectionError) as e:
        return None, e
    return version, None


@pytest_twisted.inlineCallbacks
def test_wss_banner_and_echo(tls_daemon, pg, sessions_table, vnc_server):
    """``listen = ssl:...`` serves wss://: a client that trusts the certificate is relayed."""
    daemon, cert = tls_daemon
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    yield wss_banner_and_echo(daemon.port, cert, sid)


@pytest_twisted.inlineCallbacks
def test_tls_before_1_2_is_refused(tls_daemon, tmp_path):
    """A client that speaks at most TLS 1.0 or 1.1 fails the handshake; 1.2 and 1.3 succeed.

    The same clients first complete a handshake with a lenient in-memory server, which proves
    that they do offer the old versions (so the refusal is the daemon's, not the local
    OpenSSL's).
    """
    daemon, cert = tls_daemon
    key = cert.parent / "key.pem"
    lenient = lenient_server_context(key, cert)
    for highest, name in ((TLS_1_0, "TLSv1"), (TLS_1_1, "TLSv1.1")):
        context = client_context(cert, TLS_1_0, highest)
        assert handshake_in_memory(context, lenient) == name, "this client cannot offer " + name
        version, error = yield handshake_with(daemon.port, client_context(cert, TLS_1_0, highest))
        assert version is None, f"the daemon accepted {version}; TLS 1.2 is the minimum"
        # The server's own refusal: a protocol_version alert (RFC 8446, 6.2).
        assert isinstance(error, ssl.SSLError) and "PROTOCOL_VERSION" in str(error), error
    for version_wanted, name in (
        (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
        (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
    ):
        context = client_context(cert, version_wanted, version_wanted)
        version, error = yield handshake_with(daemon.port, context)
        assert (version, error) == (name, None)
    assert "Traceback" not in daemon.output and "Unhandled" not in daemon.output, daemon.output


@pytest_twisted.inlineCallbacks
def test_plain_http_on_the_tls_port(tls_daemon, pg, sessions_table, vnc_server):
    """A plain-HTTP upgrade sent to the TLS port is closed at once (at most a TLS alert, never
    an HTTP answer), and the daemon goes on serving wss://."""
    daemon, cert = tls_daemon
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    answer = yield exchange(daemon.port, upgrade_request(f"/websockify/{sid}"), 5)
    assert not answer.startswith(b"HTTP/"), answer[:100]
    assert not answer or answer[0] == 0x15, f"not a TLS alert: {answer[:20]!r}"
    yield wss_banner_and_echo(daemon.port, cert, sid)
    assert "Traceback" not in daemon.output and "Unhandled" not in daemon.output, daemon.output
