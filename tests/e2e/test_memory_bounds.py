"""What one client can make the real daemon hold, in both ``[novnc] fast_path`` modes: a client
that sends pings and never reads the pongs, one that stops reading a large stream from the VM
(``write_timeout``), and a text frame that promises a megabyte (refused at its header).

Each client is a raw socket: it completes the WebSocket handshake and then misbehaves as no
browser would.  Memory is the daemon's RSS (``/proc/<pid>/status``) before, during and after.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import pytest_twisted
from db_fixtures import insert_ready
from e2e_support import (
    BoundedPush,
    Flood,
    banner_echo_close,
    connect_session,
    new_id,
    settled,
    stands_still,
    within,
)
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from twisted_novnc.testing import RFB_BANNER, upgrade_request

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

TEXT, BINARY, CLOSE, PING = 0x1, 0x2, 0x8, 0x9
MIB = 1024 * 1024
#: The daemon's default max_message_size.
MAX_MESSAGE_SIZE = MIB


def client_frame(opcode: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A masked client frame; ``length`` announces a payload other than the one sent."""
    n = len(payload) if length is None else length
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The complete (opcode, payload) frames the server sent (unmasked)."""
    frames, i = [], 0
    while len(data) - i >= 2:
        n, at = data[i + 1] & 0x7F, i + 2
        if n == 126:
            n, at = int.from_bytes(data[i + 2 : i + 4], "big"), i + 4
        elif n == 127:
            n, at = int.from_bytes(data[i + 2 : i + 10], "big"), i + 10
        if len(data) < at + n:
            break
        frames.append((data[i] & 0x0F, data[at : at + n]))
        i = at + n
    return frames


class RawBrowser(Protocol):
    """A raw-socket client: sends the upgrade, fires ``opened`` at the 101 and ``lost`` when the
    connection ends; ``frames()`` are what the server sent after its 101."""

    def __init__(self, path: str) -> None:
        self.request = upgrade_request(path)
        self.data = b""
        self.after_head = -1
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self._waiting: list[tuple[int, defer.Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.after_head < 0 and b"\r\n\r\n" in self.data:
            head, _, _ = self.data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), head
            self.after_head = len(head) + 4
            self.opened.callback(None)
        for item in list(self._waiting):
            for opcode, payload in self.frames():
                if opcode == item[0]:
                    self._waiting.remove(item)
                    item[1].callback(payload)
                    break

    def frames(self) -> list[tuple[int, bytes]]:
        return server_frames(self.data[self.after_head :]) if self.after_head >= 0 else []

    def when_frame(self, opcode: int) -> defer.Deferred[bytes]:
        """The payload of the first frame with ``opcode`` the server sends."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((opcode, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self.lost.callback(None)


class PingFlood(BoundedPush, RawBrowser):
    """Once open, reads nothing more and sends masked pings (125-byte payloads: each pong is
    as big as its ping) as fast as the daemon takes them, up to ``total`` bytes."""

    chunk = b"".join(client_frame(PING, b"p" * 125) for _ in range(500))

    def __init__(self, path: str, total: int) -> None:
        super().__init__(path)
        self.total = total
        self.opened.addCallback(self._flood)

    def _flood(self, _: object) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]  (no pong is read)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.resumeProducing()


def connect_raw(port: int, client: RawBrowser) -> defer.Deferred[Any]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)


@pytest_twisted.inlineCallbacks
def relays(daemon: Any, pg: Any, db: Any, vnc_port: int, payload: bytes) -> Any:
    """One ready session relays end to end (banner, echo, clean close)."""
    sid = new_id()
    insert_ready(pg, db, sid, vnc_port)
    client = yield within(connect_session(daemon.port, sid))
    yield banner_echo_close(client, payload)


