"""The login driver (twisted_novnc.vnc.login): the VM login machine on a real upstream
protocol over a StringTransport, with a Clock for its timeout."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.relay.relay import Relay
from twisted_novnc.relay.upstream import TCPUpstream
from twisted_novnc.session import Target, VNCCredentials
from twisted_novnc.testing import MemoryPeer
from twisted_novnc.vnc.login import AnonymousTLS, VeNCryptTLS, log_in, with_login
from twisted_novnc.vnc.vncauth import vnc_auth_response

PASSWORD = "pa55word"
CHALLENGE = bytes(range(16))
TARGET = Target("s1", "10.0.0.5", 5900)
OK = struct.pack("!I", 0)


def connected() -> tuple[TCPUpstream, StringTransport]:
    upstream = TCPUpstream()
    transport = StringTransport()
    upstream.makeConnection(transport)
    return upstream, transport


def start(clock: Clock) -> Any:
    upstream, transport = connected()
    d = log_in(upstream, VNCCredentials(PASSWORD), TARGET, clock, 10, None)
    return upstream, transport, d


def vncauth_until_result(upstream: TCPUpstream, transport: StringTransport) -> None:
    """The VM's part of RFB 3.8 with VNC Authentication, up to its SecurityResult."""
    upstream.dataReceived(b"RFB 003.008\n")
    upstream.dataReceived(b"\x01\x02")
    upstream.dataReceived(CHALLENGE)
    assert transport.value() == (
        b"RFB 003.008\n" + b"\x02" + vnc_auth_response(PASSWORD, CHALLENGE)
    )


def refusal_of(d: defer.Deferred[Any]) -> Refused:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1
    assert failures[0].check(Refused), failures[0]
    return failures[0].value


def test_vncauth_login_fires_with_the_upstream():
    """The VM says OK: the Deferred fires with the upstream, which records how it logged in."""
    clock = Clock()
    upstream, transport, d = start(clock)
    vncauth_until_result(upstream, transport)
    assert not d.called
    upstream.dataReceived(OK)
    results: list[Any] = []
    d.addCallback(results.append)
    assert results == [upstream]
    assert upstream.login.security == "VncAuth" and upstream.login.version == "3.8"
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == []  # the timeout is cancelled


def test_bytes_after_the_login_wait_for_the_relay():
    """What the VM sends after its SecurityResult (in the same read, or later) is held for
    the relay and delivered to it first, in order."""
    upstream, transport, d = start(Clock())
    vncauth_until_result(upstream, transport)
    upstream.dataReceived(OK + b"Server")
    upstream.dataReceived(b"Init")
    browser = MemoryPeer()
    relay = Relay("s1", browser=browser, vm=upstream)
    relay.start()
    upstream.attach(relay)
    assert browser.transport.value() == b"ServerInit"


def test_wrong_password_is_4520_and_closes_the_vm():
    """A failed SecurityResult: Refused 4520 with the VM's reason in the detail, and the
    VM's connection is closed; nothing is retried."""
    upstream, transport, d = start(Clock())
    vncauth_until_result(upstream, transport)
    reason = b"Authentication failed"
    upstream.dataReceived(struct.pack("!II", 1, len(reason)) + reason)
    refused = refusal_of(d)
    assert refused.refusal is Refusal.VM_CREDENTIALS_REFUSED
    assert "Authentication failed" in refused.detail
    assert PASSWORD not in str(refused)
    assert transport.disconnecting


def test_a_silent_vm_is_4522_at_the_timeout():
    """A VM that accepts the connection and says nothing: 4522 after handshake_timeout."""
    clock = Clock()
    upstream, transport, d = start(clock)
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    refused = refusal_of(d)
    assert refused.refusal is Refusal.VM_NOT_RFB
    assert "no RFB opening within 10s" in refused.detail
    assert transport.disconnecting


def test_a_vm_that_closes_during_the_login_is_4502():
    """The VM's connection lost mid-login: 4502 VM connection lost, saying where."""
    upstream, transport, d = start(Clock())
    upstream.dataReceived(b"RFB 003.008\n")
    upstream.connectionLost(Failure(ConnectionLost("reset")))
    refused = refusal_of(d)
    assert refused.refusal is Refusal.VM_LOST
    assert "the VM closed during" in refused.detail and "RFB opening" in refused.detail


