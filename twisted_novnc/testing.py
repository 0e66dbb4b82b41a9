"""Fakes that tests (ours and our users') share: an in-memory session source, a test VNC server,
and a small WebSocket client that records what a browser would see.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_novnc.database.ids import normalise_id
from twisted_novnc.database.interfaces import ISessionSource, ITokenStore
from twisted_novnc.relay.relay import Relay, TransportPeer
from twisted_novnc.session import SessionRow

RFB_BANNER = b"RFB 003.008\n"


@implementer(ISessionSource, ITokenStore)
@attrs.define(eq=False)
class MemorySessionSource:
    """Sessions in a dict, keyed by canonical id; ``fetch`` answers from it, or holds answers
    until ``release``.

    Ids are normalised exactly as :class:`~twisted_novnc.database.store.PostgresSessionStore`
    normalises them for an id column of type ``id_type`` (``uuid``, an integer type, or
    ``text``: ids as given), and the contract suite in ``tests/contract/`` holds the two to it.
    """

    rows: dict[str, SessionRow] = attrs.field(factory=dict)
    fail_with: Exception | None = None
    hold: bool = False
    fetches: list[frozenset[str]] = attrs.field(factory=list)
    #: The id column's type, as PostgreSQL names it (the store reads it from the table).
    id_type: str = "text"
    _held: list[tuple[Deferred[dict[str, SessionRow]], frozenset[str]]] = attrs.field(
        factory=list
    )
    #: The keys followed now (``follow`` without its ``unfollow``), as a store's shards would.
    followed: set[str] = attrs.field(factory=set)

    def normalise_id(self, raw: str) -> str | None:
        """The id as PostgreSQL would print it from a column of ``id_type``."""
        return normalise_id(raw, self.id_type)

    def fetch(self, session_ids: Iterable[str]) -> Deferred[dict[str, SessionRow]]:
        """The rows of these sessions (any spelling), keyed by canonical id; the ids asked
        for are recorded in ``fetches`` as given."""
        ids = frozenset(session_ids)
        self.fetches.append(ids)
        if self.hold:
            d: Deferred[dict[str, SessionRow]] = Deferred()
            self._held.append((d, ids))
            return d
        return self._answer(ids)

    def _answer(self, ids: frozenset[str]) -> Deferred[dict[str, SessionRow]]:
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        keys = {self.normalise_id(i) for i in ids}
        return defer.succeed({k: self.rows[k] for k in keys if k is not None and k in self.rows})

    def follow(self, key: str) -> None:
        """Record the interest; a test plays the store's ``listening(keys)`` itself."""
        self.followed.add(key)

    def unfollow(self, key: str) -> None:
        self.followed.discard(key)

    def consume_token(self, session_id: str, digest: str) -> Deferred[SessionRow | None]:
        """Clear the row's token if it matches and answer the row as it now is, like the
        store's one ``UPDATE ... RETURNING``."""
        row = self.rows.get(session_id)
        if row is None or row.token_digest is None or row.token_digest != digest:
            return defer.succeed(None)
        spent = self.rows[session_id] = attrs.evolve(row, token_digest=None)
        return defer.succeed(spent)

    def release(self) -> None:
        """Answer every held fetch from the rows as they are now."""
        held, self._held = self._held, []
        for d, ids in held:
            self._answer(ids).chainDeferred(d)


class VNCEchoServer(Protocol):
    """Speaks first with the RFB banner, like a VNC server, then echoes every byte."""

    transport: Any
    factory: VNCEchoFactory

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.transport.write(RFB_BANNER)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.remove(self)
        self.factory.lost.append(reason)


class VNCEchoFactory(Factory):
    protocol = VNCEchoServer  # type: ignore[assignment]

    def __init__(self) -> None:
        self.connections: list[VNCEchoServer] = []
        self.lost: list[Any] = []


