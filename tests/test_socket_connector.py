"""SocketConnector: a TCP connect on a socket, with real sockets on 127.0.0.1 (and a fake
reactor where an outcome must be held back: a timeout, a cancel)."""

from __future__ import annotations

import errno
import socket

import pytest
import pytest_twisted
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.relay import upstream
from twisted_novnc.relay.sending import send_now
from twisted_novnc.relay.upstream import SocketConnector, connect_tcp, dial
from twisted_novnc.session import Target


class Recorder(ClientFactory):
    """What a Connector tells its factory: the protocol it built, or why it failed."""

    noisy = False

    def __init__(self) -> None:
        self.built: list[object] = []
        self.reason = None
        self.failed: Deferred[None] = Deferred()
        self.connected: Deferred[Protocol] = Deferred()

    def buildProtocol(self, addr):
        self.built.append(addr)
        protocol = Protocol()
        protocol.connectionMade = lambda: self.connected.callback(protocol)  # type: ignore
        return protocol

    def clientConnectionFailed(self, connector, reason) -> None:
        self.reason = reason
        self.failed.callback(None)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, noted, closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class HeldReactor:
    """A reactor that never reports the socket writable: the connect stays in progress."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.writers: set[object] = set()

    def addWriter(self, writer) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer) -> None:
        self.writers.discard(writer)

    def callLater(self, *args, **kwargs):
        return self.clock.callLater(*args, **kwargs)


@pytest_twisted.inlineCallbacks
def test_connects_and_the_transport_writes_through():
    """The factory gets the destination and a protocol on a plain TCP transport whose peer is
    the target; send_now writes through it."""
    received: Deferred[bytes] = Deferred()

    class Reader(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.callback(data)

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Reader)
    )
    try:
        factory = Recorder()
        connector = dial(reactor, "127.0.0.1", port.getHost().port, factory, 5)
        assert isinstance(connector, SocketConnector)
        protocol = yield factory.connected
        assert factory.built[0].port == port.getHost().port
        peer = protocol.transport.getPeer()
        assert (peer.host, peer.port) == ("127.0.0.1", port.getHost().port)
        assert repr(protocol.transport) == f"<Protocol to 127.0.0.1:{port.getHost().port}>"
        assert "bufferSize" not in vars(protocol.transport)  # the relay's sizes, by class
        send_now(protocol.transport, b"head", b"-body")
        assert (yield received) == b"head-body"
        assert not factory.failed.called
        protocol.transport.loseConnection()
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_refused_is_connection_refused():
    """Nothing listening: the factory hears ConnectionRefusedError, as from connectTCP."""
    factory = Recorder()
    dial(reactor, "127.0.0.1", closed_port(), factory, 5)
    yield factory.failed
    assert factory.reason.check(error.ConnectionRefusedError)
    assert not factory.built


def test_a_loopback_connect_is_done_at_start():
    """On loopback the handshake is over when ``connect()`` returns: the protocol is built and
    connected in ``start``, with no writer registered and no timer made."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    factory = Recorder()
    connector = SocketConnector(reactor, "127.0.0.1", listener.getsockname()[1], factory, 2.0)
    try:
        connector.start()
        protocol = factory.connected.result
        assert factory.built[0].port == listener.getsockname()[1]
        assert connector not in reactor.getWriters() and connector._timer is None
        assert not factory.failed.called
        protocol.transport.loseConnection()
    finally:
        listener.close()


def test_a_loopback_refusal_is_known_at_start():
    """Nothing listening on loopback: the refusal is known when ``start`` returns."""
    held, factory = HeldReactor(), Recorder()
    SocketConnector(held, "127.0.0.1", closed_port(), factory, 2.0).start()
    assert factory.reason.check(error.ConnectionRefusedError)
    assert held.writers == set() and held.clock.getDelayedCalls() == []


@pytest.fixture
def held_attempt():
    """A connect to a listener on 127.0.0.1 whose accept queue is full (so its handshake stays
    in progress), started on a HeldReactor: the reactor, the factory and the connector, with
    a 2 s timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=5)  # the queue's one
    held, factory = HeldReactor(), Recorder()
    connector = SocketConnector(held, "127.0.0.1", listener.getsockname()[1], factory, 2.0)
    connector.start()
    try:
        yield held, factory, connector
    finally:
        connector.stopConnecting()
        filler.close()
        listener.close()


def test_timeout_closes_the_socket(held_attempt):
    """A connect that never completes fails with TimeoutError at its timeout, and lets go of
    its socket and its place among the reactor's writers."""
    held, factory, connector = held_attempt
    assert held.writers == {connector} and connector.fileno() != -1
    held.clock.advance(1.9)
    assert not factory.failed.called
    held.clock.advance(0.2)
    assert factory.reason.check(error.TimeoutError)
    assert held.writers == set() and connector.fileno() == -1


def test_stop_connecting_is_a_user_error_and_cancels_the_timer(held_attempt):
    """stopConnecting (a cancelled attempt) reports UserError once; its timer never fires."""
    held, factory, connector = held_attempt
    connector.stopConnecting()
    assert factory.reason.check(error.UserError)
    assert held.writers == set() and connector.fileno() == -1
    assert held.clock.getDelayedCalls() == []
    connector.stopConnecting()  # a second time: nothing more
    assert factory.reason.check(error.UserError)


def test_out_of_descriptors_is_4503(monkeypatch: pytest.MonkeyPatch):
    """A socket that cannot be made for lack of descriptors: ConnectError carrying EMFILE,
    which connect_tcp turns into 4503 "proxy at capacity", not 4502."""

    def no_descriptors(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(upstream.socket, "socket", no_descriptors)
    d = connect_tcp(reactor, Target("s1", "127.0.0.1", 5900), 5, retry=True)
    refused = d.result
    assert refused.check(Refused) and refused.value.refusal is Refusal.AT_CAPACITY
    d.addErrback(lambda f: None)


def test_fake_reactors_get_connect_tcp():
    """On a MemoryReactor (the retry logic's unit tests) dial records a connectTCP instead."""
    fake = MemoryReactorClock()
    factory = Recorder()
    dial(fake, "10.0.0.5", 5900, factory, 5)
    assert fake.tcpClients[0][:2] == ("10.0.0.5", 5900)


@pytest_twisted.inlineCallbacks
def test_upstream_sockets_have_no_nagle_and_keepalives():
    """A connected upstream socket sends at once and probes a silent VM: TCP_NODELAY, and
    keepalives after 10 s idle, every 3 s, 3 probes (a vanished VM is noticed in ~20 s)."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    try:
        peer = yield connect_tcp(reactor, Target("s1", "127.0.0.1", port.getHost().port), 5)
        sock = peer.transport.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        peer.transport.loseConnection()
    finally:
        yield port.stopListening()
