"""VM credentials ([vnc]) through a real daemon, against scripted VNC servers on loopback:
the login and the greeting around a working relay, each failure's close code and metric, and
the password never in the log, text or JSON.  (The real Xvnc and noVNC are in
tests/browser/test_vnc_credentials.py.)"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from db_fixtures import insert_ready
from e2e_support import connect_session, http_get, metric_values, new_id, until, within
from test_upgrade import moved_count
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from upgrade_support import run_upgrade

from twisted_novnc.database.embedded import apply_sql
from twisted_novnc.vnc.vncauth import vnc_auth_response

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PASSWORD = "Qx7-vnc-pw"
SERVER_INIT = b"SERVERINIT"
#: The proxy's side of the browser's opening, and the browser's (RFB 3.8, security None).
PROXY_GREETING = b"RFB 003.008\n"
BROWSER_VERSION = b"RFB 003.008\n"


class ScriptedVNC(Protocol):
    """A VNC server that speaks what its factory's ``opening`` says, then, after a login
    with the right password, answers ClientInit with SERVER_INIT and echoes."""

    factory: ScriptedVNCFactory
    transport: Any

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""
        self.state = "version"
        self.challenge = os.urandom(16)
        if self.factory.held is not None:  # the test says when the VM answers
            held, self.factory.held = self.factory.held, None
            held.callback(lambda: self.transport.write(self.factory.opening))
            return
        self.transport.write(self.factory.opening)
        if self.factory.opening != b"RFB 003.008\n":
            self.state = "scripted"

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.state == "version" and len(self.buffer) >= 12:
            self.buffer = self.buffer[12:]
            self.state = "type"
            self.transport.write(b"\x01\x02")
        if self.state == "type" and len(self.buffer) >= 1:
            self.buffer = self.buffer[1:]
            self.state = "response"
            self.transport.write(self.challenge)
        if self.state == "response" and len(self.buffer) >= 16:
            response, self.buffer = self.buffer[:16], self.buffer[16:]
            if response == vnc_auth_response(PASSWORD, self.challenge):
                self.state = "client init"
                self.transport.write(struct.pack("!I", 0))
            else:
                reason = b"Authentication failure"
                self.transport.write(struct.pack("!II", 1, len(reason)) + reason)
                self.transport.loseConnection()
                self.state = "done"
        if self.state == "client init" and len(self.buffer) >= 1:
            self.factory.client_init = self.buffer[:1]
            self.buffer = self.buffer[1:]
            self.state = "echo"
            self.transport.write(SERVER_INIT)
        if self.state == "echo" and self.buffer:
            self.transport.write(self.buffer)
            self.buffer = b""


class ScriptedVNCFactory(Factory):
    protocol = ScriptedVNC

    def __init__(self, opening: bytes) -> None:
        self.opening = opening
        self.connections = 0
        self.client_init = b""
        #: When set, the next connection waits: this fires with what makes it speak.
        self.held: defer.Deferred[Any] | None = None


@pytest.fixture
def vnc_factory() -> Iterator[Any]:
    """Start scripted VNC servers on loopback (``opening``: what each sends first; RFB 3.8
    means the full VncAuth script); all stop after the test."""
    ports = []

    def start(opening: bytes = b"RFB 003.008\n") -> tuple[ScriptedVNCFactory, int]:
        factory = ScriptedVNCFactory(opening)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return factory, port.getHost().port

    yield start
    for port in ports:
        stopped = port.stopListening()
        if stopped is not None:
            pytest_twisted.blockon(stopped)


def add_password_column(postgres_dsn, db) -> None:  # type: ignore[no-untyped-def]
    """The column the daemon reads the password from: there before it starts, which checks
    that every configured column exists."""
    apply_sql(postgres_dsn, f'ALTER TABLE "{db.table}" ADD COLUMN vnc_pw text')


def set_password(db, pg, sid, password):  # type: ignore[no-untyped-def]
    with pg.cursor() as cur:
        cur.execute(f'UPDATE "{db.table}" SET vnc_pw = %s WHERE session_id = %s', (password, sid))


@defer.inlineCallbacks
def greet(client: Any) -> Any:
    """The browser's side of the proxy's opening: version, security None, ClientInit."""
    yield within(client.when_received(len(PROXY_GREETING)))
    client.sendMessage(BROWSER_VERSION, isBinary=True)
    yield within(client.when_received(len(PROXY_GREETING) + 2))
    assert bytes(client.received) == PROXY_GREETING + b"\x01\x01"
    client.sendMessage(b"\x01", isBinary=True)
    yield within(client.when_received(len(PROXY_GREETING) + 6))
    assert bytes(client.received)[-4:] == b"\x00\x00\x00\x00"
    client.sendMessage(b"\x01", isBinary=True)  # ClientInit: shared
    got = yield within(client.when_received(len(PROXY_GREETING) + 6 + len(SERVER_INIT)))
    assert got.endswith(SERVER_INIT)


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest_twisted.inlineCallbacks
def test_login_greeting_and_relay_keep_the_password_secret(
    daemon_factory, pg, sessions_table, postgres_dsn, vnc_factory, log_format
):
    """The proxy logs in with the row's password, greets the browser with security None,
    passes ClientInit and the relay through, and the password is in no log line, text or
    JSON, and in no metric."""
    vm, port = vnc_factory()
    add_password_column(postgres_dsn, sessions_table)
    daemon = yield daemon_factory({
        "vnc": {"password_column": "vnc_pw"},
        "log": {"format": log_format},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
    })
    sid = new_id()
    insert_ready(pg, sessions_table, sid, port)
    set_password(sessions_table, pg, sid, PASSWORD)
    client = yield connect_session(daemon.port, sid)
    yield greet(client)
    assert vm.client_init == b"\x01"
    client.sendMessage(b"frame", isBinary=True)
    yield within(client.when_received(len(PROXY_GREETING) + 6 + len(SERVER_INIT) + 5))
    client.sendClose(1000)
    yield within(client.closed)
    yield within(daemon.when_logged("closed"))
    status, body = yield http_get(daemon.admin_port, "/metrics")
    values = metric_values(body.decode())
    assert values["twisted_novnc_vm_logins_total", (("result", "ok"),)] == 1
    assert PASSWORD not in body.decode()
    assert f"logged in to the VM of {sid} with VncAuth" in daemon.output
    if log_format == "json":
        (event,) = [
            json.loads(line) for line in daemon.output.splitlines()
            if "logged in to the VM" in line
        ]
        assert event["session_id"] == sid and event["security"] == "VncAuth"
    assert PASSWORD not in daemon.output


@pytest.mark.parametrize(
    ("opening", "code", "reason", "result"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", 4522, "VM does not speak RFB", "not_rfb"),
        (b"RFB 003.008\n\x01\x1e", 4521, "VM offers no supported security type",
         "no_security_type"),
        (b"RFB 003.008\n\x00\x00\x00\x00\x0dToo many auth", 4523, "VM refused the connection",
         "refused"),
        (b"RFB 003.008\n", 4520, "VM refused the credentials", "credentials_refused"),
    ],
    ids=["not-rfb", "no-supported-type", "vm-refuses", "wrong-password"],
)
@pytest_twisted.inlineCallbacks
def test_each_login_failure_has_its_close_code_and_metric(
    daemon_factory, pg, sessions_table, postgres_dsn, vnc_factory, opening, code, reason, result
):
    """Not RFB, no supported type, a refusal with a reason, a wrong password: each closes the
    browser with its own code and reason, is logged with the session id, counted, and never
    retried (the VM sees one connection)."""
    vm, port = vnc_factory(opening)
    add_password_column(postgres_dsn, sessions_table)
    daemon = yield daemon_factory(
        {"vnc": {"password_column": "vnc_pw"}, "admin": {"listen": "tcp:0:interface=127.0.0.1"}}
    )
    sid = new_id()
    insert_ready(pg, sessions_table, sid, port)
    set_password(sessions_table, pg, sid, "not-" + PASSWORD)
    client = yield connect_session(daemon.port, sid)
    closed = yield within(client.closed)
    assert closed == (code, reason)
    assert bytes(client.received) == b""  # nothing of the VM's reaches the browser
    yield within(daemon.when_logged(f"{sid} from .*: {code} {reason}"))
    status, body = yield http_get(daemon.admin_port, "/metrics")
    values = metric_values(body.decode())
    assert values["twisted_novnc_vm_logins_total", (("result", result),)] == 1
    assert values["twisted_novnc_connections_total", (("outcome", str(code)),)] == 1
    assert vm.connections == 1
    assert "not-" + PASSWORD not in daemon.output


@pytest_twisted.inlineCallbacks
def test_a_logged_in_relay_moves_in_an_upgrade_one_mid_greeting_stays(
    daemon_factory, pg, sessions_table, postgres_dsn, vnc_factory
):
    """After the opening a VNC Authentication relay is plain bytes both ways and moves to the
    new generation; one whose browser is still in the proxy's opening stays, and finishes
    it there.  Both go on working."""
    vm, port = vnc_factory()
    add_password_column(postgres_dsn, sessions_table)
    daemon = yield daemon_factory(
        {"vnc": {"password_column": "vnc_pw"}, "admin": {"listen": "tcp:0:interface=127.0.0.1"}}
    )
    open_sid, greeting_sid = new_id(), new_id()
    for sid in (open_sid, greeting_sid):
        insert_ready(pg, sessions_table, sid, port)
        set_password(sessions_table, pg, sid, PASSWORD)
    relaying = yield connect_session(daemon.port, open_sid)
    yield greet(relaying)
    greeting = yield connect_session(daemon.port, greeting_sid)
    yield within(greeting.when_received(len(PROXY_GREETING)))  # and says nothing yet

    code, output = yield run_upgrade(daemon.admin_port)
    assert code == 0, output
    assert moved_count(output) == 1 and "1 stay in the old generation" in output, output

    before = len(relaying.received)
    relaying.sendMessage(b"after the move", isBinary=True)
    yield within(relaying.when_received(before + len(b"after the move")))
    yield greet(greeting)
    greeting.sendMessage(b"old generation", isBinary=True)
    yield within(greeting.when_received(len(PROXY_GREETING) + 6 + len(SERVER_INIT) + 14))
    for client in (relaying, greeting):
        client.sendClose(1000)
        assert (yield within(client.closed)) == (1000, None)


@pytest_twisted.inlineCallbacks
def test_session_ended_during_the_vm_login_is_revoked(
    daemon_factory, pg, sessions_table, postgres_dsn, vnc_factory
):
    """The session ends while the proxy is still logging in to its VM (after the read that
    found it ready, before its relay is watched): that NOTIFY finds no waiter and no relay.
    The relay, once it starts, reads its row again and closes with 4410."""
    vm, port = vnc_factory()
    vm.held = defer.Deferred()
    add_password_column(postgres_dsn, sessions_table)
    daemon = yield daemon_factory(
        {"vnc": {"password_column": "vnc_pw"}, "admin": {"listen": "tcp:0:interface=127.0.0.1"}}
    )
    sid = new_id()
    insert_ready(pg, sessions_table, sid, port)
    set_password(sessions_table, pg, sid, PASSWORD)
    client = yield connect_session(daemon.port, sid)
    speak = yield within(vm.held)  # the daemon has read the row and is at the VM's door
    with pg.cursor() as cur:
        cur.execute(
            f'UPDATE "{sessions_table.table}" SET status = %s WHERE session_id = %s',
            ("ended", sid),
        )

    def discarded() -> defer.Deferred[bool]:
        """Whether the NOTIFY has reached the daemon, and found nothing to wake."""
        key = ("twisted_novnc_notifications_total", (("result", "discarded"),))
        return http_get(daemon.admin_port, "/metrics").addCallback(
            lambda answer: metric_values(answer[1].decode()).get(key, 0.0) >= 1
        )

    yield until(discarded)
    speak()
    assert (yield within(client.closed)) == (4410, "session ended")
    yield within(daemon.when_logged(f"{sid} .*4410 session ended"))
