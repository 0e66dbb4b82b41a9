"""haproxy: listen endpoints accept PROXY headers only from [novnc] proxy_protocol_from."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from twisted_novnc.front.forwarded import parse_networks
from twisted_novnc.processes.listeners import PeerCheckingFactory, listen_endpoint

ALLOWED = parse_networks(["10.0.0.0/8"])


class Peer(Protocol):
    """Records the peer it is told about, after the PROXY header."""

    peer: Any = None
    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.peer = self.transport.getPeer()
        self.received += data


def _listen(description: str, reactor: MemoryReactorClock) -> Any:
    endpoint = listen_endpoint(reactor, description, ALLOWED, reactor)
    endpoint.listen(Factory.forProtocol(Peer))
    return reactor.tcpServers[-1][1]


def _events() -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: globalLogPublisher.removeObserver(events.append)


def test_peer_outside_allowlist_is_closed_at_accept():
    """A haproxy: listener builds no protocol for a peer outside proxy_protocol_from (the
    port closes the socket), before any PROXY header is read; the refusal is logged."""
    reactor = MemoryReactorClock()
    factory = _listen("haproxy:tcp:6080:interface=127.0.0.1", reactor)
    assert isinstance(factory, PeerCheckingFactory)
    events, stop = _events()
    try:
        assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4711)) is None
    finally:
        stop()
    assert factory.refused == 1
    assert any("proxy_protocol_from" in e.get("log_format", "") and e.get("peer") == "192.0.2.1"
               for e in events)


def test_peer_inside_allowlist_is_believed():
    """From an allowed peer, the PROXY header's source is the client's address."""
    reactor = MemoryReactorClock()
    factory = _listen("haproxy:tcp:6080", reactor)
    wrapper = factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 4711))
    assert wrapper is not None
    wrapper.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 4711)))
    wrapper.dataReceived(b"PROXY TCP4 203.0.113.7 127.0.0.1 4711 6080\r\nhello")
    inner = wrapper.wrappedProtocol
    assert inner.received == b"hello"
    assert inner.peer.host == "203.0.113.7"
    wrapper.connectionLost(Failure(ConnectionError()))


def test_refusals_are_logged_at_most_once_a_second():
    """A flood of refused peers logs one line a second, counting them all."""
    reactor = MemoryReactorClock()
    factory = _listen("haproxy:tcp:6080", reactor)
    events, stop = _events()
    try:
        for _ in range(50):
            factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4711))
        reactor.advance(1)
        factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4711))
    finally:
        stop()
    lines = [e for e in events if "proxy_protocol_from" in e.get("log_format", "")]
    assert [e["refused"] for e in lines] == [1, 51]


def test_unix_peers_are_local():
    """A haproxy:unix: listener's peers have no address to check: the socket's mode guards."""
    factory = PeerCheckingFactory(Factory.forProtocol(Peer), (), MemoryReactorClock(), "x")
    assert factory.buildProtocol(UNIXAddress(None)) is not None


def test_other_endpoints_are_unchanged():
    """A listen string without haproxy: listens with the factory as it is."""
    reactor = MemoryReactorClock()
    factory = Factory.forProtocol(Peer)
    listen_endpoint(reactor, "tcp:6080", (), reactor).listen(factory)
    assert reactor.tcpServers[-1][1] is factory


def test_nested_haproxy_prefix_checks_the_real_peer():
    """haproxy:haproxy:tcp: still checks the accepted socket's peer."""
    reactor = MemoryReactorClock()
    factory = _listen("haproxy:haproxy:tcp:6080", reactor)
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4711)) is None