@attrs.define(eq=False)
class Outcome:
    """Something that happens once, or fails once, that any number of parties may wait for,
    or none: each asks :meth:`waiter` for a Deferred of its own.  A failure nobody asked for
    is then never an "Unhandled error in Deferred" (as one Deferred kept for everybody would
    be: a browser refused before its handshake, whose test waits only for the close)."""

    _result: Any = None
    _done: bool = False
    _waiters: list[Deferred[Any]] = attrs.field(factory=list)

    @property
    def called(self) -> bool:
        return self._done

    def waiter(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._done:
            d.callback(self._result) if not isinstance(self._result, Failure) \
                else d.errback(self._result)
        else:
            self._waiters.append(d)
        return d

    def settle(self, result: Any) -> None:
        """Happened (a value) or failed (a :class:`Failure`); only the first counts."""
        if self._done:
            return
        self._done, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if d.called:  # cancelled (a timeout gave up on it)
                continue
            d.errback(result) if isinstance(result, Failure) else d.callback(result)


class RecordingClient(WebSocketClientProtocol):
    """A WebSocket client that records what a browser's page would see."""

    def __init__(self) -> None:
        super().__init__()
        self._opened = Outcome()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.received = bytearray()
        self.subprotocol: str | None = None
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def onConnect(self, response: Any) -> None:
        self.subprotocol = response.protocol

    @property
    def opened(self) -> Deferred[None]:
        """Fires once the opening handshake is complete; fails if the connection closed
        before it.  A Deferred of the caller's own (:class:`Outcome`)."""
        return self._opened.waiter()

    @property
    def handshake_over(self) -> bool:
        """The opening handshake has completed or failed (``opened`` has its outcome)."""
        return self._opened.called

    def onOpen(self) -> None:
        self._opened.settle(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received += payload
        for item in list(self._waiting):
            if len(self.received) >= item[0]:
                self._waiting.remove(item)
                item[1].callback(bytes(self.received))

    def when_received(self, count: int) -> Deferred[bytes]:
        """Fire once at least ``count`` bytes have arrived in total."""
        if len(self.received) >= count:
            return defer.succeed(bytes(self.received))
        d: Deferred[bytes] = Deferred()
        self._waiting.append((count, d))
        return d

    def leave(self) -> None:
        """Drop the connection from this side, as a browser tab closing."""
        self.transport.loseConnection()  # type: ignore[union-attr]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._opened.settle(Failure(ConnectionError(f"closed before open: {code} {reason}")))
        if not self.closed.called:
            self.closed.callback((code, reason))


def recording_client_factory(
    url: str, protocols: list[str] | None = None
) -> WebSocketClientFactory:
    factory = WebSocketClientFactory(url, protocols=protocols or ["binary"])
    factory.protocol = RecordingClient
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=5)
    return factory


class RawExchange(Protocol):
    """Sends raw bytes once connected and collects the whole answer until the connection
    closes: for requests no real client would send, and for plain HTTP."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.answer = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.answer += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.answer)


def upgrade_request(path: str) -> bytes:
    """A minimal, valid WebSocket upgrade request for ``path``, as raw bytes."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@attrs.define(eq=False)
class MemoryPeer(TransportPeer):
    """One end of a relay in memory: what it is sent lands in ``transport`` (a
    StringTransport, also its producer and consumer), and each close is recorded."""

    transport: StringTransport = attrs.field(factory=StringTransport)
    closed: list[tuple[int, str]] = attrs.field(factory=list)
    relay: Relay | None = None

    def send(self, data: bytes) -> None:
        self.transport.write(bytes(data))

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def attach(self, relay: Relay) -> None:
        """As an upstream is attached once the browser's side is open."""
        self.relay = relay


def every_service(tree: Any) -> list[Any]:
    """Every service of a service tree, depth first, nested groups included (the one-process
    tree nests what serves inside the database's lifetime)."""
    found = []
    for service in tree:
        found.append(service)
        if hasattr(service, "services"):
            found += every_service(service)
    return found
