"""Drain behind a real HAProxy (Debian's) running the shipped etc/haproxy.cfg, in front of two
real daemons: SIGTERM to one turns its /readyz 503 at once, it serves new browsers on for
[novnc] drain_delay while HAProxy marks it down, its live relays end with 1001 (not 1006)
after the drain, and every new browser is served, by the other one once HAProxy has noticed."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import pytest_twisted
from db_fixtures import insert_ready
from e2e_support import (
    CollectingProcess,
    banner_echo_close,
    connect_session,
    http_get,
    new_id,
    until,
    within,
)
from required_tools import require_haproxy
from test_forwarded_haproxy import free_port
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol

from twisted_novnc.config import NovncSettings
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "haproxy.cfg"
ADMIN = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}
#: Seconds the stopping daemon's relays go on after the delay (short: the test waits them out).
DRAIN_TIMEOUT = 3


def shipped_config(port: int, stats: Path, servers: list[tuple[str, int, int]]) -> str:
    """etc/haproxy.cfg with only its addresses templated: the frontend binds plain
    127.0.0.1:``port`` (no TLS), the global section has a stats socket (and a maxconn a test
    machine grants), and the server lines name the test's daemons (``name``, port, admin port:
    each daemon's own admin port, where the shipped config has one on every host).  The
    backend's balancing, checks and timings are the shipped ones."""
    lines = []
    for line in SHIPPED.read_text().splitlines():
        words = line.split()
        if words[:1] == ["maxconn"]:
            lines += ["    maxconn 200", f"    stats socket {stats} level admin"]
        elif words[:1] == ["bind"]:
            lines.append(f"    bind 127.0.0.1:{port}")
        elif words[:1] == ["server"]:
            continue
        elif words[:1] == ["default-server"]:
            assert words[1:4] == ["check", "port", "9108"], line
            lines.append("    default-server " + " ".join(words[4:]))
        else:
            lines.append(line)
    for name, server_port, admin_port in servers:
        lines.append(f"    server {name} 127.0.0.1:{server_port} check port {admin_port}")
    return "\n".join(lines) + "\n"


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


@pytest_twisted.inlineCallbacks
def server_states(stats: Path):
    """{server name: status} of the backend, from HAProxy's stats socket (``show stat``)."""
    proto = Collect()
    yield connectProtocol(UNIXClientEndpoint(reactor, str(stats)), proto)
    proto.transport.write(b"show stat\n")
    text = (yield within(proto.done)).decode()
    rows = [line.split(",") for line in text.splitlines() if line]
    header = rows[0]
    header[0] = header[0].lstrip("# ")
    name, status = header.index("svname"), header.index("status")
    return {
        row[name]: row[status] for row in rows[1:]
        if row[0] == "novnc" and row[name] not in ("BACKEND", "FRONTEND")
    }


@pytest.fixture
def haproxy_shipped(tmp_path):
    """Start HAProxy with the shipped config in front of daemons; fires with (frontend port,
    stats socket) once it accepts and every server is UP; stopped after the test."""
    binary = require_haproxy()
    started: list[CollectingProcess] = []

    @pytest_twisted.inlineCallbacks
    def start(servers: list[tuple[str, int, int]]):
        port = free_port()
        stats = tmp_path / "haproxy.sock"
        config = tmp_path / "haproxy.cfg"
        config.write_text(shipped_config(port, stats, servers))
        proto = CollectingProcess()
        started.append(proto)
        reactor.spawnProcess(proto, binary, [binary, "-db", "-f", str(config)], env={})

        def all_up():
            if proto.ended.called:
                raise RuntimeError(f"haproxy exited:\n{proto.output}")
            if not stats.exists():
                return False
            d = server_states(stats)
            d.addCallback(lambda states: len(states) == len(servers)
                          and all(s == "UP" for s in states.values()))
            return d.addErrback(lambda f: f.trap(ConnectError) and False)

        yield until(all_up)
        return port, stats, proto

    yield start
    for proto in started:
        if not proto.ended.called:
            proto.transport.signalProcess(signal.SIGTERM)
            pytest_twisted.blockon(within(proto.ended))


