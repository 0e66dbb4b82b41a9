"""Connecting to the VM: a target in, a connected, paused peer out.

The VNC server speaks first; its banner must wait until the browser's WebSocket is open, so the
upstream transport is paused from the moment it connects until the relay starts.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from .errors import Refusal, Refused
from .relay import Relay
from .session import Target

_DONE = Failure(error.ConnectionDone())


class TCPUpstream(Protocol):
    """The VM side of a relay over raw TCP."""

    # A connected TCP transport: ITCPTransport and IPushProducer, which typing cannot join.
    transport: Any
    relay: Relay | None = None
    _closing: bool = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

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


def connect_tcp(reactor: Any, target: Target, timeout: float) -> Deferred[TCPUpstream]:
    """Open a TCP connection to the target; failures become :class:`Refused` (4502)."""
    address = ipaddress.ip_address(target.host)
    endpoint_type = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
    endpoint = endpoint_type(reactor, target.host, target.port, timeout=max(1, int(timeout)))
    d = connectProtocol(endpoint, TCPUpstream())

    def unreachable(f: Failure) -> Failure:
        if f.check(error.ConnectError, error.TimeoutError, OSError):
            raise Refused(
                Refusal.VM_UNREACHABLE, f"{target.host}:{target.port}: {f.getErrorMessage()}"
            )
        return f

    return d.addErrback(unreachable)
