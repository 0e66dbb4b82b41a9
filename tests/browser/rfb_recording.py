"""A TCP proxy in front of a VNC server that records what passes into a recording file
(format.py's encoders): what the server sent as ``D``, what the client sent as ``U``.

The player's own test of its input: a recording made without the daemon's recorder, of the
same bytes a browser receives when the proxy does not rewrite the handshake.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols import portforward

from twisted_novnc.recording.format import (
    DOWN,
    UP,
    Ending,
    Header,
    file_name,
    new_connection_id,
    record_head,
)


class _Upstream(portforward.ProxyClient):
    def dataReceived(self, data: bytes) -> None:
        self.peer.record(DOWN, data)
        super().dataReceived(data)


class _UpstreamFactory(portforward.ProxyClientFactory):
    protocol = _Upstream


class _Recorded(portforward.ProxyServer):
    clientProtocolFactory = _UpstreamFactory
    factory: RecordingProxy

    def connectionMade(self) -> None:
        self.started = reactor.seconds()
        connection = new_connection_id()
        self.path = self.factory.directory / file_name("recorded", self.started, connection)
        peer = self.transport.getPeer()
        header = Header("recorded", connection, getattr(peer, "host", "-"), self.started, True)
        self.file = open(self.path, "xb")  # noqa: SIM115  (closed in connectionLost)
        os.chmod(self.path, 0o600)
        self.file.write(header.encode())
        self.sizes = {DOWN: 0, UP: 0}
        super().connectionMade()

    def ms(self) -> int:
        return int((reactor.seconds() - self.started) * 1000)

    def record(self, kind: bytes, data: bytes) -> None:
        self.file.write(record_head(kind, self.ms(), len(data)) + data)
        self.file.flush()
        self.sizes[kind] += len(data)

    def dataReceived(self, data: bytes) -> None:
        self.record(UP, data)
        super().dataReceived(data)

    def connectionLost(self, reason: object) -> None:
        down, up = self.sizes[DOWN], self.sizes[UP]
        ending = Ending(reactor.seconds(), "1000", up, down, up + down)
        self.file.write(ending.encode(self.ms()))
        self.file.close()
        super().connectionLost(reason)  # type: ignore[arg-type]
        self.factory.recorded.append(self.path)
        waiting, self.factory.waiting = self.factory.waiting, []
        for d in waiting:
            d.callback(self.path)


class RecordingProxy(portforward.ProxyFactory):
    """Listens on 127.0.0.1; each connection is relayed to ``port`` and recorded."""

    protocol = _Recorded
    noisy = False

    def __init__(self, directory: Path, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.directory = directory
        self.recorded: list[Path] = []
        self.waiting: list[defer.Deferred[Path]] = []
        self.listening = None

    def when_recorded(self) -> defer.Deferred[Path]:
        """Fires with the first connection's file once that connection has closed."""
        if self.recorded:
            return defer.succeed(self.recorded[0])
        d: defer.Deferred[Path] = defer.Deferred()
        self.waiting.append(d)
        return d

    @defer.inlineCallbacks
    def listen(self):  # type: ignore[no-untyped-def]
        self.listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self)
        return self.listening.getHost().port
