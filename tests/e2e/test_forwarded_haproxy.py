"""The client address through a real HAProxy (Debian's), with the shipped etc/haproxy.cfg's
header rules: a client cannot choose its own address with Forwarded or X-Forwarded-For; and a
haproxy: listener believes a PROXY header only from [novnc] proxy_protocol_from."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest
import pytest_twisted
from e2e_support import CollectingProcess, RawUpgrade, new_id, until, within
from required_tools import require_haproxy
from test_tls import endpoint_arg, self_signed
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol

from twisted_novnc.testing import RawExchange

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "haproxy.cfg"
#: The client's real address (a loopback address apart from HAProxy's own 127.0.0.1, which
#: is the trusted proxy), and a bystander's.
CLIENT, VICTIM = "127.0.0.2", "127.0.0.3"
FORGED = {"Forwarded": f"for={VICTIM}", "X-Forwarded-For": VICTIM}


def shipped_header_rules() -> list[str]:
    """The shipped frontend's lines that decide what the instances get told: its
    ``http-request`` rules and ``option forwardfor``."""
    rules, section = [], None
    for line in SHIPPED.read_text().splitlines():
        if line[:1].isalpha():
            section = line.split()
            continue
        words = line.split()
        if section and section[0] == "frontend" and words and (
            words[0] == "http-request" or words[:2] == ["option", "forwardfor"]
        ):
            rules.append(line.strip())
    assert any(r.startswith("option forwardfor") for r in rules), rules
    return rules


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




@pytest.fixture
def haproxy(tmp_path):
    """Start HAProxy in front of a backend port: the shipped header rules (or ``rules``) on a
    plain 127.0.0.1 frontend; ``send_proxy`` adds the PROXY header on the server line.  Fires with
    the frontend's port once it accepts; every HAProxy is stopped after the test."""
    binary = require_haproxy()
    started: list[CollectingProcess] = []

    @pytest_twisted.inlineCallbacks
    def start(backend: int, send_proxy: bool = False, rules: list[str] | None = None):
        port = free_port()
        lines = "\n    ".join(shipped_header_rules() if rules is None else rules)
        config = tmp_path / f"haproxy{len(started)}.cfg"
        config.write_text(
            "global\n    maxconn 200\n"
            "defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n"
            "    timeout server 60s\n    timeout tunnel 60s\n"
            f"frontend novnc\n    bind 127.0.0.1:{port}\n    {lines}\n"
            "    default_backend novnc\n"
            "backend novnc\n"
            f"    server one 127.0.0.1:{backend}{' send-proxy' if send_proxy else ''}\n"
        )
        proto = CollectingProcess()
        started.append(proto)
        reactor.spawnProcess(proto, binary, [binary, "-db", "-f", str(config)], env={})

        def accepting():
            if proto.ended.called:
                raise RuntimeError(f"haproxy exited:\n{proto.output}")
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
            d = endpoint.connect(Factory.forProtocol(Protocol))
            d.addCallback(lambda p: p.transport.loseConnection() or True)
            d.addErrback(lambda f: f.trap(ConnectError) and False)
            return d

        yield until(accepting)
        return port

    yield start
    for proto in started:
        if not proto.ended.called:
            proto.transport.signalProcess(signal.SIGTERM)
            pytest_twisted.blockon(within(proto.ended))




@pytest_twisted.inlineCallbacks
def upgrade(port: int, bind: str, path: str, headers: dict[str, str], preamble: bytes = b""):
    proto = RawUpgrade(path, headers, preamble)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(bind, 0))
    yield connectProtocol(endpoint, proto)
    return proto


@pytest_twisted.inlineCallbacks
def close_all(protos: list[RawUpgrade]):
    for proto in protos:
        proto.transport.loseConnection()
    yield within(defer.DeferredList([p.done for p in protos]))


class HeadRecorder(Protocol):
    """A backend that records the request head HAProxy forwards, then answers 204."""

    def dataReceived(self, data: bytes) -> None:
        heads = self.factory.heads
        heads.append(data)
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()
            self.factory.received.callback(b"".join(heads))


@pytest_twisted.inlineCallbacks
def test_shipped_rules_leave_one_x_forwarded_for(haproxy):
    """Through the shipped rules, a client's own Forwarded and X-Forwarded-For are gone: the
    backend gets exactly one X-Forwarded-For, the client's real address."""
    factory = Factory.forProtocol(HeadRecorder)
    factory.heads, factory.received = [], defer.Deferred()
    listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        port = yield haproxy(listening.getHost().port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in FORGED.items())
        request = (
            f"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}"
            "X-Forwarded-For: 1.2.3.4\r\n\r\n"  # a second line, as a second hop would add
        )
        proto = RawExchange(request.encode())
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(CLIENT, 0))
        yield connectProtocol(endpoint, proto)
        head = (yield within(factory.received)).decode().lower()
        yield within(proto.done)
    finally:
        yield listening.stopListening()
    assert re.findall(r"^x-forwarded-for:[^\r\n]*", head, re.M) == [f"x-forwarded-for: {CLIENT}"]
    assert not re.findall(r"^forwarded:", head, re.M), head


