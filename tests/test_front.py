"""The browser-facing protocol in both modes: over real loopback sockets with sessions held in
memory, and over a StringTransport on a Clock for its timers and close codes.

Every test runs on the fast path and on the stock path (``[novnc] fast_path = on | off``).
"""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
import txaio
from test_frames import client_frame
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from twisted_novnc.config import AuthSettings, NovncSettings
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.front.auth import mint_token, token_digest
from twisted_novnc.front.origins import OriginPolicy
from twisted_novnc.front.protocol import ABORT_GRACE, REFUSAL_CLOSE_TIMEOUT, NoVNCServerFactory
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.relay.upstream import connect_tcp
from twisted_novnc.session import SessionRow
from twisted_novnc.testing import (
    RFB_BANNER,
    MemoryPeer,
    MemorySessionSource,
    Outcome,
    RawExchange,
    VNCEchoFactory,
    recording_client_factory,
    upgrade_request,
)

SID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"


class Harness:
    """A proxy factory on a loopback port, a test VNC server, and in-memory sessions."""

    def __init__(
        self,
        timeout: float = 5.0,
        reject: str = "close",
        max_message_size: int = 1048576,
        auth: AuthSettings | None = None,
        secret: bytes = b"",
        networks: str = "127.0.0.0/8",
        fast_path: bool = True,
        **novnc: object,
    ) -> None:
        self.source = MemorySessionSource()
        self.gate = ReadinessGate(self.source, reactor, timeout, frozenset({"ended"}), 1)
        settings = NovncSettings(
            readiness_timeout=timeout, reject=reject, max_message_size=max_message_size,
            **novnc,
        )
        self.factory = NoVNCServerFactory(
            settings, self.gate,
            lambda t, s, *forward: connect_tcp(reactor, t, s, fast=fast_path), reactor,
            auth=auth, secret=secret, targets=TargetPolicy.from_config(networks),
            fast_path=fast_path,
        )
        self.vnc = VNCEchoFactory()
        self.ports: list = []

    @pytest_twisted.inlineCallbacks
    def start(self):
        proxy = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        vnc = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.vnc)
        self.ports = [proxy, vnc]
        self.proxy_port = proxy.getHost().port
        self.vnc_port = vnc.getHost().port
        return self

    def ready(self, sid: str = SID, token_digest: str | None = None) -> None:
        self.source.rows[sid] = SessionRow(
            sid, "127.0.0.1", self.vnc_port, "running", token_digest=token_digest
        )
        self.gate.notified(sid)

    def connect(
        self, path: str = f"/websockify/{SID}", protocols=None, origin: str | None = None,
        headers: dict | None = None,
    ) -> Deferred:
        url = f"ws://127.0.0.1:{self.proxy_port}{path}"
        factory = recording_client_factory(url, protocols)
        if origin is not None:
            factory.origin = origin
        if headers:
            factory.headers = headers
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port)
        return connectProtocol(endpoint, factory.buildProtocol(None))

    @pytest_twisted.inlineCallbacks
    def stop(self):
        for port in self.ports:
            yield port.stopListening()


