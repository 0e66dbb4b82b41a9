"""connect_tcp on a MemoryReactorClock: retries, deadlines and cancellation, no sockets; the
WebSocket upstream's flow control over a StringTransport."""

from __future__ import annotations

import base64
import errno
import hashlib
import re
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twisted_novnc.config import parse_config
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.relay.relay import Relay
from twisted_novnc.relay.upstream import (
    HOLD_LIMIT,
    TCPUpstream,
    WebSocketUpstream,
    connect_tcp,
    connect_websocket,
    upstream_connector,
)
from twisted_novnc.session import Target
from twisted_novnc.testing import MemoryPeer

TARGET = Target("s1", "10.0.0.5", 5900)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _refuse(reactor: MemoryReactorClock, index: int) -> None:
    host, port, factory, timeout, _ = reactor.tcpClients[index]
    connector = reactor.connectors[index]
    factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))


def test_connected_peer_holds_early_bytes_until_the_relay_starts():
    """A made connection yields the TCPUpstream at once; what the VM sends before the relay is
    attached is held (reading pauses past HOLD_LIMIT) and delivered first, in order."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 10)
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("10.0.0.5", 5900, 5.0)
    protocol = factory.buildProtocol(None)
    assert not d.called  # not before connectionMade
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert isinstance(protocol, TCPUpstream)
    assert d.result is protocol
    assert transport.producerState == "producing"  # the attach follows in the same call
    protocol.dataReceived(b"RFB 003.008\n")
    protocol.dataReceived(b"x" * HOLD_LIMIT)
    assert transport.producerState == "paused"
    browser = MemoryPeer()
    relay = Relay("s1", browser=browser, vm=protocol)
    protocol.attach(relay)
    assert transport.producerState == "producing"
    protocol.dataReceived(b"after")
    assert browser.transport.value() == b"RFB 003.008\n" + b"x" * HOLD_LIMIT + b"after"


def test_refused_is_retried_until_the_deadline_then_4502():
    """With retry, a refusing VM (still booting) is tried again with backoff; then 4502."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 3, retry=True)
    attempts = 0
    while len(reactor.tcpClients) > attempts:
        _refuse(reactor, attempts)
        attempts += 1
        reactor.advance(1.0)
    assert attempts >= 3
    failure = d.result
    assert isinstance(failure, Failure) and failure.check(Refused)
    assert failure.value.refusal.close_code == 4502
    d.addErrback(lambda f: None)


def test_refused_without_retry_fails_at_once():
    """Without retry the first refusal is the answer."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 10)
    _refuse(reactor, 0)
    assert d.result.check(Refused)
    assert len(reactor.tcpClients) == 1
    d.addErrback(lambda f: None)


def test_cancel_while_connecting_stops_the_connector():
    """Cancelling before the TCP connect completes stops that connect; no retry follows."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 10, retry=True)
    d.cancel()
    assert reactor.connectors[0].stoppedConnecting
    assert d.result.check(CancelledError)
    d.addErrback(lambda f: None)
    reactor.advance(10)
    assert len(reactor.tcpClients) == 1


def test_cancel_after_connect_aborts_the_connection():
    """Cancelling once connected but not yet ready (a TLS handshake pending) aborts it."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 10, ready=lambda p: p.handshake,
                    make_protocol=lambda: TCPUpstream(tls=True))
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert not d.called
    d.cancel()
    assert transport.disconnecting
    d.addErrback(lambda f: None)


def test_an_attempt_that_hangs_times_out():
    """An attempt with a handshake after the connect (TLS here) whose connect neither succeeds
    nor fails is given up after the deadline (4502)."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 2, ready=lambda p: p.handshake,
                    make_protocol=lambda: TCPUpstream(tls=True))
    reactor.advance(2.5)
    assert reactor.connectors[0].stoppedConnecting
    assert d.result.check(Refused)
    d.addErrback(lambda f: None)


