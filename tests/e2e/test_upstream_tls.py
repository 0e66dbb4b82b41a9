"""[upstream] tls: TLS to the VM, verified against a test CA when asked, for real."""

from __future__ import annotations

import datetime
import ipaddress
import uuid

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from db_fixtures import insert_ready
from e2e_support import connect_session, within
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString

from twisted_novnc.testing import RFB_BANNER, VNCEchoFactory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(tmp_path, name: str):
    """A CA key and certificate, written as PEM; returns (key, cert, path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def vm_certificate(ca_key, ca_cert, tmp_path) -> str:
    """A VM's certificate for 127.0.0.1 (an IP address SAN), signed by the CA, as a PEM file
    holding certificate and key; returns its path."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name("vm")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "vm.pem"
    path.write_bytes(pem)
    return str(path)


@pytest.fixture
def tls_vnc(tmp_path):
    """A test VNC server behind TLS with a certificate from a test CA."""
    ca_key, ca_cert, ca_path = make_ca(tmp_path, "test-ca")
    _, _, other_ca_path = make_ca(tmp_path, "other-ca")
    factory = VNCEchoFactory()
    pem = vm_certificate(ca_key, ca_cert, tmp_path)
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
    )
    port = pytest_twisted.blockon(endpoint.listen(factory))
    factory.port = port.getHost().port
    factory.ca_path, factory.other_ca_path = ca_path, other_ca_path
    yield factory
    for conn in list(factory.connections):
        conn.transport.abortConnection()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))




@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize(
    "tls, trusted, served",
    [("verify", True, True), ("verify", False, False), ("on", False, True)],
    ids=["verify-good-ca", "verify-wrong-ca", "on-unverified"],
)
def test_upstream_tls(daemon_factory, pg, sessions_table, tls_vnc, tls, trusted, served):
    """verify relays only to a VM whose certificate chains to ca_file (else 4502); on relays
    without checking."""
    ca = tls_vnc.ca_path if trusted else tls_vnc.other_ca_path
    daemon = yield daemon_factory({"upstream": {"tls": tls, "ca_file": str(ca)}})
    sid = str(uuid.uuid4())
    insert_ready(pg, sessions_table, sid, tls_vnc.port)
    client = yield connect_session(daemon.port, sid)
    if served:
        assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER
        client.sendMessage(b"over tls", isBinary=True)
        yield within(client.when_received(len(RFB_BANNER) + 8))
        client.sendClose(1000)
        yield within(client.closed)
    else:
        assert (yield within(client.closed)) == (4502, "VM unreachable")
        assert not client.received, "no VM byte reaches a browser before the VM is trusted"


@pytest_twisted.inlineCallbacks
def test_wss_upstream_verified(daemon_factory, pg, sessions_table, tmp_path):
    """mode = websocket with tls = verify speaks wss:// to a websockify behind TLS."""
    from autobahn.twisted.websocket import WebSocketServerFactory
    from test_websocket_upstream import FakeWebsockify

    ca_key, ca_cert, ca_path = make_ca(tmp_path, "wss-ca")
    pem = vm_certificate(ca_key, ca_cert, tmp_path)
    factory = WebSocketServerFactory()
    factory.protocol = FakeWebsockify
    factory.requests, factory.opened = [], []
    port = yield serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
    ).listen(factory)
    try:
        daemon = yield daemon_factory(
            {"upstream": {"mode": "websocket", "tls": "verify", "ca_file": str(ca_path)}}
        )
        sid = str(uuid.uuid4())
        insert_ready(pg, sessions_table, sid, port.getHost().port)
        client = yield connect_session(daemon.port, sid)
        assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER
        assert factory.requests[0].protocols == ["binary"]
        client.sendClose(1000)
        yield within(client.closed)
    finally:
        for proto in factory.opened:
            proto.transport.abortConnection()
        yield port.stopListening()


def test_unreadable_ca_file_stops_start_up(postgres_dsn, sessions_table, tmp_path):
    """A ca_file that cannot be read stops start-up with one line naming [upstream] ca_file."""
    import subprocess

    from daemon_process import TWISTD, write_config

    config = write_config(
        tmp_path / "c.ini", postgres_dsn, sessions_table,
        {"upstream": {"tls": "verify", "ca_file": str(tmp_path / "missing.pem")}},
    )
    result = subprocess.run(
        [TWISTD, "--pidfile=", "-n", "novnc", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"{config}: [upstream] ca_file: cannot read" in result.stderr, result.stderr
