"""A listening endpoint as a service, that says where it listens once it does; and the
``haproxy:`` endpoints, whose PROXY headers only the allowed peers may send."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    ILoggingContext,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from zope.interface import implementer

from twisted_novnc._compat.twisted import (
    accept_into,
    keep_socket_open_on_close,
    raise_listen_errors,
    when_listening,
)
from twisted_novnc.front.forwarded import Network, peer_allowed, proxied_endpoint
from twisted_novnc.relay.sending import RelayTransport

_log = Logger()


class Stoppable(Protocol):
    """What ``on_port`` may hand back: something to stop when the listener stops."""

    def stop(self) -> None: ...


class ListenerService(StreamServerEndpointService):
    """A listening endpoint that says where it listens once it does.

    ``on_port`` sees the port once it listens (the descriptor-limit guard hooks in there).
    A ``relay`` listener accepts into :class:`RelayTransport` (the relay's buffer sizes).
    """

    def __init__(
        self,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        role: str = "",
        on_port: Callable[[IListeningPort], Stoppable | None] | None = None,
        verb: str = "listening on",
        relay: bool = False,
    ) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.role = role
        self.on_port = on_port
        self.verb = verb
        self.relay = relay
        self._guard: Stoppable | None = None
        #: The listening port, once it listens.
        self.port: Any = None
        raise_listen_errors(self)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        when_listening(self).addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        if port is None:
            return port
        self.port = port
        host = port.getHost()
        _log.info(
            "{role}{verb} {host}:{port} ({description})", event="listening",
            role=f"{self.role} " if self.role else "",
            verb=self.verb,
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
            description=self.description,
        )
        if self.relay:
            accept_into(port, RelayTransport)  # accepted connections: the relay's buffer sizes
        if self.on_port is not None:
            self._guard = self.on_port(port)
        return port

    def stop_accepting(self) -> None:
        """Accept nothing more here and leave the socket as it is (open, not shut down): a new
        generation of processes accepts on it now (processes/upgrade.py)."""
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self.port is not None:
            keep_socket_open_on_close(self.port)
            self.port.stopReading()

    def stopService(self) -> Deferred[None] | None:
        if self._guard is not None:
            self._guard.stop()
        return super().stopService()


def listen_endpoint(
    reactor: Any, description: str, proxy_from: tuple[Network, ...], clock: IReactorTime
) -> IStreamServerEndpoint:
    """``serverFromString(reactor, description)``, except that a ``haproxy:`` endpoint closes
    at accept every connection whose real peer is outside ``proxy_from`` (``[novnc]
    proxy_protocol_from``): otherwise any peer could name any client address in its PROXY
    header.

    Twisted's ``haproxy:`` parser wraps the endpoint under it with :func:`proxyEndpoint`;
    this does the same, with the check between the two: the check sees the accepted socket's
    own peer, before any PROXY header is read.
    """
    inner = proxied_endpoint(description)
    if inner is None:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return endpoint
    checked = PeersFrom(listen_endpoint(reactor, inner, proxy_from, clock), proxy_from, clock,
                        description)
    return proxyEndpoint(checked)


@implementer(IStreamServerEndpoint)
@attrs.frozen
class PeersFrom:
    """An endpoint whose connections from peers outside ``allowed`` are closed at accept."""

    endpoint: IStreamServerEndpoint
    allowed: tuple[Network, ...]
    clock: IReactorTime
    description: str

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(
            PeerCheckingFactory(protocolFactory, self.allowed, self.clock, self.description)
        )


@implementer(IProtocolFactory, ILoggingContext)
@attrs.define(eq=False)
class PeerCheckingFactory:
    """The wrapped factory's protocols, for allowed peers only; refusals logged once a second.

    Not a ``WrappingFactory``: the protocol it returns is the wrapped factory's own, so the
    connection's data path has no layer more.
    """

    wrapped: IProtocolFactory
    allowed: tuple[Network, ...]
    clock: IReactorTime
    description: str
    refused: int = 0
    _logged_at: float | None = None

    def buildProtocol(self, addr: IAddress) -> Any:
        host = getattr(addr, "host", None)
        if peer_allowed(host, self.allowed):
            return self.wrapped.buildProtocol(addr)
        self.refused += 1
        now = self.clock.seconds()
        if self._logged_at is None or now - self._logged_at >= 1:
            self._logged_at = now
            _log.warn(
                "closed a connection from {peer} on {description}: not in [novnc]"
                " proxy_protocol_from, so it may not send a PROXY header ({refused} so far)",
                event="proxy_header_refused",
                peer=host, description=self.description, refused=self.refused,
            )
        return None  # the port closes the socket

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def logPrefix(self) -> str:
        if ILoggingContext.providedBy(self.wrapped):
            prefix: str = self.wrapped.logPrefix()
            return prefix
        return self.wrapped.__class__.__name__
