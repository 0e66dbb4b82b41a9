"""A listening endpoint as a service, that says where it listens once it does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from twisted_novnc._compat.twisted import accept_into, raise_listen_errors, when_listening
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
        raise_listen_errors(self)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        when_listening(self).addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        if port is None:
            return port
        host = port.getHost()
        _log.info(
            "{role}{verb} {host}:{port} ({description})",
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

    def stopService(self) -> Deferred[None] | None:
        if self._guard is not None:
            self._guard.stop()
        return super().stopService()
