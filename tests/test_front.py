"""The browser-facing pipeline over real loopback sockets, with sessions held in memory."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from twisted_novnc.config import AuthSettings, NovncSettings
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.front.auth import mint_token, token_digest
from twisted_novnc.front.origins import OriginPolicy
from twisted_novnc.front.protocol import NoVNCServerFactory
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.relay.upstream import connect_tcp
from twisted_novnc.session import SessionRow
from twisted_novnc.testing import (
    RFB_BANNER,
    MemorySessionSource,
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
        **novnc: object,
    ) -> None:
        self.source = MemorySessionSource()
        self.gate = ReadinessGate(self.source, reactor, timeout, frozenset({"ended"}), 1)
        settings = NovncSettings(
            readiness_timeout=timeout, reject=reject, max_message_size=max_message_size,
            **novnc,
        )
        self.factory = NoVNCServerFactory(
            settings, self.gate, lambda t, s, *forward: connect_tcp(reactor, t, s), reactor,
            auth=auth, secret=secret, targets=TargetPolicy.from_config(networks),
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


@pytest.fixture
def harness():
    h = pytest_twisted.blockon(Harness().start())
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
    assert not client.opened.called
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
def test_reject_http_refuses_with_status():
    """With reject = http a refusal is the HTTP status of the failed upgrade."""
    h = yield Harness(reject="http").start()
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
def test_oversized_message_is_refused_with_1009():
    """A browser message larger than max_message_size ends the connection with 1009."""
    h = yield Harness(max_message_size=1024).start()
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
def test_origin_outside_the_allowlist_is_4403():
    """An Origin not in allowed_origins gets 4403 at once, holding no waiter."""
    h = yield Harness(allowed_origins=OriginPolicy.from_text("https://*.example.com")).start()
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
def test_hmac_tokens():
    """mode = hmac: a valid token relays; missing 4401, expired 4401, forged 4403, no waiting."""
    h = yield Harness(auth=AuthSettings(mode="hmac", secret_file="x"), secret=SECRET).start()
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
def test_column_token_and_cookie():
    """mode = column: the token's SHA-256 must match the row's; a cookie may carry it."""
    auth = AuthSettings(mode="column", token_column="token_sha256", cookie="novnc")
    h = yield Harness(auth=auth).start()
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
def test_one_time_token_replay_is_4403():
    """one_time = on: the token works once; a replay gets 4403."""
    auth = AuthSettings(mode="column", token_column="token_sha256", one_time=True)
    h = yield Harness(auth=auth).start()
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
def test_target_outside_allowlist_is_never_connected():
    """A vm_ip outside allowed_networks is refused with 4403 and never connected to."""
    h = yield Harness(networks="10.0.0.0/8").start()
    try:
        h.ready()
        assert (yield _refused_with(h)) == (4403, "VM address not allowed")
        assert h.vnc.connections == [] and h.vnc.lost == []
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_limits_give_4429():
    """Over max_per_session or max_waiting_per_ip a connection gets 4429."""
    h = yield Harness(max_per_session=1, max_waiting_per_ip=1).start()
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
def test_max_connections_closes_at_accept():
    """Beyond max_connections new sockets are closed at accept, before any HTTP."""
    h = yield Harness(max_connections=1).start()
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
def test_slow_request_is_dropped():
    """A client that never finishes its HTTP request is dropped after request_timeout."""
    h = yield Harness(request_timeout=0.3).start()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", h.proxy_port)
        slow = yield connectProtocol(endpoint, RawExchange(b"GET /websockify/x HTTP/1.1\r\n"))
        assert (yield slow.done) == b""
        assert not h.factory.connections
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_idle_relay_is_closed_with_4408():
    """A relay that moves nothing for idle_timeout is closed with 4408."""
    h = yield Harness(idle_timeout=1).start()
    try:
        h.ready()
        client = yield h.connect()
        yield client.when_received(len(RFB_BANNER))
        code, reason = yield client.closed
        assert (code, reason) == (4408, "idle timeout")
    finally:
        yield h.stop()


@pytest_twisted.inlineCallbacks
def test_max_per_ip_and_max_waiting_give_4429():
    """Over max_per_ip (open from one address) or max_waiting (held in total): 4429."""
    h = yield Harness(max_per_ip=2, max_waiting=1).start()
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
def test_closed_relay_is_freed_by_reference_counting(harness):
    """A closed relay leaves no reference cycle: its relay and upstream are freed by reference
    counting as soon as the connection is gone, and nothing of it is garbage that only the
    collector could free.  (The protocol itself stays referenced here by the test process's
    buffer of log events; twistd keeps no such buffer.)"""
    import gc
    import weakref

    harness.ready()
    client = yield harness.connect()
    yield client.when_received(len(RFB_BANNER))
    (server,) = harness.factory.connections
    assert server.relay is not None and server._connected.upstream is not None
    refs = [weakref.ref(o) for o in (server, server.relay, server._connected.upstream)]
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
        assert refs[1]() is None and refs[2]() is None
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = {id(o) for o in gc.garbage}
        assert not any(r() is not None and id(r()) in garbage for r in refs)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
