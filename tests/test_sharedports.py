"""Listening sockets made by the supervisor and adopted by workers: every endpoint form, and
closing one copy never disturbs the others."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import pytest_twisted
import twisted.test
from twisted.internet import defer, reactor
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    serverFromString,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_novnc._compat.twisted import FAIR_ACCEPTS
from twisted_novnc.processes.sharedports import (
    AdoptingReactor,
    ListeningReactor,
    NotSharable,
    SharedSocket,
)

SERVER_PEM = Path(twisted.test.__file__).parent / "server.pem"


class Recorded(Protocol):
    """Fires its factory's ``made`` Deferred once connected, ``lost`` once gone."""

    def connectionMade(self) -> None:
        self.factory.made.callback(self)

    def connectionLost(self, reason=None) -> None:
        self.factory.lost.callback(None)


def recording_factory() -> Factory:
    factory = Factory.forProtocol(Recorded)
    factory.made = defer.Deferred()
    factory.lost = defer.Deferred()
    return factory


class Client(Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def served(client_endpoint, factory):
    """Connect, wait until ``factory`` has the connection, then close both ends."""
    client = yield connectProtocol(client_endpoint, Client())
    server = yield factory.made.addTimeout(10, reactor)
    client.transport.loseConnection()
    yield client.lost
    yield factory.lost
    return server


@pytest_twisted.inlineCallbacks
def supervisor_listen(description: str):
    """Listen as the supervisor does: (its port, the socket as a worker would get it)."""
    sharing = ListeningReactor(reactor)
    port = yield serverFromString(sharing, description).listen(Factory.forProtocol(Protocol))
    shared = sharing.shared(description)
    # A worker inherits its own copy of the descriptor (here: a dup, in the same process).
    return port, SharedSocket(shared.description, os.dup(shared.fd), shared.family)


@pytest_twisted.inlineCallbacks
def test_supervisor_never_accepts_and_worker_serves():
    """The supervisor's port is out of the reactor; a worker adopting its socket serves."""
    port, shared = yield supervisor_listen("tcp:0:interface=127.0.0.1")
    assert shared.family == socket.AF_INET
    assert port not in reactor.getReaders()
    factory = recording_factory()
    adopted = yield serverFromString(AdoptingReactor(reactor, shared), shared.description).listen(
        factory
    )
    assert adopted.getHost().port == port.getHost().port
    yield served(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), factory)
    yield adopted.stopListening()
    yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_supervisor_closing_its_copy_leaves_workers_accepting():
    """Closing the supervisor's copy (at shutdown) does not shut the socket down under the
    workers: Twisted would otherwise shutdown() it, and every copy's accept would fail."""
    port, shared = yield supervisor_listen("tcp:0:interface=127.0.0.1")
    number = port.getHost().port
    factory = recording_factory()
    adopted = yield serverFromString(AdoptingReactor(reactor, shared), shared.description).listen(
        factory
    )
    yield port.stopListening()
    yield served(TCP4ClientEndpoint(reactor, "127.0.0.1", number), factory)
    yield adopted.stopListening()


@pytest_twisted.inlineCallbacks
def test_two_workers_share_one_socket():
    """Two adopters of one socket both accept from it; one stopping leaves the other serving."""
    port, first = yield supervisor_listen("tcp:0:interface=127.0.0.1")
    second = SharedSocket(first.description, os.dup(first.fd), first.family)
    one, two = recording_factory(), recording_factory()
    a = yield serverFromString(AdoptingReactor(reactor, first), first.description).listen(one)
    b = yield serverFromString(AdoptingReactor(reactor, second), second.description).listen(two)
    yield a.stopListening()
    yield served(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), two)
    yield b.stopListening()
    yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_unix_socket_file_outlives_a_worker(tmp_path):
    """A worker's UNIX port keeps the file's mode, and stopping leaves the socket and its file
    (the supervisor's) in place, so the other workers stay reachable; the supervisor's own
    port removes the file at the end."""
    path = tmp_path / "novnc.sock"
    port, shared = yield supervisor_listen(f"unix:{path}:mode=600")
    assert shared.family == socket.AF_UNIX
    factory, other = recording_factory(), recording_factory()
    worker = yield serverFromString(AdoptingReactor(reactor, shared), shared.description).listen(
        factory
    )
    second = SharedSocket(shared.description, os.dup(port.fileno()), socket.AF_UNIX)
    survivor = yield serverFromString(
        AdoptingReactor(reactor, second), second.description
    ).listen(other)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # not widened by the workers
    yield worker.stopListening()
    assert path.exists()
    yield served(UNIXClientEndpoint(reactor, str(path)), other)
    yield survivor.stopListening()
    yield port.stopListening()
    assert not path.exists()