@pytest.fixture(params=[True, False], ids=["fast_path=on", "fast_path=off"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Each test on the fast path, then on the stock path."""
    return bool(request.param)


@pytest.fixture
def harness(fast_path):
    h = pytest_twisted.blockon(Harness(fast_path=fast_path).start())
    yield h
    pytest_twisted.blockon(h.stop())


@pytest_twisted.inlineCallbacks
def test_ready_session_relays_banner_and_echo(harness):
    """A ready session gets the 101 with subprotocol binary, the VNC banner, and its echo."""
    harness.ready()
    client = yield harness.connect()
    yield client.opened
    assert client.subprotocol == "binary"
    yield client.when_received(len(RFB_BANNER))
    client.sendMessage(b"hello", isBinary=True)
    data = yield client.when_received(len(RFB_BANNER) + 5)
    assert data == RFB_BANNER + b"hello"
    client.sendClose(1000)
    yield client.closed


@pytest_twisted.inlineCallbacks
def test_upgrade_waits_until_session_is_ready(harness):
    """No 101 is sent while the session is not ready; it is sent once it is."""
    client = yield harness.connect()
    yield _turns(5)
    assert not client.handshake_over
    assert harness.gate.waiting == 1
    harness.ready()
    yield client.opened
    data = yield client.when_received(len(RFB_BANNER))
    assert data == RFB_BANNER
    client.sendClose(1000)
    yield client.closed


@pytest_twisted.inlineCallbacks
def test_bad_path_closes_with_4400(harness):
    """A path that does not fit the template is closed with 4400 after the handshake."""
    client = yield harness.connect("/nothing/here")
    code, reason = yield client.closed
    assert (code, reason) == (4400, "bad path")


@pytest_twisted.inlineCallbacks
def test_ended_session_closes_with_4410(harness):
    """An ended session is closed with 4410 and its reason."""
    harness.source.rows[SID] = SessionRow(SID, "127.0.0.1", harness.vnc_port, "ended")
    client = yield harness.connect()
    code, reason = yield client.closed
    assert (code, reason) == (4410, "session ended")


@pytest_twisted.inlineCallbacks
def test_unreachable_vm_closes_with_4502(harness):
    """A VM that refuses the connection is reported as 4502."""
    yield harness.ports[1].stopListening()
    harness.ports.pop()
    harness.ready()
    client = yield harness.connect()
    code, reason = yield client.closed
    assert (code, reason) == (4502, "VM unreachable")


@pytest_twisted.inlineCallbacks
def test_reject_http_refuses_with_status(fast_path):
    """With reject = http a refusal is the HTTP status of the failed upgrade."""
    h = yield Harness(reject="http", fast_path=fast_path).start()
    try:
        h.source.rows[SID] = SessionRow(SID, "127.0.0.1", h.vnc_port, "ended")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", h.proxy_port)
        ended = yield connectProtocol(endpoint, RawExchange(upgrade_request(f"/websockify/{SID}")))
        bad = yield connectProtocol(endpoint, RawExchange(upgrade_request("/nope")))
        answers = yield gatherResults([ended.done, bad.done])
        assert answers[0].startswith(b"HTTP/1.1 410 session ended\r\n")
        assert answers[1].startswith(b"HTTP/1.1 400 bad path\r\n")
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_client_leaving_while_waiting_leaves_no_waiter(harness):
    """A browser that disconnects while waiting leaves no waiter and no timer."""
    client = yield harness.connect()
    yield _turns(5)
    assert harness.gate.waiting == 1
    client.leave()
    yield client.closed
    yield _turns(5)
    assert harness.gate.waiting == 0


@pytest_twisted.inlineCallbacks
def test_vm_closing_ends_browser_with_1000(harness):
    """A VM that closes its socket normally ends the browser side with 1000."""
    harness.ready()
    client = yield harness.connect()
    yield client.when_received(len(RFB_BANNER))
    harness.vnc.connections[0].transport.loseConnection()
    code, reason = yield client.closed
    assert code == 1000


@pytest_twisted.inlineCallbacks
def test_browser_closing_closes_vm(harness):
    """The browser closing closes the VM connection too."""
    harness.ready()
    client = yield harness.connect()
    yield client.when_received(len(RFB_BANNER))
    client.sendClose(1000)
    yield client.closed
    yield _until(lambda: not harness.vnc.connections)
    assert len(harness.vnc.lost) == 1


@pytest_twisted.inlineCallbacks
def test_text_message_is_refused_with_1003(harness):
    """noVNC speaks binary only; a text message ends the connection with 1003."""
    harness.ready()
    client = yield harness.connect()
    yield client.when_received(len(RFB_BANNER))
    client.sendMessage(b"text", isBinary=False)
    code, reason = yield client.closed
    assert code == 1003


def _turns(n: int) -> Deferred:
    """Let the reactor run ``n`` iterations (no wall-clock sleep)."""
    from twisted.internet.task import deferLater

    d = deferLater(reactor, 0, lambda: None)
    for _ in range(n - 1):
        d.addCallback(lambda _: deferLater(reactor, 0, lambda: None))
    return d


@pytest_twisted.inlineCallbacks
def _until(predicate, limit: int = 10000):
    for _ in range(limit):
        if predicate():
            return
        yield _turns(1)
    raise AssertionError("condition never became true")


@pytest_twisted.inlineCallbacks
def test_oversized_message_is_refused_with_1009(fast_path):
    """A browser message larger than max_message_size ends the connection with 1009."""
    h = yield Harness(max_message_size=1024, fast_path=fast_path).start()
    try:
        h.ready()
        client = yield h.connect()
        yield client.when_received(len(RFB_BANNER))
        client.sendMessage(b"x" * 1024, isBinary=True)
        yield client.when_received(len(RFB_BANNER) + 1024)
        client.sendMessage(b"x" * 1025, isBinary=True)
        code, reason = yield client.closed
        assert code == 1009
        yield _until(lambda: not h.vnc.connections)
    finally:
        yield h.stop()


# -- security: decided before any waiting, and never connecting where it should not ----------

SECRET = b"0123456789abcdef-test-secret"


@pytest_twisted.inlineCallbacks
def _refused_with(h: Harness, path: str = f"/websockify/{SID}", **kwargs):
    client = yield h.connect(path, **kwargs)
    code, reason = yield client.closed
    return code, reason


@pytest_twisted.inlineCallbacks
def test_origin_outside_the_allowlist_is_4403(fast_path):
    """An Origin not in allowed_origins gets 4403 at once, holding no waiter."""
    h = yield Harness(
        allowed_origins=OriginPolicy.from_text("https://*.example.com"), fast_path=fast_path
    ).start()
    try:
        assert (yield _refused_with(h, origin="https://evil.test")) == (
            4403, "origin not allowed"
        )
        assert h.gate.waiting == 0 and h.source.fetches == []
        h.ready()
        client = yield h.connect(origin="https://desk.example.com")
        yield client.when_received(len(RFB_BANNER))
        client.sendClose(1000)
        yield client.closed
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_hmac_tokens(fast_path):
    """mode = hmac: a valid token relays; missing 4401, expired 4401, forged 4403, no waiting."""
    h = yield Harness(
        auth=AuthSettings(mode="hmac", secret_file="x"), secret=SECRET, fast_path=fast_path
    ).start()
    try:
        now = int(reactor.seconds())
        good = mint_token(SECRET, SID, now + 60)
        expired = mint_token(SECRET, SID, now - 1)
        forged = mint_token(b"another-secret-of-16+", SID, now + 60)
        base = f"/websockify/{SID}"
        assert (yield _refused_with(h, base)) == (4401, "token required")
        assert (yield _refused_with(h, f"{base}?token={expired}")) == (4401, "token expired")
        assert (yield _refused_with(h, f"{base}?token={forged}")) == (4403, "forbidden")
        assert h.source.fetches == [], "a bad token never holds a waiter"
        h.ready()
        client = yield h.connect(f"{base}?token={good}")
        yield client.when_received(len(RFB_BANNER))
        client.sendClose(1000)
        yield client.closed
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_column_token_and_cookie(fast_path):
    """mode = column: the token's SHA-256 must match the row's; a cookie may carry it."""
    auth = AuthSettings(mode="column", token_column="token_sha256", cookie="novnc")
    h = yield Harness(auth=auth, fast_path=fast_path).start()
    try:
        h.ready(token_digest=token_digest("s3cret-token"))
        assert (yield _refused_with(h, f"/websockify/{SID}?token=wrong")) == (4403, "forbidden")
        client = yield h.connect(headers={"Cookie": "other=1; novnc=s3cret-token"})
        yield client.when_received(len(RFB_BANNER))
        client.sendClose(1000)
        yield client.closed
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_one_time_token_replay_is_4403(fast_path):
    """one_time = on: the token works once; a replay gets 4403."""
    auth = AuthSettings(mode="column", token_column="token_sha256", one_time=True)
    h = yield Harness(auth=auth, fast_path=fast_path).start()
    try:
        h.ready(token_digest=token_digest("once"))
        client = yield h.connect(f"/websockify/{SID}?token=once")
        yield client.when_received(len(RFB_BANNER))
        client.sendClose(1000)
        yield client.closed
        assert (yield _refused_with(h, f"/websockify/{SID}?token=once")) == (
            4403, "token already used"
        )
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_target_outside_allowlist_is_never_connected(fast_path):
    """A vm_ip outside allowed_networks is refused with 4403 and never connected to."""
    h = yield Harness(networks="10.0.0.0/8", fast_path=fast_path).start()
    try:
        h.ready()
        assert (yield _refused_with(h)) == (4403, "VM address not allowed")
        assert h.vnc.connections == [] and h.vnc.lost == []
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_limits_give_4429(fast_path):
    """Over max_per_session or max_waiting_per_ip a connection gets 4429."""
    h = yield Harness(max_per_session=1, max_waiting_per_ip=1, fast_path=fast_path).start()
    try:
        first = yield h.connect()
        yield _until(lambda: h.gate.waiting == 1)
        assert (yield _refused_with(h)) == (4429, "too many connections")
        other = "0c7a4b0e-7d1c-4f64-9d2a-7e1f0a6e2b11"
        assert (yield _refused_with(h, f"/websockify/{other}")) == (
            4429, "too many connections"
        )
        first.leave()
        yield first.closed
        yield _until(lambda: not h.factory.limits.per_ip and not h.factory.limits.waiting_per_ip)
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_max_connections_closes_at_accept(fast_path):
    """Beyond max_connections new sockets are closed at accept, before any HTTP."""
    h = yield Harness(max_connections=1, fast_path=fast_path).start()
    try:
        first = yield h.connect()
        yield _until(lambda: h.gate.waiting == 1)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", h.proxy_port)
        second = yield connectProtocol(endpoint, RawExchange(upgrade_request("/x")))
        assert (yield second.done) == b""
        first.leave()
        yield first.closed
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_max_per_ip_and_max_waiting_give_4429(fast_path):
    """Over max_per_ip (open from one address) or max_waiting (held in total): 4429."""
    h = yield Harness(max_per_ip=2, max_waiting=1, fast_path=fast_path).start()
    try:
        first = yield h.connect()
        yield _until(lambda: h.gate.waiting == 1)
        other = "0c7a4b0e-7d1c-4f64-9d2a-7e1f0a6e2b11"
        assert (yield _refused_with(h, f"/websockify/{other}")) == (4429, "too many connections")
        yield _until(lambda: h.factory.limits.per_ip["127.0.0.1"] == 1)
        h.ready()
        yield first.when_received(len(RFB_BANNER))
        second = yield h.connect()  # a relay and this one: two open from 127.0.0.1
        yield second.when_received(len(RFB_BANNER))
        assert (yield _refused_with(h)) == (4429, "too many connections")
        for client in (first, second):
            client.sendClose(1000)
            yield client.closed
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_closed_relay_is_freed_by_reference_counting(harness, fast_path):
    """A closed relay leaves no reference cycle on the fast path: its relay and upstream are
    freed by reference counting as soon as the connection is gone, and nothing of it is
    garbage that only the collector could free.  On the stock path Twisted's own Connector
    and Client point at each other, so the collector frees them, and nothing is left after
    it.  (The protocol itself stays referenced here by the test process's buffer of log
    events; twistd keeps no such buffer.)"""
    import gc
    import weakref

    harness.ready()
    client = yield harness.connect()
    yield client.when_received(len(RFB_BANNER))
    (server,) = harness.factory.connections
    assert server.relay is not None and server._connected is None  # let go once open
    refs = [weakref.ref(o) for o in (server, server.relay, server.relay.vm)]
    del server
    gc.disable()  # only reference counting may free them
    try:
        client.sendClose(1000)
        yield client.closed
        for _ in range(50):  # bounded: the server side closes within a few turns
            if not harness.factory.connections and refs[1]() is None and refs[2]() is None:
                break
            yield _turns(1)
        assert not harness.factory.connections
        if not fast_path:
            gc.collect()
        assert refs[1]() is None and refs[2]() is None
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = {id(o) for o in gc.garbage}
        assert not any(r() is not None and id(r()) in garbage for r in refs)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


# -- the protocol over a StringTransport, its timers on a Clock ----------------------------------

HANDSHAKE = (
    f"GET /websockify/{SID} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
).encode()


class TCPLikeTransport(StringTransport):
    """A StringTransport that, like TCP's, lets a protocol unregister no producer (Autobahn
    does as it drops any connection; StringTransport would raise)."""

    def unregisterProducer(self) -> None:
        self.producer = None


class Wired:
    """One browser connection over a StringTransport; the gate, the factory's timers and
    Autobahn's (through txaio) on one Clock; the VM a MemoryPeer."""

    def __init__(self, fast_path: bool, row: SessionRow | None = None, **novnc: object) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.source = MemorySessionSource()
        if row is not None:
            self.source.rows[row.session_id] = row
        self.gate = ReadinessGate(self.source, self.clock, 30, frozenset({"ended"}), 5900)
        self.vm = MemoryPeer()
        settings = NovncSettings(**{"ping_interval": 0, **novnc})  # type: ignore[arg-type]
        self.factory = NoVNCServerFactory(
            settings, self.gate,
            lambda *args: succeed(self.vm), self.clock,
            targets=TargetPolicy.from_config("10.0.0.0/8"), fast_path=fast_path,
        )
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6080))
        self.transport = TCPLikeTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))

    def __enter__(self) -> Wired:
        self._loop = txaio.config.loop
        txaio.config.loop = self.clock
        self.protocol.makeConnection(self.transport)
        return self

    def __exit__(self, *exc: object) -> None:
        txaio.config.loop = self._loop

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.clock.advance(0)

    def frames(self) -> list[tuple[int, bytes]]:
        """The server's frames after the 101, as (opcode, payload)."""
        head, _, rest = self.transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        found = []
        while len(rest) >= 2:
            n, i = rest[1] & 0x7F, 2
            if n == 126:
                n, i = int.from_bytes(rest[2:4], "big"), 4
            elif n == 127:
                n, i = int.from_bytes(rest[2:10], "big"), 10
            found.append((rest[0] & 0x0F, rest[i : i + n]))
            rest = rest[i + n :]
        return found

    def close_code(self) -> tuple[int, str]:
        closes = [payload for opcode, payload in self.frames() if opcode == 8]
        assert len(closes) == 1, self.frames()
        return int.from_bytes(closes[0][:2], "big"), closes[0][2:].decode()

    def leave(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


READY = SessionRow(SID, "10.0.0.5", 5900, "running")


@pytest.fixture
def logged():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def test_a_relay_is_opened_and_logged_step_by_step(fast_path, logged):
    """The 101, the VM's bytes as binary frames, the browser's to the VM; one line per step
    with the same keys, and the outcome counted when the connection ends."""
    with Wired(fast_path, READY) as w:
        w.send(HANDSHAKE)
        w.protocol.relay.from_vm(RFB_BANNER)
        assert w.frames() == [(2, RFB_BANNER)]
        w.send(client_frame(b"hello"))
        assert w.vm.transport.value() == b"hello"
        w.clock.advance(2)
        w.send(client_frame(b"\x03\xe8", opcode=8))
        w.leave()
    lines = {e["log_format"].split(" ")[0]: e for e in logged if "log_format" in e}
    assert {"request", "session", "upstream", "closed"} <= set(lines)
    closed = lines["closed"]
    assert (closed["session_id"], closed["client"], closed["outcome"]) == (SID, "192.0.2.7", "1000")
    assert (closed["up_bytes"], closed["down_bytes"]) == (5, len(RFB_BANNER))
    assert closed["relay_seconds"] == 2 and closed["wait_seconds"] == 0
    metrics = w.factory.metrics.registry
    assert metrics.get_sample_value("twisted_novnc_connections_total", {"outcome": "1000"}) == 1
    assert w.vm.closed == [(1000, "browser closed")]
    assert not w.factory.connections and not w.factory.live
    assert w.factory.limits.per_ip == {} and w.factory.limits.per_session == {}


def test_not_ready_at_the_deadline_is_4504_after_the_handshake(fast_path):
    """A session never ready: the 101 comes at readiness_timeout, then close 4504."""
    with Wired(fast_path, SessionRow(SID, None)) as w:
        w.send(HANDSHAKE)
        assert w.transport.value() == b""
        w.clock.advance(30)
        assert w.close_code() == (4504, "session not ready in time")
        w.leave()
        assert w.gate.waiting == 0 and w.factory.limits.per_ip == {}


def test_reject_http_answers_with_the_status(fast_path):
    """reject = http: the refusal is the HTTP status, and the outcome says so."""
    with _refusing(fast_path, reject="http") as w:
        w.send(HANDSHAKE.replace(b"/websockify/", b"/nope/"))
        assert w.transport.value().startswith(b"HTTP/1.1 400 bad path\r\n")
        w.leave()
        assert w.protocol.outcome() == "http_400"


def test_idle_relay_is_closed_with_4408(fast_path):
    """A relay that moves nothing for a whole idle_timeout is closed with 4408; one that
    moves something in each look stays."""
    with Wired(fast_path, READY, idle_timeout=60) as w:
        w.send(HANDSHAKE)
        w.clock.advance(59)
        w.send(client_frame(b"x"))
        w.clock.advance(60)  # the first look saw traffic
        assert [op for op, _ in w.frames()] == []
        w.clock.advance(60)
        assert w.close_code() == (4408, "idle timeout")
        assert w.vm.closed == [(4408, "idle timeout")]


def test_slow_request_is_dropped(fast_path):
    """A client that never finishes its HTTP request is dropped after request_timeout."""
    with Wired(fast_path, request_timeout=10) as w:
        w.send(HANDSHAKE[:40])
        w.clock.advance(9.9)
        assert not w.transport.disconnecting
        w.clock.advance(0.1)
        assert w.transport.disconnecting and w.transport.value() == b""


def test_revoked_session_is_closed_with_4410(fast_path):
    """A session that ends while relayed closes both sides with 4410."""
    with Wired(fast_path, READY) as w:
        w.send(HANDSHAKE)
        w.source.rows[SID] = SessionRow(SID, "10.0.0.5", 5900, "ended")
        w.gate.notified(SID)
        w.clock.advance(0)
        assert w.close_code() == (4410, "session ended")
        assert w.vm.closed == [(4410, "session ended")]


@pytest.mark.parametrize(
    "clean, code",
    [(True, (1000, "VM closed the connection")), (False, (4502, "VM connection lost"))],
)
def test_vm_ending_closes_the_browser(fast_path, clean, code):
    """A VM that closes ends the browser's side with 1000; one that is lost, with 4502."""
    with Wired(fast_path, READY) as w:
        w.send(HANDSHAKE)
        w.protocol.relay.vm_gone(clean)
        assert w.close_code() == code


def test_pings_are_answered(fast_path):
    """The browser's pings get pongs, between relayed frames too."""
    with Wired(fast_path, READY) as w:
        w.send(HANDSHAKE)
        w.send(client_frame(b"a", fin=False) + client_frame(b"hi", opcode=9))
        w.send(client_frame(b"b", opcode=0))
        assert w.frames() == [(10, b"hi")]
        assert w.vm.transport.value() == b"ab"


@pytest.mark.parametrize("answer", ["pong", "data", None])
def test_a_browser_that_answers_no_ping_is_dropped(fast_path, answer):
    """The server pings every ping_interval; a pong, or any data, answers it; a browser that
    answers nothing within ping_timeout is dropped and its VM let go."""
    with Wired(fast_path, READY, ping_interval=25, ping_timeout=10) as w:
        w.send(HANDSHAKE)
        w.clock.advance(26)
        (ping,) = [payload for opcode, payload in w.frames() if opcode == 9]
        if answer == "pong":
            w.send(client_frame(ping, opcode=10))
        elif answer == "data":
            w.send(client_frame(b"x"))
        w.clock.advance(11)
        assert w.transport.disconnecting is (answer is None)
        if answer is None:
            w.leave()
            assert w.vm.closed == [(1000, "browser closed")]


def test_protocol_error_flushes_then_aborts_a_peer_that_takes_nothing(fast_path):
    """An invalid close frame: the 1002 close frame is written and the socket closed after
    it, not aborted with it; a peer that never takes it is aborted ABORT_GRACE later."""
    with Wired(fast_path, READY) as w:
        w.send(HANDSHAKE)
        aborted = []
        w.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        w.send(client_frame(b"\x03\xe7", opcode=8))  # close code 999
        assert w.close_code()[0] == 1002
        assert w.transport.disconnecting and aborted == []
        w.clock.advance(ABORT_GRACE)
        assert aborted == [True]


def _refusing(fast_path: bool, row: SessionRow | None = None, **novnc: object) -> Wired:
    w = Wired(fast_path, row, **novnc)
    w.transport = TCPLikeTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    return w


def test_a_refused_client_that_never_answers_the_close_is_dropped(fast_path):
    """A refusal (here 4429 over max_per_session) gives the session's count back at once; a
    client that does not answer its close frame within REFUSAL_CLOSE_TIMEOUT has its socket
    closed, and aborted ABORT_GRACE later if it takes nothing; only then is its address
    count given back."""
    with _refusing(fast_path, SessionRow(SID, None), max_per_session=1) as w:
        first = w.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 6080))
        first.makeConnection(TCPLikeTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 1)))
        first.dataReceived(HANDSHAKE)
        w.send(HANDSHAKE)
        assert w.close_code() == (4429, "too many connections")
        limits = w.factory.limits
        assert limits.per_session == {SID: 1} and limits.per_ip["192.0.2.7"] == 1
        aborted = []
        w.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        w.clock.advance(REFUSAL_CLOSE_TIMEOUT - 0.1)
        assert not w.transport.disconnecting
        w.clock.advance(0.1)
        assert w.transport.disconnecting and aborted == []
        w.clock.advance(ABORT_GRACE)
        assert aborted == [True]
        w.leave()
        assert limits.per_ip == {"192.0.2.9": 1} and limits.per_session == {SID: 1}
        first.connectionLost(Failure(ConnectionDone()))