@pytest_twisted.inlineCallbacks
def test_a_ping_flood_that_reads_no_pong_keeps_the_daemon_small(
    daemon_factory, vnc_server, pg, sessions_table
):
    """A client that sends up to 200 MiB of pings and reads no pong: the daemon stops reading
    from it once its pongs back up, so it takes a few MiB at most, its RSS stays within 64 MiB
    of the baseline and comes back near it once the client leaves, and it goes on relaying."""
    daemon = yield daemon_factory()
    yield relays(daemon, pg, sessions_table, vnc_server.port, b"warm-up")
    baseline = yield settled(daemon.rss_kib)
    total = 200 * MIB
    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    flood = PingFlood(f"/websockify/{sid}", total)
    peak = [baseline]
    sampler = task.LoopingCall(lambda: peak.append(daemon.rss_kib()))
    sampler.start(0.05)
    try:
        yield within(connect_raw(daemon.port, flood))
        yield within(flood.opened)
        # The flood stops when the daemon stops reading (or, without a bound, once all of it
        # is sent): wait for it to stand still, 20 s at most.
        yield stands_still(lambda: flood.sent, 20)
    finally:
        sampler.stop()
    grown_mib = (max(peak) - baseline) / 1024
    facts = f"the daemon read {flood.sent / MIB:.0f} MiB of pings and grew by {grown_mib:.0f} MiB"
    # Measured with the bound: about 10 MiB read (kernel buffers), 1 MiB grown.
    assert grown_mib < 64 and flood.sent < 32 * MIB, facts
    flood.transport.abortConnection()  # type: ignore[union-attr]
    yield within(daemon.when_logged(f"closed {sid} from "))
    after = yield settled(daemon.rss_kib)
    left_mib = (after - baseline) / 1024
    assert left_mib < 16, f"the daemon kept {left_mib:.0f} MiB after the flood"
    yield relays(daemon, pg, sessions_table, vnc_server.port, b"still relaying")


@pytest_twisted.inlineCallbacks
def test_a_browser_that_stops_reading_is_dropped_after_write_timeout(
    daemon_factory, pg, sessions_table
):
    """A VM streaming 256 MiB to a browser that stops reading: once the daemon's write buffer
    for it is full and nothing of it is taken for write_timeout (1 s here), the browser is
    dropped, logged and counted as write_timeout, and the VM let go."""
    floods: list[Flood] = []
    vm_gone: defer.Deferred[None] = defer.Deferred()

    class StreamingVNC(Flood):
        def connectionLost(self, reason: Failure | None = None) -> None:
            vm_gone.callback(None)

    def build() -> Flood:
        floods.append(StreamingVNC(256 * MIB))
        return floods[-1]

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(build)
    )
    try:
        daemon = yield daemon_factory(write_timeout=1)
        sid = new_id()
        insert_ready(pg, sessions_table, sid, port.getHost().port)
        client = RawBrowser(f"/websockify/{sid}")
        yield within(connect_raw(daemon.port, client))
        yield within(client.opened)
        client.transport.pauseProducing()  # type: ignore[union-attr]  (the browser stops reading)
        started = reactor.seconds()
        yield within(daemon.when_logged(rf"dropping {sid} from \S+: took no byte in 1s"), 20)
        yield within(daemon.when_logged(rf"closed {sid} from \S+: write_timeout"))
        took = reactor.seconds() - started
        yield within(vm_gone)
        assert floods[0].sent < 256 * MIB
        assert took < 15, f"dropped only after {took:.1f}s"
        client.transport.resumeProducing()  # type: ignore[union-attr]
        yield within(client.lost)  # the socket ends once what was sent before is read
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_text_frame_is_refused_at_its_header(daemon_factory, vnc_server, pg, sessions_table):
    """A text frame's header promising max_message_size bytes gets 1003 at once, without the
    daemon waiting for (or reading) any of its payload; the daemon goes on relaying."""
    daemon = yield daemon_factory()
    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    client = RawBrowser(f"/websockify/{sid}")
    yield within(connect_raw(daemon.port, client))
    banner = yield within(client.when_frame(BINARY))
    assert banner == RFB_BANNER
    client.transport.write(client_frame(TEXT, length=MAX_MESSAGE_SIZE))  # type: ignore[union-attr]
    close = yield within(client.when_frame(CLOSE), 5)
    assert int.from_bytes(close[:2], "big") == 1003
    yield within(daemon.when_logged(rf"closed {re.escape(sid)} from \S+: 1003"))
    yield relays(daemon, pg, sessions_table, vnc_server.port, b"still relaying")