def test_inherited_descriptor_is_closed_once_adopted():
    """The worker closes the inherited descriptor after adopting it (adopting duplicated it)."""
    closed: list[int] = []
    memory = MemoryReactor()
    shared = SharedSocket("tcp:6080", 7, socket.AF_INET)
    serverFromString(AdoptingReactor(memory, shared, close=closed.append), "tcp:6080").listen(
        Factory.forProtocol(Protocol)
    )
    assert closed == [7] and memory.adoptedPorts[0][:2] == (7, socket.AF_INET)


def test_haproxy_wrapping_applies_in_workers():
    """haproxy:tcp: adopts the socket with the PROXY-protocol wrapper around the factory."""
    memory = MemoryReactor()
    shared = SharedSocket("haproxy:tcp:6080", 9, socket.AF_INET)
    factory = Factory.forProtocol(Protocol)
    serverFromString(AdoptingReactor(memory, shared, close=lambda fd: None), shared.description)\
        .listen(factory)
    adopted = memory.adoptedPorts[0][2]
    assert isinstance(adopted, HAProxyWrappingFactory) and adopted.wrappedFactory is factory


def test_ssl_is_terminated_in_workers():
    """ssl: adopts the socket with TLS around the factory, as the reactor's listenSSL would."""
    memory = MemoryReactor()
    description = f"ssl:6443:privateKey={SERVER_PEM}"
    shared = SharedSocket(description, 9, socket.AF_INET)
    factory = Factory.forProtocol(Protocol)
    serverFromString(AdoptingReactor(memory, shared, close=lambda fd: None), description).listen(
        factory
    )
    adopted = memory.adoptedPorts[0][2]
    assert isinstance(adopted, TLSMemoryBIOFactory) and adopted.wrappedFactory is factory


@pytest_twisted.inlineCallbacks
def test_supervisor_ssl_socket_is_plain_tcp():
    """The supervisor listens for ssl: without TLS (only workers ever accept); the certificate
    is still loaded, so a bad one stops start-up there."""
    port, shared = yield supervisor_listen(f"ssl:0:interface=127.0.0.1:privateKey={SERVER_PEM}")
    assert shared.family == socket.AF_INET and not isinstance(port.factory, TLSMemoryBIOFactory)
    os.close(shared.fd)
    yield port.stopListening()


def test_systemd_sockets_are_not_sharable():
    """An inherited socket (systemd:) cannot go to workers: a clear error, not a silent accept
    in the supervisor."""
    sharing = ListeningReactor(MemoryReactor())
    with pytest.raises(NotSharable):
        sharing.adoptStreamPort(3, socket.AF_INET, Factory())
    with pytest.raises(NotSharable):
        sharing.shared("systemd:domain=INET:index=0")


@pytest_twisted.inlineCallbacks
def test_adopted_tcp_port_accepts_one_connection_per_wakeup():
    """A worker's adopted TCP port accepts FAIR_ACCEPTS connections per wake-up, however
    Twisted scales its accept loop, so a burst is spread over the workers."""
    from twisted.internet import reactor as real

    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(8)
    listening.setblocking(False)
    shared = SharedSocket("tcp:0:interface=127.0.0.1", os.dup(listening.fileno()),
                          socket.AF_INET)
    adopting = AdoptingReactor(real, shared)
    port = adopting.listenTCP(0, Factory())
    try:
        assert port.numberAccepts == FAIR_ACCEPTS == 1
        port.numberAccepts += 20  # what Twisted does after a full accept loop
        assert port.numberAccepts == 1
        assert port.getHost().port == listening.getsockname()[1]
    finally:
        yield port.stopListening()
        listening.close()