def test_cancelling_closes_the_vm():
    """A browser that leaves cancels the login: the VM's connection is closed."""
    upstream, transport, d = start(Clock())
    upstream.dataReceived(b"RFB 003.008\n")
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    assert transport.disconnecting
    upstream.connectionLost(Failure(ConnectionDone()))


def test_an_http_server_is_not_rfb():
    """A VM port that answers like a web server: 4522, at its first bytes."""
    upstream, transport, d = start(Clock())
    upstream.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert refusal_of(d).refusal is Refusal.VM_NOT_RFB


def test_without_tls_vencrypt_tls_subtypes_are_never_chosen():
    """No TLS possible (a WebSocket upstream): a VM offering only VeNCrypt TLS schemes gets
    no TLS request; the login fails with 4521 or goes on without TLS, never starts it."""
    upstream, transport, d = start(Clock())
    upstream.dataReceived(b"RFB 003.008\n\x01\x13")
    upstream.dataReceived(b"\x00\x02\x00" + b"\x01" + struct.pack("!I", 258))
    assert not upstream.tls
    assert refusal_of(d).refusal is Refusal.VM_NO_SECURITY_TYPE


def test_anonymous_tls_offers_anonymous_ciphers_on_tls_1_2():
    """VeNCrypt's TLSVnc needs anonymous Diffie-Hellman, which OpenSSL gives only at security
    level 0 and TLS 1.2."""
    connection = AnonymousTLS().clientConnectionForTLS(object())
    ciphers = connection.get_cipher_list()
    assert any(c.startswith(("ADH-", "AECDH-")) for c in ciphers), ciphers
    assert isinstance(connection, SSL.Connection)


# -- with_login: whose credentials, and what is counted --------------------------------------


class Connects:
    """A connector that hands out fresh upstreams on StringTransports."""

    def __init__(self) -> None:
        self.made: list[tuple[TCPUpstream, StringTransport]] = []

    def __call__(self, target: Target, timeout: float, suffix: str, query: str) -> Any:
        self.made.append(connected())
        return defer.succeed(self.made[-1][0])


def login_through(shared: VNCCredentials | None, target: Target) -> Any:
    connects, counted = Connects(), []
    connect = with_login(
        connects, Clock(), 10, shared, VeNCryptTLS(AnonymousTLS(), lambda host: None),
        counted.append,
    )
    d = connect(target, 5, "", "")
    upstream, transport = connects.made[0]
    upstream.dataReceived(b"RFB 003.008\n\x01\x02" + CHALLENGE)
    return d, transport, counted, upstream


@pytest.mark.parametrize(
    ("shared", "row", "used"),
    [
        (VNCCredentials("from-file"), VNCCredentials(PASSWORD), PASSWORD),
        (VNCCredentials("from-file"), None, "from-file"),
        (VNCCredentials("from-file"), VNCCredentials(None, "user"), "from-file"),
        (None, VNCCredentials(PASSWORD), PASSWORD),
    ],
)
def test_the_rows_password_wins_over_the_files(shared, row, used):
    """The row's password when it has one, else [vnc] password_file's."""
    target = Target("s1", "10.0.0.5", 5900, credentials=row)
    d, transport, counted, upstream = login_through(shared, target)
    assert transport.value().endswith(vnc_auth_response(used, CHALLENGE))
    upstream.dataReceived(OK)
    assert d.called and counted == ["ok"]


def test_failures_are_counted_by_result():
    """A refused login counts as credentials_refused; the Deferred fails with 4520."""
    target = Target("s1", "10.0.0.5", 5900, credentials=VNCCredentials(PASSWORD))
    d, transport, counted, upstream = login_through(None, target)
    upstream.dataReceived(struct.pack("!II", 1, 0))
    assert refusal_of(d).refusal is Refusal.VM_CREDENTIALS_REFUSED
    assert counted == ["credentials_refused"]


def test_credentials_never_show_in_a_repr():
    """The credentials, the row and the target hide the password and the user name."""
    credentials = VNCCredentials("hunter2", "alice")
    target = Target("s1", "10.0.0.5", 5900, credentials=credentials)
    for thing in (credentials, target):
        assert "hunter2" not in repr(thing) and "alice" not in repr(thing)