@defer.inlineCallbacks
def served_by(daemons: dict, *sids: str):
    """The names of the daemons whose logs have the requests for ``sids``, each in exactly one.
    Waits for the lines: a browser may be served before its daemon's log line (with workers,
    relayed by the main process) has reached this process."""
    names = set()
    for sid in sids:
        pattern = re.escape(f"request {sid}")
        watches = [daemon.when_logged(pattern) for daemon in daemons.values()]
        yield within(defer.DeferredList(watches, fireOnOneCallback=True))
        found = [name for name, daemon in daemons.items() if f"request {sid}" in daemon.output]
        assert len(found) == 1, (sid, found)
        names.add(found[0])
    return names


@pytest_twisted.inlineCallbacks
def browsers_served(port: int, pg, table, vnc_port: int, count: int):
    """``count`` new browsers, one after the other, each served end to end through ``port``
    (banner, echo, clean close): none refused.  Fires with their session ids."""
    ids = []
    for _ in range(count):
        sid = new_id()
        insert_ready(pg, table, sid, vnc_port)
        client = yield connect_session(port, sid)
        yield banner_echo_close(client, b"hello " + sid.encode())
        ids.append(sid)
    return ids


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.inlineCallbacks
def test_sigterm_behind_haproxy_drains_without_a_refusal(
    daemon_factory, haproxy_shipped, pg, sessions_table, vnc_server, workers
):
    """SIGTERM to one of two daemons behind the shipped HAProxy: its /readyz is 503 at once,
    it still serves new browsers until HAProxy has marked it down (before its drain starts),
    then new browsers reach the other one; its live relays end with 1001 after the drain, the
    other's go on; no browser is refused, with one process or with workers."""
    delay = NovncSettings().drain_delay  # the shipped default, against the shipped checks
    options = dict(drain_delay=delay, drain_timeout=DRAIN_TIMEOUT, workers=workers)
    one = yield daemon_factory(ADMIN, **options)
    two = yield daemon_factory(ADMIN, **options)
    daemons = {"novnc1": one, "novnc2": two}
    port, stats, haproxy = yield haproxy_shipped(
        [(name, d.port, d.admin_port) for name, d in daemons.items()]
    )

    def served(count: int):
        return browsers_served(port, pg, sessions_table, vnc_server.port, count)

    live, where = [], {}
    for _ in range(6):  # leastconn spreads held relays over both
        sid = new_id()
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        client = yield connect_session(port, sid)
        assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER
        live.append(client)
        (where[client],) = yield served_by(daemons, sid)
    on_one = [c for c in live if where[c] == "novnc1"]
    on_two = [c for c in live if where[c] == "novnc2"]
    assert on_one and on_two, where

    one.transport.signalProcess(signal.SIGTERM)
    yield within(one.when_logged(r"shutting down: /readyz answers 503"))
    code, body = yield http_get(one.admin_port, "/readyz")
    assert code == 503 and b'"shutting_down": true' in body
    assert (yield http_get(one.admin_port, "/healthz"))[0] == 200
    # During drain_delay the stopping daemon still serves: directly, and through HAProxy
    # until it is marked down (whichever daemon it picks, nobody is refused).
    direct = yield browsers_served(one.port, pg, sessions_table, vnc_server.port, 2)
    assert (yield served_by(daemons, *direct)) == {"novnc1"}
    yield served(3)

    def one_down():
        return server_states(stats).addCallback(lambda states: states["novnc1"].startswith("DOWN"))

    yield until(one_down)
    draining = re.compile(r"draining: |stopping \d+ workers")
    assert not draining.search(one.output), "the drain started before HAProxy noticed"
    assert one.transport is not None and not one.ended.called
    after = yield served(4)
    assert (yield served_by(daemons, *after)) == {"novnc2"}

    results = yield within(defer.gatherResults([c.closed for c in on_one]), 30)
    assert results == [(1001, "server shutting down")] * len(on_one)
    assert draining.search(one.output)
    assert (yield served_by(daemons, *(yield served(2)))) == {"novnc2"}
    assert (yield within(one.ended, 30)) in (0, None), one.output[-3000:]
    for client in on_two:  # the other daemon's relays never noticed
        assert not client.closed.called
        client.sendMessage(b"still here", isBinary=True)
        data = yield within(client.when_received(len(RFB_BANNER) + 10))
        assert data == RFB_BANNER + b"still here"
        client.sendClose(1000)
        assert (yield within(client.closed)) == (1000, None)
    assert "refused" not in one.output + two.output
    assert not re.search(r" 50[234] ", haproxy.output), haproxy.output[-3000:]
