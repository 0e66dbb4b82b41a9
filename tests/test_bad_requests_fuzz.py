"""Arbitrary request heads fed to the browser-facing protocol.

Whatever bytes arrive, in whatever pieces, nothing escapes ``dataReceived`` or the clock, no
failure is logged, and what the daemon has written is always one of: nothing (still waiting,
or dropped), an HTTP error response and a close, or a 101 followed by a close frame (no
session is ready here, so nothing may be relayed).  Never a 2xx or 3xx page: Autobahn's
status page answered ``GET /?redirect=URL`` with a 303 to anywhere.  When the client goes,
no waiter is left.
"""

from __future__ import annotations

import itertools
from typing import Any

import txaio.tx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from twisted_novnc.config import NovncSettings
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.front.protocol import NoVNCServerFactory
from twisted_novnc.testing import MemorySessionSource

UUID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
READINESS_TIMEOUT = 5.0
#: Past every deadline the daemon has for one connection (readiness, request, close handshake).
LATER = 60.0

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the strategies ----------------------------------------------------------------------------

#: Each part of a head is usually right and sometimes wrong, so that most heads get far into
#: the parser before they break (weights by repetition).
methods = st.sampled_from([b"GET"] * 6 + [b"POST", b"get", b"", b"GET GET", b"\x00", b"CONNECT"])
targets = st.one_of(
    st.sampled_from([
        f"/websockify/{UUID}".encode(),
        f"/websockify/{UUID}".encode(),
        b"/websockify/../x",
        b"/websockify/a%2Fb",
        b"/websockify/not-a-uuid",
        b"/websockify/'; DROP TABLE x; --",
        b"/websockify/" + b"a" * 10240,
        b"/?redirect=http%3A%2F%2Fevil.example%2F",
        b"*",
        b"",
    ]),
    st.binary(max_size=64),
)
versions = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1 x"])
valid_fields = [
    b"Host: 127.0.0.1",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Protocol: binary",
]
odd_fields = st.sampled_from([
    b"Host: 127.0.0.2",
    b"Sec-WebSocket-Version: 8",
    b"Sec-WebSocket-Key: abc",
    b"Sec-WebSocket-Protocol: base64",
    b"Sec-WebSocket-Protocol: binary, binary",
    b"Sec-WebSocket-Extensions: permessage-deflate",
    b"Origin: http://[::1",
    b"Origin: null",
    b"X-Forwarded-For: 198.51.100.4, garbage",
    b"Forwarded: for=\"[::1\"",
    b"Cookie: token=" + b"a" * 300,
    b"no colon here",
    b" folded: line",
    b"Host : 127.0.0.1",
    b"X-Big: " + b"a" * 20000,
])
random_fields = st.builds(
    lambda name, value: name + b":" + value,
    st.binary(min_size=0, max_size=20),
    st.binary(max_size=80),
)
separators = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\x0b", b"\x85"])
terminators = st.sampled_from([b"\r\n\r\n"] * 6 + [b"\n\n", b"\r\n", b""])
trailers = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from([b"\x82\x85abcd" + b"x" * 5, b"\x81\x05hello", b"\x88\x00"]),
)


@st.composite
def request_heads(draw: Any) -> bytes:
    """A valid upgrade request broken in some of the ways clients break one: parts of its
    request line changed, header lines dropped, odd or random ones inserted, other line
    breaks, no end, bytes after it."""
    line = b" ".join([draw(methods), draw(targets), draw(versions)])
    fields = [f for f in valid_fields if draw(st.integers(0, 5))]  # each kept 5 times in 6
    for extra in draw(st.lists(st.one_of(odd_fields, random_fields), max_size=3)):
        fields.insert(draw(st.integers(0, len(fields))), extra)
    return draw(separators).join([line, *fields]) + draw(terminators) + draw(trailers)


inputs = st.one_of(request_heads(), st.binary(max_size=4096))


@st.composite
def pieces(draw: Any) -> list[bytes]:
    """An input cut into the pieces in which it arrives."""
    data = draw(inputs)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- the harness -------------------------------------------------------------------------------