def test_a_plain_connect_is_bounded_by_its_connector():
    """Plain TCP is ready at connect, so its attempt has no timer of its own: the connector's
    timeout (the deadline, at most ATTEMPT_TIMEOUT) ends it, with 4502."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 2)
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert timeout == 2.0
    assert reactor.getDelayedCalls() == []
    factory.clientConnectionFailed(reactor.connectors[0], Failure(error.TimeoutError()))
    assert d.result.check(Refused) and d.result.value.refusal.close_code == 4502
    d.addErrback(lambda f: None)


def test_out_of_descriptors_is_the_proxys_capacity_not_the_vm():
    """A socket that cannot be made for lack of descriptors is 4503 "proxy at capacity"
    (never 4502, which would blame the VM), and is not retried."""
    reactor = MemoryReactorClock()
    d = connect_tcp(reactor, TARGET, 10, retry=True)
    _, _, factory, _, _ = reactor.tcpClients[0]
    failure = Failure(error.getConnectError(OSError(errno.EMFILE, "Too many open files")))
    factory.clientConnectionFailed(reactor.connectors[0], failure)
    refused = d.result
    assert refused.check(Refused) and refused.value.refusal is Refusal.AT_CAPACITY
    assert refused.value.refusal.close_code == 4503
    assert len(reactor.tcpClients) == 1
    d.addErrback(lambda f: None)


def _connector_attempt(**upstream: str) -> tuple[str, int, object]:
    """The (host, port, protocol) of the first attempt the configured connector makes."""
    settings = parse_config(
        "[upstream]\n" + "".join(f"{k} = {v}\n" for k, v in upstream.items()), "<test>"
    ).upstream
    reactor = MemoryReactorClock()
    connect = upstream_connector(settings, reactor, 1024 * 1024, fast=False, write_timeout=7)
    connect(Target("s1", "10.0.0.5", 5900), 10.0, "sub/path", "a=1")
    host, port, factory = reactor.tcpClients[0][:3]
    return host, port, factory.buildProtocol(None)


def test_upstream_connector_chooses_tcp_or_websocket_and_the_port():
    """[upstream] mode picks the VM side's protocol, and [upstream] port overrides the row's."""
    host, port, protocol = _connector_attempt()
    assert (host, port) == ("10.0.0.5", 5900) and isinstance(protocol, TCPUpstream)
    host, port, protocol = _connector_attempt(mode="websocket", port="6080")
    assert (host, port) == ("10.0.0.5", 6080) and isinstance(protocol, WebSocketUpstream)
    assert protocol.factory.url == "ws://10.0.0.5:6080/sub/path?a=1"
    assert protocol.write_timeout == 7  # [novnc] write_timeout, for the VM's socket too


def _open_websocket(write_timeout: float = 30) -> tuple[MemoryReactorClock, Any, StringTransport]:
    """A WebSocketUpstream opened over a StringTransport (the 101 answered by hand)."""
    reactor = MemoryReactorClock()
    d = connect_websocket(reactor, TARGET, 10, "websockify", "", write_timeout=write_timeout)
    protocol = reactor.tcpClients[0][2].buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    (key,) = re.findall(rb"Sec-WebSocket-Key: (\S+)", transport.value(), re.IGNORECASE)
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    transport.clear()
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: binary\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    assert d.result is protocol
    return reactor, protocol, transport


def _relayed(protocol: Any) -> tuple[Relay, MemoryPeer]:
    browser = MemoryPeer()
    relay = Relay("s1", browser=browser, vm=protocol)
    relay.start()
    protocol.attach(relay)
    return relay, browser


def test_the_vm_socket_is_read_only_when_no_reason_holds():
    """The VM is not read until attach; then its full output pauses reading from it and the
    browser, the browser's back-pressure pauses it too, and it resumes only once both clear."""
    reactor, protocol, transport = _open_websocket()
    flow = transport.producer
    assert flow is protocol.consumer and transport.streaming
    assert transport.producerState == "paused"  # not before the relay starts
    relay, browser = _relayed(protocol)
    assert transport.producerState == "producing"
    flow.pauseProducing()  # the VM's write buffer passed its bound
    assert transport.producerState == "paused"
    assert browser.transport.producerState == "paused"  # the browser is not read either
    relay.browser.consumer.producer.pauseProducing()  # and the browser cannot take more
    flow.resumeProducing()
    assert browser.transport.producerState == "producing"
    assert transport.producerState == "paused", "resumed while the browser is still full"
    relay.browser.consumer.producer.resumeProducing()
    assert transport.producerState == "producing"


def test_a_vm_that_takes_nothing_is_dropped_after_write_timeout(logged):
    """A full write buffer the VM takes nothing of for write_timeout: its socket is aborted,
    the line names the session and the VM, and the browser gets 4502."""
    reactor, protocol, transport = _open_websocket(write_timeout=30)
    relay, browser = _relayed(protocol)
    transport.producer.pauseProducing()
    reactor.advance(29)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting
    assert any("dropping the VM of s1 at 10.0.0.5:5900: took no byte in 30" in text
               for _, text in logged)
    protocol.connectionLost(Failure(error.ConnectionAborted()))
    assert browser.closed == [(4502, "VM connection lost")]
    assert reactor.getDelayedCalls() == []


def test_dropping_the_vm_connection_detaches_its_flow():
    """Autobahn unregisters the transport's producer as it drops the connection: the flow is
    detached, or the transport would never close."""
    reactor, protocol, transport = _open_websocket(write_timeout=0)
    protocol.dropConnection(abort=False)
    assert transport.producer is None and transport.disconnecting
