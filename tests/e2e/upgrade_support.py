"""Relays that stream numbered records both ways, to see an upgrade lose, repeat or reorder
nothing; and who holds which socket, asked of the kernel (``ss``)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest_twisted
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from e2e_support import CollectingProcess, within
from required_tools import require
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from twisted_novnc.testing import Outcome

#: One record: its number, eight times (64 bytes); any byte lost, repeated or moved shows.
RECORD = 64
_NUMBER = struct.Struct("!Q")


def record(number: int) -> bytes:
    return _NUMBER.pack(number) * 8


class Sequence:
    """Checks a byte stream of records: each whole, numbered one more than the last."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.next = 0
        self.errors: list[str] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data
        whole = len(self.buffer) - len(self.buffer) % RECORD
        for start in range(0, whole, RECORD):
            chunk = bytes(self.buffer[start:start + RECORD])
            number = _NUMBER.unpack_from(chunk)[0]
            if chunk != record(number):
                self.errors.append(f"a torn record after {self.next - 1}")
            elif number != self.next:
                self.errors.append(f"record {number} where {self.next} was due")
            self.next = number + 1
        del self.buffer[:whole]


class StreamingVM(Protocol):
    """The VM's end: sends its own records when told, checks the browser's."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = Sequence()
        self.lost = False

    def connectionMade(self) -> None:
        joined(self.factory, self)

    def send_next(self) -> None:
        self.transport.write(record(self.sent))  # type: ignore[union-attr]
        self.sent += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.feed(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class StreamingVMs(Factory):
    protocol = StreamingVM

    def __init__(self) -> None:
        self.connected: list[StreamingVM] = []
        self.waiting: list[tuple[int, defer.Deferred[None]]] = []
        self.port = 0

    def when_connected(self, count: int) -> defer.Deferred[None]:
        if len(self.connected) >= count:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((count, d))
        return d


class RecordsOverWebSocket:
    """A WebSocket end that sends its numbered records as binary messages and checks the
    records it receives (one record stream per direction, whatever the message sizes)."""

    sent: int
    received: Sequence

    def send_next(self) -> None:
        if self.state == self.STATE_OPEN:  # type: ignore[attr-defined]
            self.sendMessage(record(self.sent), isBinary=True)  # type: ignore[attr-defined]
            self.sent += 1

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.feed(payload)


def joined(factory: Any, end: Any) -> None:
    """A VM end is connected: count it, and fire whoever waits for that many."""
    factory.connected.append(end)
    waiting = factory.waiting
    if waiting and len(factory.connected) >= waiting[0][0]:
        waiting.pop(0)[1].callback(None)


class StreamingWebsockify(RecordsOverWebSocket, WebSocketServerProtocol):
    """The VM's end behind a websockify (``[upstream] mode = websocket``): the same records,
    as binary messages."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.received = Sequence()
        self.lost = False

    def onConnect(self, request: Any) -> str | None:
        return "binary" if "binary" in request.protocols else None

    def onOpen(self) -> None:
        joined(self.factory, self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.lost = True


class StreamingBrowser(RecordsOverWebSocket, WebSocketClientProtocol):
    """The browser's end: sends its records as binary messages, checks the VM's."""

    def __init__(self) -> None:
        super().__init__()
        self._opened = Outcome()
        self.closed: tuple[Any, ...] | None = None
        self.sent = 0
        self.received = Sequence()

    @property
    def opened(self) -> defer.Deferred[None]:
        """Fires at the handshake's end; fails if closed before (a Deferred of one's own)."""
        return self._opened.waiter()

    def onOpen(self) -> None:
        self._opened.settle(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)
        self._opened.settle(Failure(ConnectionError(f"closed before open: {code} {reason}")))


@pytest_twisted.inlineCallbacks
def streaming_vms() -> Any:
    vms = StreamingVMs()
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(vms)
    vms.port = port.getHost().port
    return vms, port


@pytest_twisted.inlineCallbacks
def streaming_websockify() -> Any:
    """A websockify stand-in streaming records: (its factory, as ``streaming_vms``, and the
    listening port)."""
    factory = WebSocketServerFactory()
    factory.protocol = StreamingWebsockify
    # txaio's batched timer rounds deadlines down to whole seconds (see test_websocket_upstream).
    factory.setProtocolOptions(closeHandshakeTimeout=30)
    vms = StreamingVMs()
    factory.connected = vms.connected
    factory.waiting = vms.waiting
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    vms.port = port.getHost().port
    return vms, port


def open_browser(port: int, session_id: str) -> defer.Deferred[StreamingBrowser]:
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}/websockify/{session_id}", protocols=["binary"]
    )
    factory.protocol = StreamingBrowser
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=5)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return connectProtocol(endpoint, factory.buildProtocol(None))


