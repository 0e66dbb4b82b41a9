"""Bad input against one real daemon: every case ends in an answer the client can see, never
a hang, and the daemon is none the worse for it.

A case sends raw bytes (an HTTP head, then perhaps WebSocket frames once the relay is open)
and says what the client may see: an HTTP status, a close code after the handshake, or a bare
disconnect.  The cases of one kind run at once, each on its own connection, and a test lists
every case that went wrong before it fails.  After each test the daemon must still serve a
ready session (banner and echo), be back to the file descriptors it had after start-up, hold
no waiter, and have logged no traceback.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import ssl
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import psycopg2
import pytest
import pytest_twisted
from daemon_process import DaemonProcess, start_daemon, stop_daemon, write_config
from db_fixtures import create_sessions_table, drop_sessions_table, insert_ready
from e2e_support import (
    Flood,
    banner_echo_close,
    connect_session,
    holds_within,
    http_get,
    metric_values,
    settled,
)
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from twisted_novnc.testing import RFB_BANNER, VNCEchoFactory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

#: What a refusal may take: the daemon answers bad input at once.
PROMPT = 5.0
#: What a client that never finishes its request may be kept for: the daemon's request
#: deadline (10 s by default) and a margin.
UNFINISHED = 20.0
#: Any other single wait.
EVENT_LIMIT = 15.0
MAX_MESSAGE_SIZE = 1048576  # the daemon's default max_message_size

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(
    hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
).decode()

CONT, TEXT, BINARY, CLOSE, PING = 0x0, 0x1, 0x2, 0x8, 0x9


def within(d: defer.Deferred, seconds: float = EVENT_LIMIT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


# -- what a client sends ---------------------------------------------------------------------


def upgrade_fields(protocols: str | None = "binary") -> list[bytes]:
    """The header lines of a valid WebSocket upgrade, as noVNC sends them."""
    fields = [
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + KEY.encode(),
        b"Sec-WebSocket-Version: 13",
    ]
    if protocols is not None:
        fields.append(b"Sec-WebSocket-Protocol: " + protocols.encode())
    return fields


def without(fields: list[bytes], name: bytes) -> list[bytes]:
    return [f for f in fields if not f.lower().startswith(name.lower() + b":")]


def replaced(fields: list[bytes], name: bytes, line: bytes) -> list[bytes]:
    return [line if f.lower().startswith(name.lower() + b":") else f for f in fields]


def head(line: bytes | str, fields: list[bytes] | None = None) -> bytes:
    """A complete request head: the request line, the header lines, the empty line."""
    if isinstance(line, str):
        line = line.encode()
    fields = upgrade_fields() if fields is None else fields
    return b"\r\n".join([line, *fields]) + b"\r\n\r\n"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One WebSocket frame as a client sends it (masked unless told otherwise).

    ``length`` announces a payload length other than the payload's own, to send a header
    that promises more than will ever come.
    """
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = bytes([first, mask_bit | n])
    elif n < 1 << 16:
        header = bytes([first, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = os.urandom(4)
    size = len(payload)
    stream = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    return header + key + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The complete (opcode, payload) frames in what the server sent after its 101."""
    frames, i = [], 0
    while len(data) - i >= 2:
        n, j = data[i + 1] & 0x7F, i + 2
        if n == 126:
            if len(data) < j + 2:
                break
            n, j = int.from_bytes(data[j : j + 2], "big"), j + 2
        elif n == 127:
            if len(data) < j + 8:
                break
            n, j = int.from_bytes(data[j : j + 8], "big"), j + 8
        if data[i + 1] & 0x80:
            j += 4  # a server must not mask; tolerate it here, the cases judge the codes
        if len(data) < j + n:
            break
        frames.append((data[i] & 0x0F, data[j : j + n]))
        i = j + n
    return frames


# -- what a client sees ----------------------------------------------------------------------


@attrs.frozen
class Seen:
    """What one connection saw, from its first byte to its end (or to the case's limit)."""

    data: bytes
    lost: bool
    elapsed: float

    @property
    def status(self) -> int | None:
        head_, sep, _ = self.data.partition(b"\r\n\r\n")
        parts = head_.split(b"\r\n", 1)[0].split(b" ", 2)
        if not sep or not head_.startswith(b"HTTP/") or len(parts) < 2:
            return None
        return int(parts[1]) if parts[1].isdigit() else None

    @property
    def headers(self) -> dict[str, str]:
        head_ = self.data.partition(b"\r\n\r\n")[0].decode("latin-1")
        lines = head_.split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}

    @property
    def frames(self) -> list[tuple[int, bytes]]:
        if self.status != 101:
            return []
        return server_frames(self.data.partition(b"\r\n\r\n")[2])

    @property
    def close(self) -> tuple[int | None, str] | None:
        for opcode, payload in self.frames:
            if opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                return code, payload[2:].decode("utf-8", "replace")
        return None

    @property
    def relayed(self) -> int:
        return sum(len(p) for op, p in self.frames if op in (CONT, TEXT, BINARY))

    def describe(self) -> str:
        end = "" if self.lost else f", connection still open after {self.elapsed:.1f}s"
        if not self.data:
            return ("a bare disconnect" if self.lost else "nothing") + end
        if self.status == 101:
            proto = self.headers.get("sec-websocket-protocol")
            what = f"101 (subprotocol {proto!r})"
            if self.headers.get("sec-websocket-accept") != ACCEPT:
                what += " with a wrong Sec-WebSocket-Accept"
            if self.relayed:
                what += f", {self.relayed} relayed bytes"
            if self.close is not None:
                what += f", close {self.close[0]} {self.close[1]!r}"
            else:
                what += ", no close frame"
            return what + end
        if self.status is not None:
            first = self.data.split(b"\r\n", 1)[0].decode("latin-1")
            return f"HTTP {self.status} ({first[:120]!r})" + end
        return f"unparseable answer {self.data[:80]!r}" + end


@attrs.frozen
class Expect:
    """What a case may see; ``|`` allows either."""

    text: str
    ok: Callable[[Seen], bool]

    def __or__(self, other: Expect) -> Expect:
        return Expect(f"{self.text} or {other.text}", lambda s: self.ok(s) or other.ok(s))


def http(*statuses: int) -> Expect:
    return Expect(
        "HTTP " + "/".join(map(str, statuses)), lambda s: s.lost and s.status in statuses
    )


HTTP_4XX = Expect(
    "an HTTP 4xx", lambda s: s.lost and s.status is not None and 400 <= s.status < 500
)
DISCONNECT = Expect("a bare disconnect", lambda s: s.lost and not s.data)


def closed_with(*codes: int) -> Expect:
    """A completed handshake (one a browser accepts) and a close frame with one of ``codes``."""
    return Expect(
        "close " + "/".join(map(str, codes)),
        lambda s: s.lost
        and s.headers.get("sec-websocket-accept") == ACCEPT
        and s.close is not None
        and s.close[0] in codes,
    )


@attrs.frozen
class Case:
    name: str
    sent: bytes
    expect: Expect
    #: Sent once the relay is open (the 101 and the VNC banner have arrived).
    then: bytes = b""
    limit: float = PROMPT


class RawClient(Protocol):
    """Sends a case's bytes, records every byte back, and answers a close frame like a
    browser would, so that the daemon can end the connection at once."""

    def __init__(self, sent: bytes, then: bytes = b"") -> None:
        self.sent = sent
        self.then = then
        self.data = bytearray()
        self.lost = False
        self._then_sent = not then
        self._replied = False
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.sent)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        seen = Seen(bytes(self.data), False, 0.0)
        if seen.status == 101:
            frames = seen.frames
            if not self._then_sent and any(op == BINARY for op, _ in frames):
                self._then_sent = True
                self.transport.write(self.then)
            if not self._replied and any(op == CLOSE for op, _ in frames):
                self._replied = True
                self.transport.write(frame(CLOSE, close_payload(1000)))
        self._check()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self._check()

    def when(self, condition: Callable[[], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((condition, d))
        self._check()
        return d

    def _check(self) -> None:
        for item in list(self._waiters):
            if item[0]():
                self._waiters.remove(item)
                if not item[1].called:
                    item[1].callback(None)


@pytest_twisted.inlineCallbacks
def attempt(port: int, case: Case):
    """Run one case to its end, or to its limit (then abort it): what did the client see?"""
    client = RawClient(case.sent, case.then)
    started = reactor.seconds()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=int(PROMPT))
    yield connectProtocol(endpoint, client)
    with contextlib.suppress(defer.TimeoutError):
        yield within(client.when(lambda: client.lost), case.limit)
    seen = Seen(bytes(client.data), client.lost, reactor.seconds() - started)
    if not client.lost:
        client.transport.abortConnection()
        yield within(client.when(lambda: client.lost))
    return seen


@pytest_twisted.inlineCallbacks
def run_cases(port: int, cases: list[Case], concurrency: int = 40):
    """Run the cases at once: what each client saw, and a line for each that saw the wrong
    thing (input, what it saw, what it should have seen)."""
    limiter = defer.DeferredSemaphore(concurrency)
    seen = yield defer.gatherResults(
        [limiter.run(attempt, port, case) for case in cases], consumeErrors=True
    )
    wrong = [
        f"- {case.name}: sent {case.sent[:70]!r}{'...' if len(case.sent) > 70 else ''}"
        f"{' then ' + repr(case.then[:24]) if case.then else ''}\n"
        f"    saw {s.describe()}; expected {case.expect.text}"
        for case, s in zip(cases, seen, strict=True)
        if not case.expect.ok(s)
    ]
    return seen, wrong


@pytest_twisted.inlineCallbacks
def verdict(served: Served, since: int, wrong: list[str], total: int):
    """Fail listing every case that went wrong and what the daemon was left with: its health
    is checked whether or not the cases went right."""
    try:
        yield still_healthy(served, since)
        health = []
    except Exception as e:  # a timeout or a refused relay is a finding too
        health = [f"- afterwards: {type(e).__name__}: {e}"]
    assert not wrong and not health, (
        f"{len(wrong)} of {total} cases went wrong:\n" + "\n".join(wrong + health)
    )


# -- the one daemon ----------------------------------------------------------------------------


@attrs.define
class Served:
    """The module's daemon, its table, its VNC server and what it looked like after start-up."""

    proc: DaemonProcess
    db: Any
    pg: Any
    vnc: VNCEchoFactory
    baseline_fds: int = 0
    baseline_fd_targets: list[str] = attrs.field(factory=list)

    @property
    def port(self) -> int:
        return self.proc.port

    def ready_session(self) -> str:
        sid = str(uuid.uuid4())
        insert_ready(self.pg, self.db, sid, self.vnc.port)
        return sid

    def fd_targets(self) -> list[str]:
        fd_dir = f"/proc/{self.proc.pid}/fd"
        targets = []
        for name in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(os.path.join(fd_dir, name)))
        return sorted(targets)


@pytest_twisted.inlineCallbacks
def serve_valid(served: Served):
    """A ready session still gets its banner and its echo."""
    sid = served.ready_session()
    client = yield within(connect_session(served.port, sid))
    yield banner_echo_close(client, b"still here", EVENT_LIMIT)


@pytest_twisted.inlineCallbacks
def metrics(served: Served):
    """The daemon's /metrics, as {(name, labels): value}."""
    assert served.proc.admin_port
    status, body = yield http_get(served.proc.admin_port, "/metrics")
    assert status == 200
    return metric_values(body.decode())


@pytest_twisted.inlineCallbacks
def still_healthy(served: Served, since: int):
    """After the abuse: serving, no connection or waiter left, fds back to the baseline, and
    no traceback in the log since ``since``."""
    assert not served.proc.ended.called, "the daemon exited:\n" + served.proc.output[since:]
    yield serve_valid(served)
    values: dict = {}

    @pytest_twisted.inlineCallbacks
    def nothing_open():
        values.update((yield metrics(served)))
        return (
            values["twisted_novnc_connections_open", ()] == 0
            and values["twisted_novnc_waiting_clients", ()] == 0
        )

    quiet = yield holds_within(nothing_open, EVENT_LIMIT)
    assert quiet, (
        f"connections_open={values['twisted_novnc_connections_open', ()]:g}"
        f" waiting_clients={values['twisted_novnc_waiting_clients', ()]:g}, expected both 0"
    )
    back = yield holds_within(lambda: served.proc.fd_count() == served.baseline_fds, EVENT_LIMIT)
    if not back:
        now = served.fd_targets()
        extra = list(now)
        for target in served.baseline_fd_targets:
            if target in extra:
                extra.remove(target)
        raise AssertionError(
            f"{len(now)} open fds, {served.baseline_fds} after start-up; extra: {extra[:20]}"
        )
    vm_closed = yield holds_within(lambda: not served.vnc.connections, EVENT_LIMIT)
    assert vm_closed, f"{len(served.vnc.connections)} VM connections left open"
    log = served.proc.output[since:]
    for bad in ("Traceback", "Unhandled"):
        start = max(0, log.find(bad) - 2000)
        assert bad not in log, f"{bad!r} in the daemon's log:\n{log[start:]}"


@pytest.fixture(scope="module")
def served(fast_path, postgres_dsn, tmp_path_factory):
    """One daemon for the whole module (and fast_path mode), with its admin listener, its own
    table and VNC server."""
    tmp = tmp_path_factory.mktemp("bad_input")
    db = create_sessions_table(postgres_dsn, "bad_input_")
    vnc = VNCEchoFactory()
    vnc_port = pytest_twisted.blockon(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(vnc)
    )
    vnc.port = vnc_port.getHost().port
    config = write_config(
        tmp / "daemon.ini", postgres_dsn, db, {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}
    )
    proc = DaemonProcess()
    pg = psycopg2.connect(postgres_dsn)
    pg.autocommit = True
    try:
        pytest_twisted.blockon(start_daemon(config, tmp, proc))
        daemon = Served(proc, db, pg, vnc)
        daemon.baseline_fds = pytest_twisted.blockon(settled(proc.fd_count))
        daemon.baseline_fd_targets = daemon.fd_targets()
        yield daemon
    finally:
        if proc.transport is not None:
            pytest_twisted.blockon(stop_daemon(proc))
        for conn in list(vnc.connections):
            conn.transport.abortConnection()
        pytest_twisted.blockon(defer.maybeDeferred(vnc_port.stopListening))
        pg.close()
        drop_sessions_table(postgres_dsn, db)


# -- the cases --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_malformed_request_lines(served):
    """A request line that is not ``GET <path> HTTP/1.1`` gets an HTTP error at once, even
    for a session that is ready."""
    since = len(served.proc.output)

    def path() -> str:
        return f"/websockify/{served.ready_session()}"

    cases = [
        Case("empty request line", head(b""), HTTP_4XX),
        Case("method only", head(b"GET"), HTTP_4XX),
        Case("no HTTP version", head(f"GET {path()}"), HTTP_4XX),
        Case("four words", head(f"GET {path()} HTTP/1.1 extra"), HTTP_4XX),
        Case("POST", head(f"POST {path()} HTTP/1.1"), HTTP_4XX),
        Case("lower-case method", head(f"get {path()} HTTP/1.1"), HTTP_4XX),
        Case("made-up method", head(f"BREW {path()} HTTP/1.1"), HTTP_4XX),
        Case("HTTP/1.0", head(f"GET {path()} HTTP/1.0"), HTTP_4XX | http(505)),
        Case("HTTP/2", head(f"GET {path()} HTTP/2"), HTTP_4XX | http(505)),
        Case("not HTTP", head(f"GET {path()} FTP/1.1"), HTTP_4XX | http(505)),
        Case("fragment in the target", head(f"GET {path()}#top HTTP/1.1"), HTTP_4XX),
        Case("not origin-form", head(b"GET websockify HTTP/1.1"), HTTP_4XX | closed_with(4400)),
        Case("asterisk-form", head(b"GET * HTTP/1.1"), HTTP_4XX | closed_with(4400)),
        Case("NUL in the target", head(b"GET /websockify/\x00 HTTP/1.1"),
             HTTP_4XX | closed_with(4400)),
    ]
    _, wrong = yield run_cases(served.port, cases)
    yield verdict(served, since, wrong, len(cases))


@pytest_twisted.inlineCallbacks
def test_invalid_duplicate_and_oversized_headers(served):
    """Missing, repeated, malformed and huge headers get an HTTP 4xx; none is relayed.

    The smuggling cases hide a ``Host`` header behind a byte that HTTP does not take for a
    line break (a bare CR, a vertical tab, NEL, an obs-fold) or behind a space before its
    colon; a request without a real Host must get 400 (RFC 9112, 3.2 and 5.1), whatever a
    lenient parser makes of it.
    """
    since = len(served.proc.output)

    def line() -> bytes:
        return f"GET /websockify/{served.ready_session()} HTTP/1.1".encode()

    valid = upgrade_fields()
    no_host = without(valid, b"Host")
    padding = [b"X-Pad-%04d: " % i + b"a" * 88 for i in range(1000)]  # 100 kB
    cases = [
        Case("no Host", head(line(), no_host), HTTP_4XX),
        Case("Host twice", head(line(), [*valid, b"Host: 127.0.0.2"]), HTTP_4XX),
        Case("Host with a bad port", head(line(), replaced(valid, b"Host", b"Host: h:x")),
             HTTP_4XX),
        Case("Sec-WebSocket-Key twice",
             head(line(), [*valid, b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="]), HTTP_4XX),
        Case("Sec-WebSocket-Version twice",
             head(line(), [*valid, b"Sec-WebSocket-Version: 13"]), HTTP_4XX),
        Case("Origin twice",
             head(line(), [*valid, b"Origin: http://a.example", b"Origin: http://b.example"]),
             HTTP_4XX),
        Case("no Sec-WebSocket-Key", head(line(), without(valid, b"Sec-WebSocket-Key")),
             HTTP_4XX),
        Case("short Sec-WebSocket-Key",
             head(line(), replaced(valid, b"Sec-WebSocket-Key", b"Sec-WebSocket-Key: abc")),
             HTTP_4XX),
        Case("Sec-WebSocket-Key not base64",
             head(line(), replaced(valid, b"Sec-WebSocket-Key",
                                   b"Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==")),
             HTTP_4XX),
        Case("unparseable Origin", head(line(), [*valid, b"Origin: http://[::1"]), HTTP_4XX),
        Case("a line without a colon", head(line(), [*valid, b"this is no header"]), HTTP_4XX),
        Case("space before the colon", head(line(), [b"Host : 127.0.0.1", *no_host]),
             HTTP_4XX),
        Case("Host behind a bare CR", head(line(), [b"X-A: a\rHost: 127.0.0.1", *no_host]),
             HTTP_4XX),
        Case("Host behind a vertical tab",
             head(line(), [b"X-A: a\x0bHost: 127.0.0.1", *no_host]), HTTP_4XX),
        Case("Host behind NEL (0x85)", head(line(), [b"X-A: a\x85Host: 127.0.0.1", *no_host]),
             HTTP_4XX),
        Case("Host in an obs-fold", head(line(), [b"X-A: a", b" Host: 127.0.0.1", *no_host]),
             HTTP_4XX),
        Case("100 kB of headers", head(line(), valid + padding), HTTP_4XX),
        Case("one 100 kB header", head(line(), [*valid, b"X-Big: " + b"a" * 100000]),
             HTTP_4XX),
    ]
    _, wrong = yield run_cases(served.port, cases)
    yield verdict(served, since, wrong, len(cases))


class HeaderFlood(Flood):
    """A request whose one header never ends, sent as fast as the daemon takes it."""

    chunk = b"a" * 65536

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.data = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(head(b"GET /websockify/x HTTP/1.1")[:-2] + b"X-Flood: ")
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_endless_header_is_not_buffered(served):
    """A header that never ends is cut off: the daemon does not read 32 MiB of it, does not
    grow, and closes the connection (with a 4xx or without a word)."""
    since = len(served.proc.output)
    total = 32 * 1024 * 1024
    baseline = served.proc.rss_kib()
    peak = [baseline]
    sampler = task.LoopingCall(lambda: peak.append(served.proc.rss_kib()))
    sampler.start(0.05)
    flood = HeaderFlood(total)
    try:
        started = reactor.seconds()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", served.port), flood)
        try:
            yield within(flood.lost, UNFINISHED)
            ended = True
        except defer.TimeoutError:
            ended = False
            flood.transport.abortConnection()
        took = reactor.seconds() - started
    finally:
        sampler.stop()
    grown = (max(peak) - baseline) // 1024
    answer = Seen(flood.data, True, 0)
    facts = (
        f"the daemon took {flood.sent >> 20} of {total >> 20} MiB, grew by {grown} MiB,"
        f" answered {answer.describe()}, and "
        + (f"closed the connection after {took:.1f}s" if ended else
           f"still held the connection after {UNFINISHED:g}s")
    )
    refused = not flood.data or (answer.status is not None and 400 <= answer.status < 500)
    wrong = [] if ended and flood.sent < total and grown < 20 and refused else [f"- {facts}"]
    yield verdict(served, since, wrong, 1)


@pytest_twisted.inlineCallbacks
def test_wrong_upgrade_or_version(served):
    """Anything but a WebSocket version 13 upgrade is refused with an HTTP 4xx; a refused
    version names the one the daemon speaks (RFC 6455, 4.4)."""
    since = len(served.proc.output)

    def line(query: str = "") -> bytes:
        return f"GET /websockify/{served.ready_session()}{query} HTTP/1.1".encode()

    valid = upgrade_fields()
    version = b"Sec-WebSocket-Version"
    plain = [b"Host: 127.0.0.1"]
    named_13 = Expect(
        "an HTTP 4xx naming Sec-WebSocket-Version: 13",
        lambda s: HTTP_4XX.ok(s) and s.headers.get("sec-websocket-version") == "13",
    )
    cases = [
        Case("plain GET, no upgrade", head(line(), plain), HTTP_4XX),
        Case("plain GET asking for a redirect",
             head(line("?redirect=http%3A%2F%2Fevil.example%2F"), plain), HTTP_4XX),
        Case("Upgrade: h2c", head(line(), replaced(valid, b"Upgrade", b"Upgrade: h2c")),
             HTTP_4XX),
        Case("Upgrade: websocket without Connection: Upgrade",
             head(line(), replaced(valid, b"Connection", b"Connection: keep-alive")), HTTP_4XX),
        Case("no Connection", head(line(), without(valid, b"Connection")), HTTP_4XX),
        Case("no Upgrade", head(line(), without(valid, b"Upgrade")), HTTP_4XX),
        Case("no Sec-WebSocket-Version", head(line(), without(valid, version)), HTTP_4XX),
        Case("Sec-WebSocket-Version: 8",
             head(line(), replaced(valid, version, version + b": 8")), named_13),
        Case("Sec-WebSocket-Version: 14",
             head(line(), replaced(valid, version, version + b": 14")), named_13),
        Case("Sec-WebSocket-Version: thirteen",
             head(line(), replaced(valid, version, version + b": thirteen")), HTTP_4XX),
    ]
    _, wrong = yield run_cases(served.port, cases)
    yield verdict(served, since, wrong, len(cases))


@pytest_twisted.inlineCallbacks
def test_bad_paths(served):
    """Traversals, encoded slashes, huge ids, ids the uuid column cannot hold and SQL are
    refused at once with 4400, and never reach the database."""
    since = len(served.proc.output)
    canary = "canary_" + uuid.uuid4().hex[:12]
    with served.pg.cursor() as cur:
        cur.execute(f'CREATE TABLE "{canary}" (x int)')
        cur.execute(f'SELECT count(*) FROM "{served.db.table}"')
        (rows,) = cur.fetchone()
    sql = f"'; DROP TABLE {canary}; --"
    sql_encoded = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in sql)
    sid = served.ready_session()
    bad_path = closed_with(4400)
    cases = [
        Case("traversal", head(b"GET /websockify/../x HTTP/1.1"), bad_path),
        Case("traversal to a ready id", head(f"GET /websockify/../websockify/{sid} HTTP/1.1"),
             bad_path),
        Case("dot-dot id", head(b"GET /websockify/.. HTTP/1.1"), bad_path),
        Case("encoded dot-dot", head(b"GET /websockify/%2E%2E/x HTTP/1.1"), bad_path),
        Case("encoded slash", head(b"GET /websockify/a%2Fb HTTP/1.1"), bad_path),
        Case("encoded slash in a ready id", head(f"GET /websockify/{sid[:8]}%2F{sid} HTTP/1.1"),
             bad_path),
        Case("10 kB id", head(f"GET /websockify/{'a' * 10240} HTTP/1.1"), bad_path),
        Case("not a uuid", head(b"GET /websockify/not-a-uuid HTTP/1.1"), bad_path),
        Case("a number", head(b"GET /websockify/12345 HTTP/1.1"), bad_path),
        Case("uuid-sized but not hex", head(f"GET /websockify/{'z' * 36} HTTP/1.1"), bad_path),
        Case("128 safe characters", head(f"GET /websockify/{'a' * 128} HTTP/1.1"), bad_path),
        Case("SQL in unreserved characters", head(b"GET /websockify/1-OR-1-- HTTP/1.1"),
             bad_path),
        Case("SQL, percent-encoded", head(f"GET /websockify/{sql_encoded} HTTP/1.1"), bad_path),
        Case("SQL, raw (spaces break the request line)",
             head(f"GET /websockify/{sql} HTTP/1.1"), HTTP_4XX | bad_path),
        Case("SQL quote without spaces", head(b"GET /websockify/'OR'1'='1 HTTP/1.1"), bad_path),
        Case("empty id", head(b"GET /websockify/ HTTP/1.1"), bad_path),
        Case("no id", head(b"GET /websockify HTTP/1.1"), bad_path),
        Case("another prefix", head(f"GET /elsewhere/{sid} HTTP/1.1"), bad_path),
    ]
    _, wrong = yield run_cases(served.port, cases)
    with served.pg.cursor() as cur:
        cur.execute("SELECT to_regclass(%s), to_regclass(%s)", (f'"{canary}"', served.db.table))
        if cur.fetchone() != (canary, served.db.table):
            wrong.append(f"- the canary table {canary} or the sessions table is gone")
        cur.execute(f'SELECT count(*) FROM "{served.db.table}"')
        if cur.fetchone()[0] != rows + 1:  # the ready id above
            wrong.append("- the sessions table lost or gained rows")
        cur.execute(f'DROP TABLE IF EXISTS "{canary}"')
    log = served.proc.output[since:]
    waited = [x for x in log.splitlines() if "waiting for readiness" in x and "DROP" in x]
    if waited:
        wrong.append(f"- an SQL-looking id was waited for (so looked up): {waited}")
    for symptom in ("invalid input syntax", "syntax error", "ProgrammingError", "DataError"):
        if symptom in log:
            wrong.append(f"- a bad id reached a query: {symptom!r} in the log")
    yield verdict(served, since, wrong, len(cases))


def tls_client_hello() -> bytes:
    """The first flight of a TLS client, as a browser pointed at https:// by mistake sends."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest_twisted.inlineCallbacks
def test_binary_garbage(served):
    """Bytes that are not HTTP get a 4xx or a disconnect: at once when they end like a head,
    within the request deadline when they never do."""
    since = len(served.proc.output)
    rng = random.Random(5)
    garbage = bytes(rng.randrange(256) for _ in range(4096))
    ended = HTTP_4XX | DISCONNECT
    cases = [
        Case("4 kB of noise and an empty line", garbage + b"\r\n\r\n", ended),
        Case("an empty line only", b"\r\n\r\n", ended),
        Case("NULs and an empty line", b"\x00" * 4096 + b"\r\n\r\n", ended),
        Case("4 kB of noise", garbage.replace(b"\r\n\r\n", b""), ended, limit=UNFINISHED),
        Case("a TLS ClientHello", tls_client_hello(), ended, limit=UNFINISHED),
        Case("a WebSocket frame instead of a request", frame(BINARY, b"hello"), ended,
             limit=UNFINISHED),
        Case("64 kB of NULs", b"\x00" * 65536, ended, limit=UNFINISHED),
        Case("a head that never ends", head(b"GET /websockify/x HTTP/1.1")[:-2], ended,
             limit=UNFINISHED),
        Case("nothing at all", b"", ended, limit=UNFINISHED),
        Case("bare LF line endings",
             head(b"GET /websockify/x HTTP/1.1").replace(b"\r\n", b"\n"),
             ended | closed_with(4400), limit=UNFINISHED),
    ]
    _, wrong = yield run_cases(served.port, cases)
    yield verdict(served, since, wrong, len(cases))


@pytest_twisted.inlineCallbacks
def test_invalid_frames_on_an_open_relay(served):
    """Once relaying, a frame that breaks RFC 6455 gets 1002, a text message 1003 (1007 if it
    is not even UTF-8), and a frame or message beyond max_message_size 1009; the VM's socket
    goes with it."""
    since = len(served.proc.output)
    big = MAX_MESSAGE_SIZE + 1
    piece = b"\x00" * (128 * 1024)
    fragments = frame(BINARY, piece, fin=False) + b"".join(
        frame(CONT, piece, fin=False) for _ in range(8)
    ) + frame(CONT, b"\x00")
    violation = closed_with(1002)
    table = [
        ("unmasked binary frame", frame(BINARY, b"hello", mask=False), violation),
        ("reserved data opcode 0x3", frame(0x3, b"x"), violation),
        ("reserved control opcode 0xB", frame(0xB), violation),
        ("RSV1 set without an extension", frame(BINARY, b"x", rsv=4), violation),
        ("RSV2 and RSV3 set", frame(BINARY, b"x", rsv=3), violation),
        ("a header announcing 2**40 bytes", frame(BINARY, length=1 << 40), closed_with(1009)),
        ("a header announcing 2**63 + 1 bytes", frame(BINARY, length=(1 << 63) + 1),
         closed_with(1002, 1009)),
        ("one frame of max_message_size + 1", frame(BINARY, b"\x00" * big), closed_with(1009)),
        ("fragments beyond max_message_size", fragments, closed_with(1009)),
        ("text frame", frame(TEXT, b"hello"), closed_with(1003)),
        ("text frame, not UTF-8", frame(TEXT, b"\xff\xfe"), closed_with(1003, 1007)),
        ("ping with a 126-byte payload", frame(PING, b"p" * 126), violation),
        ("fragmented ping", frame(PING, b"p", fin=False), violation),
        ("continuation with no message begun", frame(CONT, b"x"), violation),
        ("new message inside a fragmented one",
         frame(BINARY, b"a", fin=False) + frame(BINARY, b"b"), violation),
        ("close with a 1-byte payload", frame(CLOSE, b"\x03"), violation),
        ("close with reserved code 1005", frame(CLOSE, close_payload(1005)), violation),
        ("close with code 999", frame(CLOSE, close_payload(999)), violation),
        ("close whose reason is not UTF-8", frame(CLOSE, close_payload(1000, b"\xff")),
         closed_with(1002, 1007)),
    ]
    cases = [
        Case(name, head(f"GET /websockify/{served.ready_session()} HTTP/1.1"), expect,
             then=bad, limit=EVENT_LIMIT)
        for name, bad, expect in table
    ]
    seen, wrong = yield run_cases(served.port, cases)
    wrong += [
        f"- {case.name}: the relay never opened: {s.describe()}"
        for case, s in zip(cases, seen, strict=True)
        if s.frames[:1] != [(BINARY, RFB_BANNER)]
    ]
    yield verdict(served, since, wrong, len(cases))


@pytest_twisted.inlineCallbacks
def test_client_offering_only_base64(served):
    """A client that speaks only websockify's old ``base64`` subprotocol cannot be relayed
    (the daemon speaks binary): it gets a refusal it can read, and no VNC byte.

    A browser that offered subprotocols fails a 101 that selects none, and its page sees 1006
    (Chrome: "Sent non-empty 'Sec-WebSocket-Protocol' header but no response was received"),
    so a readable refusal is an HTTP 4xx, or a 101 that selects ``base64`` and closes at once.
    """
    since = len(served.proc.output)
    sid = served.ready_session()
    readable = Expect(
        "an HTTP 4xx, or a 101 selecting base64 and a close with no VNC byte",
        lambda s: HTTP_4XX.ok(s) or (
            s.lost and s.status == 101 and s.relayed == 0 and s.close is not None
            and s.headers.get("sec-websocket-protocol") == "base64"
        ),
    )
    fields = upgrade_fields(protocols="base64")
    cases = [Case("only base64", head(f"GET /websockify/{sid} HTTP/1.1", fields), readable)]
    _, wrong = yield run_cases(served.port, cases)
    yield verdict(served, since, wrong, len(cases))


@pytest_twisted.inlineCallbacks
def test_thousands_of_rejected_connections(served):
    """2,000 bad-path connections, 32 at a time: each gets 4400, within 60 s in all; the
    daemon grows by less than 20 MB and is back to its start-up descriptors."""
    since = len(served.proc.output)
    count, concurrency = 2000, 32
    paths = ["/websockify/../x", "/websockify/a%2Fb", "/websockify/not-a-uuid", "/nope"]
    before = yield metrics(served)
    rss_before = served.proc.rss_kib()
    started = reactor.seconds()
    limiter = defer.DeferredSemaphore(concurrency)
    cases = [
        Case(f"bad path {i}", head(f"GET {paths[i % len(paths)]}/{i} HTTP/1.1"),
             closed_with(4400))
        for i in range(count)
    ]
    seen = yield within(
        defer.gatherResults(
            [limiter.run(attempt, served.port, case) for case in cases], consumeErrors=True
        ),
        60,
    )
    took = reactor.seconds() - started
    bad = [f"{c.name}: {s.describe()}" for c, s in zip(cases, seen, strict=True)
           if not c.expect.ok(s)]
    wrong = [f"- {len(bad)} saw the wrong thing, e.g. {bad[:3]}"] if bad else []
    after = yield metrics(served)
    key = ("twisted_novnc_connections_total", (("outcome", "4400"),))
    counted = after[key] - before.get(key, 0)
    if counted != count:
        wrong.append(f"- /metrics counted {counted:g} closed with 4400, not {count}")
    grown = (served.proc.rss_kib() - rss_before) / 1024
    if grown >= 20:
        wrong.append(f"- RSS grew by {grown:.1f} MB over {count} rejections ({took:.1f}s)")
    yield verdict(served, since, wrong, count)
