"""Connecting to the VM: a target in, a connected, paused peer out.

The VNC server speaks first; its banner must wait until the browser's WebSocket is open, so the
upstream transport is paused from the moment it connects until the relay starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from .backoff import jittered_backoff
from .errors import Refusal, Refused
from .relay import Relay
from .session import Target

_DONE = Failure(error.ConnectionDone())

KEEPALIVE = [
    (getattr(socket, name), value)
    for name, value in [("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)]
    if hasattr(socket, name)
]


class TCPUpstream(Protocol):
    """The VM side of a relay over raw TCP."""

    # A connected TCP transport: ITCPTransport and IPushProducer, which typing cannot join.
    transport: Any
    relay: Relay | None = None
    _closing: bool = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.setTcpNoDelay(True)
        # A VM that vanishes without a FIN or RST is noticed in about 20 s, as a dead VM (4502).
        self.transport.setTcpKeepAlive(True)
        sock = self.transport.getHandle()
        for option, value in KEEPALIVE:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    # Peer
    @property
    def producer(self) -> IPushProducer:
        return self.transport

    @property
    def consumer(self) -> IConsumer:
        return self.transport

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        self._closing = True
        self.transport.loseConnection()

    def attach(self, relay: Relay) -> None:
        """Start delivering the VM's bytes (held since connect) to the relay."""
        self.relay = relay
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_vm(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.relay is not None:
            self.relay.vm_gone(clean=reason.check(error.ConnectionDone) is not None)


#: One connection attempt never waits longer than this, so a retry can follow.
ATTEMPT_TIMEOUT = 5.0


def connect_tcp(
    reactor: Any,
    target: Target,
    timeout: float,
    retry: bool = False,
    make_protocol: Callable[[], Any] = TCPUpstream,
    ready: Callable[[Any], Any] = lambda protocol: protocol,
) -> Deferred[Any]:
    """Open a TCP connection to the target within ``timeout`` seconds.

    ``make_protocol`` builds the protocol for each attempt, and ``ready`` turns a connected one
    into the peer (or a Deferred of it): the WebSocket upstream waits for its handshake.

    With ``retry``, a VM that refuses (still booting) is tried again with capped backoff until
    the time is up.  Failures become :class:`Refused` (4502).  Cancelling stops everything.
    """
    address = ipaddress.ip_address(target.host)
    endpoint_type = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    deadline = reactor.seconds() + timeout
    delays = jittered_backoff(0.1, 1.0)
    next(delays)  # the first attempt is immediate
    current: list[Deferred[Any] | Any] = []
    cancelled: list[bool] = []

    def attempt() -> None:
        remaining = deadline - reactor.seconds()
        per_try = max(0.1, min(ATTEMPT_TIMEOUT, remaining))
        endpoint = endpoint_type(reactor, target.host, target.port, timeout=per_try)
        # The endpoint's timeout is whole seconds at best; bound the attempt ourselves too.
        d = connectProtocol(endpoint, make_protocol()).addCallback(ready)
        d.addTimeout(per_try, reactor)
        current[:] = [d]
        d.addCallbacks(connected, failed)

    def connected(upstream: Any) -> None:
        current.clear()
        result.callback(upstream)

    def failed(f: Failure) -> None:
        current.clear()
        if cancelled:
            return
        remaining = deadline - reactor.seconds()
        delay = next(delays)
        retryable = f.check(error.ConnectionRefusedError, error.TimeoutError, TimeoutError)
        if retry and retryable and remaining > delay:
            current[:] = [reactor.callLater(delay, attempt)]
            return
        if f.check(Refused):
            result.errback(f)
            return
        message = f.getErrorMessage()
        result.errback(Refused(Refusal.VM_UNREACHABLE, f"{target.host}:{target.port}: {message}"))

    def cancel(_: Deferred[Any]) -> None:
        cancelled.append(True)
        for pending in current:
            if isinstance(pending, Deferred) or pending.active():
                pending.cancel()
        current.clear()

    result: Deferred[Any] = Deferred(cancel)
    attempt()
    return result


class WebSocketUpstream(WebSocketClientProtocol):
    """The VM side of a relay over a WebSocket to a websockify on the VM."""

    relay: Relay | None = None

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[WebSocketUpstream] = Deferred()
        self._held: list[bytes] = []

    def onOpen(self) -> None:
        # Like the TCP upstream: nothing is read until the browser's side is open too.
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay is None:
            self._held.append(payload)  # parsed with the 101, before attach
        else:
            self.relay.from_vm(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(
                Refused(Refusal.VM_UNREACHABLE, f"upstream WebSocket handshake failed: {reason}")
            )
        elif self.relay is not None:
            self.relay.vm_gone(clean=wasClean and code in (1000, 1001, None))

    # Peer
    @property
    def producer(self) -> IPushProducer:
        return self.transport  # type: ignore[return-value]

    @property
    def consumer(self) -> IConsumer:
        return self.transport  # type: ignore[return-value]

    def send(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def close(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, reason[:100])
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def attach(self, relay: Relay) -> None:
        self.relay = relay
        held, self._held = self._held, []
        for payload in held:
            relay.from_vm(payload)
        self.transport.resumeProducing()  # type: ignore[union-attr]


def connect_websocket(
    reactor: Any,
    target: Target,
    timeout: float,
    suffix: str,
    query: str,
    retry: bool = False,
    max_message_size: int = 1024 * 1024,
) -> Deferred[WebSocketUpstream]:
    """Open ``ws://host:port/<suffix>?<query>`` with subprotocol ``binary``; 4502 on failure."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    url = f"ws://{host}:{target.port}/{suffix}" + (f"?{query}" if query else "")
    factory = WebSocketClientFactory(url, protocols=["binary"])
    factory.protocol = WebSocketUpstream
    factory.setProtocolOptions(
        openHandshakeTimeout=0,  # bounded by our own deadline
        maxFramePayloadSize=16 * max_message_size,
        maxMessagePayloadSize=16 * max_message_size,
        failByDrop=False,
        perMessageCompressionOffers=[],
    )
    factory.noisy = False
    return connect_tcp(
        reactor, target, timeout, retry,
        make_protocol=lambda: factory.buildProtocol(None),
        ready=lambda protocol: protocol.opened,
    )