@pytest.mark.parametrize("rules", ["shipped", "forwardfor-only"])
@pytest_twisted.inlineCallbacks
def test_forged_headers_through_haproxy_change_nothing(daemon_factory, haproxy, rules):
    """Behind the shipped HAProxy, a client sending Forwarded and X-Forwarded-For is logged
    and limited under its real address: with max_per_ip = 1 it cannot dodge the cap, nor
    charge a victim's address, which still gets in.  The daemon holds on its own too, behind
    a balancer that passes the client's headers through (a bare ``option forwardfor``)."""
    daemon = yield daemon_factory(
        trusted_proxies="127.0.0.1", max_per_ip=1, readiness_timeout=30
    )
    port = yield haproxy(daemon.port, rules=None if rules == "shipped" else ["option forwardfor"])
    first, second, victim = new_id(), new_id(), new_id()
    held = [(yield upgrade(port, CLIENT, f"/websockify/{first}", FORGED))]
    yield within(daemon.when_logged(rf"request {first} from {re.escape(CLIENT)}: waiting"))
    other = {"Forwarded": "for=1.2.3.4", "X-Forwarded-For": "1.2.3.4"}
    dodge = yield upgrade(port, CLIENT, f"/websockify/{second}", other)
    yield within(daemon.when_logged(rf"refused {second} from {re.escape(CLIENT)}: 4429"))
    yield within(dodge.done)
    held.append((yield upgrade(port, VICTIM, f"/websockify/{victim}", {})))
    yield within(daemon.when_logged(rf"request {victim} from {re.escape(VICTIM)}: waiting"))
    yield close_all(held)
    assert "from 1.2.3.4" not in daemon.output
    assert daemon.count(rf"from {re.escape(VICTIM)}") == 1, daemon.output


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_proxy_header_only_from_proxy_protocol_from(daemon_factory, haproxy, workers):
    """A haproxy: listener honours the PROXY header HAProxy (127.0.0.1, allowed) sends, and
    closes at accept a peer outside proxy_protocol_from before reading its header; in the
    workers too."""
    daemon = yield daemon_factory(
        listen="haproxy:tcp:0:interface=127.0.0.1", proxy_protocol_from="127.0.0.1/32",
        readiness_timeout=30, workers=workers,
    )
    port = yield haproxy(daemon.port, send_proxy=True)
    honoured, forged = new_id(), new_id()
    held = yield upgrade(port, CLIENT, f"/websockify/{honoured}", {})
    yield within(daemon.when_logged(rf"request {honoured} from {re.escape(CLIENT)}: waiting"))
    preamble = b"PROXY TCP4 203.0.113.7 127.0.0.1 4711 6080\r\n"
    direct = yield upgrade(daemon.port, "127.0.0.5", f"/websockify/{forged}", {}, preamble)
    yield within(direct.done)
    yield within(daemon.when_logged(
        r"closed a connection from 127\.0\.0\.5 on haproxy:tcp:0:interface=127\.0\.0\.1:"
        r" not in \[novnc\] proxy_protocol_from"
    ))
    yield close_all([held])
    assert forged not in daemon.output
    assert "203.0.113.7" not in daemon.output



class Held(Protocol):
    """A connection that sends nothing; ``done`` fires when the other side closes it."""

    def __init__(self) -> None:
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(None)


@pytest.mark.parametrize("form", ["haproxy", "ssl"])
@pytest_twisted.inlineCallbacks
def test_wrapped_listener_at_max_connections_closes_cleanly(daemon_factory, tmp_path, form):
    """Beyond max_connections, a haproxy: or ssl: listener (whose wrappers cannot take "no
    protocol") closes the new socket at once, without a traceback."""
    if form == "haproxy":
        listen = "haproxy:tcp:0:interface=127.0.0.1"
    else:
        key, cert = self_signed(tmp_path)
        listen = (f"ssl:0:interface=127.0.0.1:privateKey={endpoint_arg(key)}"
                  f":certKey={endpoint_arg(cert)}")
    daemon = yield daemon_factory(
        listen=listen, proxy_protocol_from="127.0.0.1", max_connections=1, request_timeout=60
    )
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port)
    first = yield connectProtocol(endpoint, Held())
    second = yield connectProtocol(endpoint, Held())
    yield within(second.done)
    yield within(daemon.when_logged(r"max_connections \(1\) reached"))
    assert not first.done.called
    first.transport.loseConnection()
    yield within(first.done)
    assert "Unhandled Error" not in daemon.output and "Traceback" not in daemon.output