def test_a_refused_client_that_answers_the_close_is_not_dropped_later(fast_path):
    """A refused client that completes the close handshake leaves no timer behind."""
    with _refusing(fast_path) as w:
        w.send(HANDSHAKE.replace(b"/websockify/", b"/nope/"))
        assert w.close_code() == (4400, "bad path")
        w.send(client_frame(b"\x03\xe8", opcode=8))
        w.leave()
        assert w.clock.getDelayedCalls() == []


def test_drain_fires_when_the_last_connection_goes(fast_path):
    """While a drain waits, the factory fires it once its last connection is gone."""
    with Wired(fast_path, READY) as w:
        w.send(HANDSHAKE)
        drained: Deferred[None] = Deferred()
        w.factory.drained = drained
        w.protocol.end_relay(1001, "server shutting down", "shutdown")
        assert w.close_code() == (1001, "server shutting down")
        assert not drained.called
        w.leave()
        assert drained.called and w.factory.drained is None


def test_the_stock_path_uses_no_private_autobahn_hook():
    """With fast_path = off the protocol overrides no private method of Autobahn's and has
    no part of the fast path's mixin; the VM is connected with connectTCP."""
    from autobahn.twisted.websocket import WebSocketServerProtocol

    from twisted_novnc._compat.autobahn import AutobahnFastPath
    from twisted_novnc.front.protocol import NoVNCServerProtocol

    for name in vars(NoVNCServerProtocol):
        if name.startswith("_") and not name.endswith("__"):
            assert not hasattr(WebSocketServerProtocol, name), name
    with Wired(False, READY) as w:
        assert not isinstance(w.protocol, AutobahnFastPath)
        assert isinstance(Wired(True).protocol, AutobahnFastPath)


