"""Listening sockets made once by the supervisor and shared by its workers.

Both sides parse each ``[novnc] listen`` string with Twisted's own ``serverFromString``, so every
endpoint form Twisted knows (``tcp:``, ``tcp6:``, ``ssl:``, ``unix:``, ``haproxy:`` wrapping any
of them) works without parsing it here; only the reactor they are given differs:

- in the supervisor, :class:`ListeningReactor` lets the real reactor create the port, takes it
  out of the reactor (the supervisor never accepts) and remembers its descriptor, which the
  supervisor hands to every worker;
- in a worker, :class:`AdoptingReactor` answers the same ``listenTCP``/``listenSSL``/
  ``listenUNIX`` call by adopting the inherited descriptor instead (wrapping the factory in TLS
  for ``ssl:``, as the real ``listenSSL`` does), so wrappers like ``haproxy:`` apply as usual.

Every process then accepts from the same kernel socket: whichever worker is free takes the next
connection, and a worker that dies leaves the socket (and its backlog) to the others.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_novnc._compat.twisted import adopt_shared_port, keep_socket_open_on_close
from twisted_novnc.reactors import IDaemonReactor


class NotSharable(Exception):
    """A listen string whose socket the supervisor cannot hand to its workers."""


@attrs.frozen
class SharedSocket:
    """One listening socket as a worker receives it: its listen string, descriptor and family."""

    description: str
    fd: int
    family: int


class _ReactorProxy:
    """Everything not overridden goes to the real reactor."""

    def __init__(self, reactor: IDaemonReactor) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class ListeningReactor(_ReactorProxy):
    """The supervisor's reactor for one listen string: creates the port, never accepts on it."""

    def __init__(self, reactor: IDaemonReactor) -> None:
        super().__init__(reactor)
        self.port: Any = None
        self.family: int | None = None

    def _keep(self, port: Any, family: int) -> Any:
        port.stopReading()
        # Closing this copy at shutdown must not shut the socket down: that would end every
        # worker's accepts at once, mid-drain.
        keep_socket_open_on_close(port)
        self.port, self.family = port, family
        return port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening: Any = self._reactor.listenTCP(port, factory, backlog, interface)  # a tcp.Port
        return self._keep(listening, listening.addressFamily)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
        interface: str = "",
    ) -> Any:
        # The certificate was loaded (and so checked) by the endpoint parser; TLS itself only
        # ever happens in the workers.
        listening: Any = self._reactor.listenTCP(port, factory, backlog, interface)  # a tcp.Port
        return self._keep(listening, listening.addressFamily)

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        listening = self._reactor.listenUNIX(address, factory, backlog, mode, bool(wantPID))
        return self._keep(listening, socket.AF_UNIX)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> Any:
        # systemd: endpoints; a worker could not parse them again (LISTEN_PID names the
        # supervisor), so config.py refuses them with workers; this is the backstop.
        raise NotSharable("an inherited (systemd:) socket cannot be shared with [novnc] workers")

    def shared(self, description: str) -> SharedSocket:
        """What a worker needs to adopt this socket (once listening has succeeded)."""
        if self.port is None or self.family is None:
            raise NotSharable(f"{description!r} did not listen through this reactor")
        return SharedSocket(description, self.port.fileno(), self.family)


class AdoptingReactor(_ReactorProxy):
    """A worker's reactor for one listen string: adopts the supervisor's socket for it."""

    def __init__(
        self, reactor: IDaemonReactor, shared: SharedSocket, close: Callable[[int], None] = os.close
    ) -> None:
        super().__init__(reactor)
        self.shared = shared
        self.port: Any = None
        self._close = close

    def _adopt(self, factory: Any) -> Any:
        if self.port is not None:
            raise RuntimeError(f"{self.shared.description!r} listened twice")
        fd, family = self.shared.fd, self.shared.family
        # Each worker accepts its fair share; no worker's stop disturbs the shared socket.
        port = adopt_shared_port(self._reactor, fd, family, factory)
        # Adopting duplicated the descriptor; the inherited one is not needed any more.
        self._close(fd)
        self.port = port
        return port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return self._adopt(factory)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,
        interface: str = "",
    ) -> Any:
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        return self._adopt(factory)
