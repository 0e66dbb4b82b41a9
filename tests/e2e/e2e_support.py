"""Small helpers every end-to-end test shares: bounded waits, session ids, browser clients."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol

from twisted_novnc.testing import RFB_BANNER, RawExchange, recording_client_factory

#: Every wait in these tests is on an event; this bounds each one so a bug fails, not hangs.
EVENT_LIMIT = 30.0


def within(d: defer.Deferred, seconds: float = EVENT_LIMIT) -> defer.Deferred:
    """``d``, failed with a TimeoutError if it has not fired in ``seconds``."""
    return d.addTimeout(seconds, reactor)


@pytest_twisted.inlineCallbacks
def holds_within(
    predicate: Callable[[], Any], limit: float = EVENT_LIMIT, interval: float = 0.02
) -> Any:
    """Whether ``predicate()`` (a bool, or a Deferred of one) comes to hold within ``limit``
    seconds, asked every ``interval``: for a test that explains a failure itself.

    Only for conditions nobody can announce (a process reaped by PID 1, a file another
    process writes, a counter in another object or process); everything else waits on its
    Deferred.
    """
    deadline = reactor.seconds() + limit
    while not (yield defer.maybeDeferred(predicate)):
        if reactor.seconds() > deadline:
            return False
        yield task.deferLater(reactor, interval, lambda: None)
    return True


def until(predicate: Callable[[], Any], interval: float = 0.02) -> defer.Deferred:
    """Fire once ``predicate()`` holds (see holds_within); fail after EVENT_LIMIT seconds."""

    def check(held: bool) -> None:
        if not held:
            raise TimeoutError(f"the condition did not hold in {EVENT_LIMIT:g}s")

    return holds_within(predicate, EVENT_LIMIT, interval).addCallback(check)


@pytest_twisted.inlineCallbacks
def settled(value: Callable[[], int], checks: int = 10, interval: float = 0.05) -> Any:
    """Fire with ``value()`` once it has not changed for ``checks`` polls in a row."""
    last, same = value(), 0
    while same < checks:
        yield task.deferLater(reactor, interval, lambda: None)
        current = value()
        same = same + 1 if current == last else 0
        last = current
    return last


@pytest_twisted.inlineCallbacks
def stands_still(value: Any, limit: float, checks: int = 20, interval: float = 0.05) -> Any:
    """Fire once ``value()`` has not changed for ``checks`` polls in a row, or after ``limit``
    seconds whatever it does (the caller's asserts then say what it did)."""
    deadline = reactor.seconds() + limit
    last, same = value(), 0
    while same < checks and reactor.seconds() < deadline:
        yield task.deferLater(reactor, interval, lambda: None)
        current = value()
        same = same + 1 if current == last else 0
        last = current


def exchange(port: int, request: bytes, seconds: float = EVENT_LIMIT) -> defer.Deferred:
    """Send raw ``request`` to 127.0.0.1:port; fire with all the answer once it closes."""
    proto = RawExchange(request)
    d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return within(d.addCallback(lambda _: proto.done), seconds)


@pytest_twisted.inlineCallbacks
def http_get(port: int, path: str) -> Any:
    """(status, body) of GET http://127.0.0.1:port/path, over HTTP/1.0 (one request, closed)."""
    raw = yield exchange(port, f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text as {(name, sorted labels): value}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return values


def new_id() -> str:
    return str(uuid.uuid4())


def connect_client(port: int, path: str, bind: str | None = None) -> defer.Deferred:
    """A recording WebSocket client for ``ws://127.0.0.1:port<path>`` (optionally bound to a
    local address, to come from another loopback IP)."""
    factory = recording_client_factory(f"ws://127.0.0.1:{port}{path}")
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, bindAddress=(bind, 0) if bind else None
    )
    return connectProtocol(endpoint, factory.buildProtocol(None))


def connect_session(
    port: int, session_id: str, suffix: str = "", bind: str | None = None
) -> defer.Deferred:
    """A recording client for ``/websockify/<session_id><suffix>`` (the default path)."""
    return connect_client(port, f"/websockify/{session_id}{suffix}", bind)


@pytest_twisted.inlineCallbacks
def banner_echo_close(client: Any, payload: bytes, seconds: float = EVENT_LIMIT) -> Any:
    """The relay works end to end: the VNC banner arrives, ``payload`` comes back from the
    echoing VNC server after it, and a clean close is answered with 1000."""
    data = yield within(client.when_received(len(RFB_BANNER)), seconds)
    assert data == RFB_BANNER
    client.sendMessage(payload, isBinary=True)
    data = yield within(client.when_received(len(RFB_BANNER) + len(payload)), seconds)
    assert data == RFB_BANNER + payload
    client.sendClose(1000)
    assert (yield within(client.closed, seconds)) == (1000, None)


class BoundedPush:
    """A streaming producer on its own transport that writes ``chunk`` until ``total`` bytes
    are sent, as fast as the peer takes them: the peer's back-pressure pauses it."""

    chunk: bytes
    total: int
    sent: int = 0
    _paused: bool = True
    transport: Any

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and self.sent < self.total:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)
        if self.sent >= self.total:
            self.all_sent()

    def all_sent(self) -> None:
        """Called once ``total`` bytes are written (and again on each later resume)."""


class Flood(BoundedPush, Protocol):
    """Pushes ``total`` bytes of ``chunk`` as fast as the peer takes them, then lets go."""

    chunk = b"\xab" * 65536

    def __init__(self, total: int) -> None:
        self.total = total

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def all_sent(self) -> None:
        self.transport.unregisterProducer()


class RawUpgrade(Protocol):
    """Sends a WebSocket upgrade with extra headers (optionally after a PROXY line) and holds
    the connection until the other side closes it (``done``)."""

    def __init__(self, path: str, headers: dict[str, str], preamble: bytes = b"") -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.request = preamble + (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(None)


class CollectingProcess(ProcessProtocol):
    """A helper process (haproxy, websockify): its output so far, and ``ended``."""

    def __init__(self) -> None:
        self.output = ""
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)
