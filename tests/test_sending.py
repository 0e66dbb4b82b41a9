"""send_now: bytes written at once when the socket takes them, queued in order when not."""

from __future__ import annotations

import functools
import hashlib
import os

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from twisted_novnc.relay.sending import RELAY_BUFFER_SIZE, send_now, tune_relay_transport


class _Server(Protocol):
    """One accepted connection, put in its port's queue; ``lost`` fires when it ends."""

    def __init__(self, accepted: DeferredQueue[_Server]) -> None:
        self.accepted = accepted
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.accepted.put(self)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


def listen(accepted: DeferredQueue[_Server]) -> Deferred:
    """A loopback port that puts each connection it accepts in ``accepted``."""
    return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(functools.partial(_Server, accepted))
    )



class Collector(Protocol):
    """Reads everything until the peer closes; starts paused so the sender's buffer fills."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0
        self.done: Deferred[None] = Deferred()
        self.connected_d: Deferred[Collector] = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


class Sender(Protocol):
    paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_order_survives_partial_writes_and_producer_is_paused():
    """Headers and payloads (bytes and bytearrays) arrive whole and in order even when the
    kernel takes only part of them; the registered producer is paused when the rest queues."""
    collector = Collector()
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: collector)
    )
    try:
        sender = Sender()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), sender
        )
        yield collector.connected_d
        transport = sender.transport
        tune_relay_transport(transport)
        assert transport.bufferSize == RELAY_BUFFER_SIZE
        transport.registerProducer(sender, True)
        expected = hashlib.sha256()
        total = 0
        for i in range(64):  # 64 x (header + 100 KiB): far more than the socket buffers take
            header = b"H%03d" % i
            payload = os.urandom(100 * 1024)
            send_now(transport, header, bytearray(payload) if i % 2 else payload)
            expected.update(header + payload)
            total += len(header) + len(payload)
        assert transport._tempDataLen or len(transport.dataBuffer) > transport.offset
        assert sender.paused
        transport.unregisterProducer()
        transport.loseConnection()
        collector.transport.resumeProducing()
        yield collector.done
        assert collector.count == total
        assert collector.digest.hexdigest() == expected.hexdigest()
    finally:
        yield port.stopListening()


def test_other_transports_get_plain_writes():
    """A transport that is not plain TCP (TLS, a wrapper, a test double) gets write()."""
    transport = StringTransport()
    send_now(transport, b"hd", bytearray(b"payload"))
    send_now(transport, b"", b"more")
    assert transport.value() == b"hdpayloadmore"


@pytest_twisted.inlineCallbacks
def test_close_now_sends_the_fin_before_the_next_turn():
    """close_now half-closes at once when nothing is queued, so the peer reads its end of file
    without waiting for the reactor's next turn; with bytes queued it leaves them to
    loseConnection, which sends them first."""
    import socket

    from twisted_novnc.relay.sending import close_now

    accepted: DeferredQueue[_Server] = DeferredQueue()
    port = yield listen(accepted)
    try:
        for queued in (b"", b"x" * 100):
            peer = socket.create_connection(("127.0.0.1", port.getHost().port))
            peer.settimeout(5)
            server = yield accepted.get()
            if queued:
                server.transport.write(queued)  # queued: Twisted writes on its next turn
            close_now(server.transport)
            if not queued:
                assert peer.recv(10) == b""  # the FIN came now: no reactor turn has run
                yield server.lost
                assert server.reason.check(ConnectionDone), server.reason  # a clean close
            else:
                peer.setblocking(False)
                try:
                    got = peer.recv(10)
                except BlockingIOError:
                    got = None
                assert got is None, "nothing may arrive, FIN included, before the queued bytes"
                yield server.lost  # Twisted flushed the queue, then closed
                peer.settimeout(5)
                assert peer.recv(200) == queued and peer.recv(10) == b""
            peer.close()
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_relay_transport_has_the_sizes_without_growing_each_instance():
    """A RelayTransport relays with the big buffers as class attributes (tuning adds nothing
    to the instance) and writes through like any TCP connection; a plain one is tuned."""
    from twisted_novnc.relay.sending import RelayTransport

    collector = Collector()
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: collector)
    )
    port.transport = RelayTransport  # as a relay listener accepts
    try:
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        yield collector.connected_d
        accepted = collector.transport
        assert type(accepted) is RelayTransport
        assert accepted.bufferSize == RELAY_BUFFER_SIZE
        tune_relay_transport(accepted)
        assert "bufferSize" not in vars(accepted) and "SEND_LIMIT" not in vars(accepted)
        assert repr(accepted).startswith("<Collector #")  # Twisted's own repstr
        tune_relay_transport(client.transport)  # a plain tcp.Client: tuned per instance
        assert vars(client.transport)["bufferSize"] == RELAY_BUFFER_SIZE
        collector.transport.resumeProducing()
        send_now(accepted, b"", b"ping")  # written through: a plain TCP transport
        assert accepted.dataBuffer == b"" and not accepted._tempDataBuffer
        client.transport.loseConnection()
        yield collector.done
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_relay_listeners_accept_into_relay_transports(tmp_path):
    """The browser-facing listeners accept into RelayTransport; others (admin) do not."""
    from twisted.internet import tcp, unix
    from twisted.internet.endpoints import serverFromString

    from twisted_novnc.processes.service import ListenerService
    from twisted_novnc.relay.sending import RelayTransport

    ports = []
    unix_socket = tmp_path / "relay.sock"
    for relay, description in ((True, "tcp:0:interface=127.0.0.1"),
                               (False, "tcp:0:interface=127.0.0.1"),
                               (True, f"unix:{unix_socket}")):
        service = ListenerService(description, serverFromString(reactor, description),
                                  Factory.forProtocol(Protocol), relay=relay)
        service.privilegedStartService()
        service.startService()
        port = yield service._waitingForPort
        ports.append((service, port))
    try:
        assert ports[0][1].transport is RelayTransport
        assert ports[1][1].transport is tcp.Server
        assert ports[2][1].transport is unix.Server  # a unix.Port is a tcp.Port too: untouched
    finally:
        for service, _ in ports:
            yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_a_reset_found_by_send_now_is_a_lost_connection():
    """A peer's reset that send_now's own send finds (and the kernel reports only once) ends the
    connection as lost, not as the clean end of file the next read would see: a VM's reset is
    4502, not 1000."""
    import socket
    import struct

    from twisted.internet.error import ConnectionLost

    accepted: DeferredQueue[_Server] = DeferredQueue()
    port = yield listen(accepted)
    try:
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        server = yield accepted.get()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset, delivered on loopback before close returns
        send_now(server.transport, b"", b"after the reset")  # its send finds the reset
        yield server.lost
        assert server.reason.check(ConnectionLost), server.reason
        assert not server.reason.check(ConnectionDone), server.reason
    finally:
        yield port.stopListening()