class TCPLikeTransport(StringTransport):
    """A StringTransport that, like a TCP transport, lets go of no producer without raising
    (Autobahn unregisters whether or not one was registered)."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class Connection:
    """One browser connection over a StringTransport, every timer on one Clock (Autobahn's
    too, through txaio), every logged failure kept."""

    def __init__(self, fast_path: bool) -> None:
        self.clock = Clock()
        self.source = MemorySessionSource()
        self.gate = ReadinessGate(
            self.source, self.clock, READINESS_TIMEOUT, frozenset({"ended"}), 5900
        )
        settings_ = NovncSettings(readiness_timeout=READINESS_TIMEOUT, ping_interval=0)
        self.factory = NoVNCServerFactory(
            settings_, self.gate, lambda target, timeout: Deferred(), self.clock,
            fast_path=fast_path,
        )
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6080))
        self.transport = TCPLikeTransport(
            peerAddress=IPv4Address("TCP", "203.0.113.9", 40000)
        )
        self.failures: list[dict] = []

    def __enter__(self) -> Connection:
        self._loop = txaio.tx.config.loop
        txaio.tx.config.loop = self.clock
        globalLogPublisher.addObserver(self._observe)
        self.protocol.makeConnection(self.transport)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self._observe)
        txaio.tx.config.loop = self._loop

    def _observe(self, event: dict) -> None:
        if "log_failure" in event:
            self.failures.append(event)

    def written_is_sound(self) -> str | None:
        """Why what was written so far is wrong, or None."""
        out = self.transport.value()
        if not out:
            return None
        head, sep, rest = out.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if not sep or not status_line.startswith(b"HTTP/1.1 ") or not parts[1].isdigit():
            return f"an answer that is not an HTTP response: {out[:120]!r}"
        status = int(parts[1])
        if status == 101:
            opcodes = [op for op, _ in frames(rest)]
            if any(op in (0x0, 0x1, 0x2) for op in opcodes):
                return f"data relayed with no session ready: {out[:200]!r}"
            if self.clock.seconds() > 0 and 0x8 not in opcodes:
                return f"a 101 and no close frame by the deadline: {out[:200]!r}"
            return None
        if not 400 <= status < 600:
            return f"HTTP {status} to bad input: {out[:200]!r}"
        if rest:
            return f"bytes after an HTTP error response: {out[:200]!r}"
        if not self.transport.disconnecting:
            return f"HTTP {status} and the connection left open"
        return None


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """The complete server frames (unmasked) in ``data``."""
    found, i = [], 0
    while len(data) - i >= 2:
        n, j = data[i + 1] & 0x7F, i + 2
        if n >= 126:
            width = 2 if n == 126 else 8
            if len(data) < j + width:
                break
            n, j = int.from_bytes(data[j : j + width], "big"), j + width
        if len(data) < j + n:
            break
        found.append((data[i] & 0x0F, data[j : j + n]))
        i = j + n
    return found


def _plain_get(target: bytes) -> list[bytes]:
    return [b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]


def _answered_soundly(chunks: list[bytes], fast_path: bool) -> None:
    with Connection(fast_path) as conn:
        for chunk in chunks:
            conn.protocol.dataReceived(chunk)
            assert conn.written_is_sound() is None, (chunks, conn.written_is_sound())
        conn.clock.advance(LATER)
        assert conn.written_is_sound() is None, (chunks, conn.written_is_sound())
        conn.protocol.connectionLost(Failure(ConnectionDone()))
        conn.clock.advance(LATER)
        assert conn.gate.waiting == 0
        assert not conn.factory.connections
        assert not conn.failures, [e.get("log_format") for e in conn.failures]


# Two tests rather than one parametrized: pytest-twisted wraps a hypothesis test's inner test
# once per item, and parametrized items share it, so the second item's wrapper would nest.
@FUZZ
@given(pieces())
@example(_plain_get(f"/websockify/{UUID}".encode()))
@example(_plain_get(b"/?redirect=http%3A%2F%2Fevil.example%2F"))
def test_any_request_head_is_answered_soundly(chunks):
    """Feed the pieces, then let every deadline pass, then let the client go: nothing raises,
    nothing is logged as a failure, what is written is sound at each step, and no waiter or
    connection is left."""
    _answered_soundly(chunks, fast_path=True)


@FUZZ
@given(pieces())
@example(_plain_get(f"/websockify/{UUID}".encode()))
@example(_plain_get(b"/?redirect=http%3A%2F%2Fevil.example%2F"))
def test_any_request_head_is_answered_soundly_on_the_stock_path(chunks):
    """The same on the stock path (``[novnc] fast_path = off``)."""
    _answered_soundly(chunks, fast_path=False)