class Streams:
    """The relays' two ends, streaming one record each way per relay every ``interval``."""

    def __init__(self, browsers: list[StreamingBrowser], vms: list[StreamingVM]) -> None:
        self.browsers = browsers
        self.vms = vms
        self.loop = LoopingCall(self.tick)

    def tick(self) -> None:
        for browser in self.browsers:
            browser.send_next()
        for vm in self.vms:
            vm.send_next()

    def start(self, interval: float = 0.05) -> None:
        self.loop.start(interval, now=True)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def close(self) -> None:
        """The browsers leave (the test is over; the daemon's drain need not wait for them)."""
        for browser in self.browsers:
            if browser.transport is not None:
                browser.transport.abortConnection()

    def least_received(self) -> int:
        return min(
            [b.received.next for b in self.browsers] + [v.received.next for v in self.vms]
        )

    def all_delivered(self) -> bool:
        return all(b.received.next == v.sent and v.received.next == b.sent
                   for b, v in zip(self.browsers, self.vms, strict=True))

    def errors(self) -> list[str]:
        found = []
        for i, (b, v) in enumerate(zip(self.browsers, self.vms, strict=True)):
            found += [f"relay {i} down: {e}" for e in b.received.errors]
            found += [f"relay {i} up: {e}" for e in v.received.errors]
            if b.closed is not None:
                found.append(f"relay {i}: the browser saw a close {b.closed}")
            if v.lost:
                found.append(f"relay {i}: the VM's connection was lost")
        return found


# -- who holds which socket ------------------------------------------------------------------

_USERS = re.compile(r"pid=(\d+)")


def require_ss() -> str:
    found = shutil.which("ss")
    require([] if found else ["ss (Debian: apt-get install iproute2)"],
            "the upgrade tests, which ask the kernel who holds each socket")
    assert found is not None
    return found


def socket_holders(ss: str, where: Callable[[str, str], bool]) -> list[set[int]]:
    """For each established TCP socket whose (local, peer) address ``where`` accepts, the pids
    of the processes holding it (``ss -tnp``)."""
    out = subprocess.run(
        [ss, "-tnpH", "state", "established"], check=True, capture_output=True, text=True
    ).stdout
    holders = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, peer = fields[2], fields[3]
        if where(local, peer):
            holders.append({int(pid) for pid in _USERS.findall(line)})
    return holders


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class CommandProcess(CollectingProcess):
    """A command's output and exit code."""

    code: int | None = None

    def processEnded(self, reason: Any) -> None:
        self.code = reason.value.exitCode
        super().processEnded(reason)


@pytest_twisted.inlineCallbacks
def run_upgrade(admin_port: int, seconds: float = 120.0) -> Any:
    """``python -m twisted_novnc upgrade --url ...``: its exit code and output."""
    proto = CommandProcess()
    command = [sys.executable, "-m", "twisted_novnc", "upgrade",
               "--url", f"http://127.0.0.1:{admin_port}"]
    reactor.spawnProcess(proto, sys.executable, command, env=None)
    yield within(proto.ended, seconds)
    return proto.code, proto.output


@pytest_twisted.inlineCallbacks
def open_relays(daemon_port: int, vms: StreamingVMs, session_ids: list[str]) -> Any:
    """One relay per session, opened one after the other so that the n-th VM connection is
    the n-th browser's: (browsers, their VM ends)."""
    browsers = []
    for n, session_id in enumerate(session_ids):
        browser = yield open_browser(daemon_port, session_id)
        yield within(browser.opened)
        yield within(vms.when_connected(n + 1))
        browsers.append(browser)
    return browsers, list(vms.connected)