def test_the_stock_connector_is_connect_tcp():
    """connect_tcp(fast=False) dials with reactor.connectTCP and a StockTCPUpstream, which
    writes with transport.write."""
    from twisted.internet.testing import MemoryReactorClock

    from twisted_novnc.relay.upstream import StockTCPUpstream
    from twisted_novnc.session import Target

    memory = MemoryReactorClock()
    connect_tcp(memory, Target(SID, "10.0.0.5", 5900), 5, fast=False)
    (host, port, factory, timeout, _), = memory.tcpClients
    protocol = factory.buildProtocol(None)
    assert (host, port) == ("10.0.0.5", 5900) and isinstance(protocol, StockTCPUpstream)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.send(b"bytes")
    assert transport.value() == b"bytes"


class BoundedTransport(StringTransport):
    """A StringTransport whose write buffer pauses its streaming producer past ``bound`` bytes,
    as Twisted's TCP transports do, and resumes it once :meth:`drain` empties the buffer."""

    bound = 4096

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.size = 0
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.size += len(data)
        if self.producer is not None and not self.full and self.size > self.bound:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.clear()
        self.size = 0
        if self.full and self.producer is not None:
            self.full = False
            self.producer.resumeProducing()


def bounded(w: Wired) -> BoundedTransport:
    w.transport = BoundedTransport()
    return w.transport


PING = client_frame(b"p" * 125, opcode=9)


def test_a_ping_flood_stops_reading_until_the_pongs_are_taken(fast_path):
    """A browser that sends pings and reads no pong: once its write buffer passes the bound,
    nothing more is read from it (nor from the VM) until the buffer drains; reading comes
    back only when the VM, which paused it too, can take more as well."""
    w = Wired(fast_path, READY)
    transport = bounded(w)
    with w:
        w.send(HANDSHAKE)
        transport.drain()
        w.send(PING * 64)  # one read: 64 pongs of 127 bytes, past the bound
        assert transport.producerState == "paused"
        assert w.vm.transport.producerState == "paused"
        w.vm.transport.producer.pauseProducing()  # the VM cannot take more either
        transport.drain()
        assert w.vm.transport.producerState == "producing"
        assert transport.producerState == "paused", "resumed while the VM is still full"
        w.vm.transport.producer.resumeProducing()
        assert transport.producerState == "producing"


def test_a_browser_that_takes_nothing_is_dropped_after_write_timeout(fast_path, logged):
    """A full write buffer the browser takes nothing of for write_timeout: the socket is
    aborted, the VM let go, the line logged and the outcome counted as write_timeout."""
    w = Wired(fast_path, READY, write_timeout=30)
    transport = bounded(w)
    with w:
        w.send(HANDSHAKE)
        w.protocol.relay.from_vm(b"x" * 8192)
        assert transport.full
        w.clock.advance(29)
        assert not transport.disconnecting
        w.clock.advance(1)
        assert transport.disconnected  # StringTransport.abortConnection
        w.leave()
    assert w.vm.closed == [(1000, "browser closed")]
    (line,) = [e for e in logged if "took no byte" in e.get("log_format", "")]
    assert (line["session_id"], line["timeout"]) == (SID, 30)
    assert w.protocol.outcome() == "write_timeout"
    metrics = w.factory.metrics.registry
    labels = {"outcome": "write_timeout"}
    assert metrics.get_sample_value("twisted_novnc_connections_total", labels) == 1


def test_a_browser_that_drains_is_kept(fast_path):
    """A buffer that fills and drains again within write_timeout arms nothing lasting."""
    w = Wired(fast_path, READY, write_timeout=30)
    transport = bounded(w)
    with w:
        w.send(HANDSHAKE)
        for _ in range(5):
            w.protocol.relay.from_vm(b"x" * 8192)
            w.clock.advance(20)
            transport.drain()
        w.clock.advance(60)
        assert not transport.disconnecting


def test_a_closing_connection_detaches_its_flow(fast_path):
    """The close handshake done, the transport has no producer left (Twisted would not close
    a transport that has one)."""
    w = Wired(fast_path, READY)
    transport = bounded(w)
    with w:
        w.send(HANDSHAKE)
        assert transport.producer is not None
        w.send(client_frame(b"\x03\xe8", opcode=8))
        assert transport.disconnecting and transport.producer is None


def test_a_text_first_frame_is_refused_before_its_payload(fast_path):
    """A text frame's header alone gets 1003 and lets the VM go: nothing waits for a payload
    as long as max_message_size, and the payload that follows is not kept."""
    import tracemalloc

    size = 1024 * 1024
    with Wired(fast_path, READY, max_message_size=size) as w:
        w.send(HANDSHAKE)
        payload = client_frame(b"\x00" * size, opcode=1)
        header, body = payload[: 2 + 8 + 4], payload[2 + 8 + 4 :]
        w.send(header)
        assert w.close_code() == (1003, "binary messages only")
        assert w.vm.closed == [(1000, "browser closed")]
        tracemalloc.start()
        try:
            for at in range(0, size, 64 * 1024):
                w.send(body[at : at + 64 * 1024])
            kept, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert kept < size // 4, f"{kept} bytes of a refused text message kept"
        assert w.frames()[-1][0] == 8 and len(w.frames()) == 1


def test_outcome_gives_each_waiter_its_own_deferred() -> None:
    """The test client's ``opened``: a failure nobody waits for is never an unhandled error;
    waiters before and after it get it; a waiter that gave up (cancelled) is skipped."""
    unhandled: list[str] = []

    def observe(event: dict) -> None:
        if "Unhandled error" in str(event.get("log_format", "")):
            unhandled.append(event["log_format"])

    globalLogPublisher.addObserver(observe)
    try:
        quiet = Outcome()
        quiet.settle(Failure(ConnectionError("closed before open")))
        del quiet
        gc.collect()
        assert unhandled == []
        outcome = Outcome()
        before, gave_up = outcome.waiter(), outcome.waiter()
        gave_up.cancel()
        assert not outcome.called
        outcome.settle(Failure(ConnectionError("closed before open")))
        outcome.settle(None)  # only the first counts
        for d in (before, outcome.waiter()):
            errors: list[Failure] = []
            d.addErrback(errors.append)
            assert errors and errors[0].check(ConnectionError)
        gave_up.addErrback(lambda f: f.trap(CancelledError))
        assert outcome.called
    finally:
        globalLogPublisher.removeObserver(observe)
