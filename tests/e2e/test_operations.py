"""Operations with the real daemon: metrics, health, JSON logs, real client addresses,
keep-alive and command-line overrides."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from daemon_process import LISTENING_FOR_CHANGES, DaemonProcess, start_daemon, write_config
from db_fixtures import insert_ready
from e2e_support import (
    RawUpgrade,
    connect_session,
    http_get,
    metric_values,
    new_id,
    until,
    within,
)
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory

from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]





@pytest_twisted.inlineCallbacks
def test_start_up_names_the_running_versions(daemon_factory):
    """The daemon's log says, at start-up, which twisted_novnc and libraries it runs."""
    from twisted_novnc.versions import describe

    daemon = yield daemon_factory()
    yield within(daemon.when_logged("running twisted_novnc "))
    assert f"running {describe()}" in daemon.output


@pytest_twisted.inlineCallbacks
def test_metrics_after_real_connections(daemon_factory, pg, sessions_table, vnc_server):
    """/metrics is Prometheus text that counts what really happened."""
    daemon = yield daemon_factory(
        {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}, readiness_timeout=1
    )
    assert daemon.admin_port
    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    client = yield connect_session(daemon.port, sid)
    yield within(client.when_received(len(RFB_BANNER)))
    client.sendMessage(b"12345", isBinary=True)
    yield within(client.when_received(len(RFB_BANNER) + 5))
    client.sendClose(1000)
    yield within(client.closed)
    missing = yield connect_session(daemon.port, new_id())
    yield within(missing.closed)
    yield within(daemon.when_logged("closed .*: 4404"))
    status, body = yield http_get(daemon.admin_port, "/metrics")
    assert status == 200
    values = metric_values(body.decode())
    assert values["twisted_novnc_connections_total", (("outcome", "1000"),)] == 1
    assert values["twisted_novnc_connections_total", (("outcome", "4404"),)] == 1
    assert values["twisted_novnc_relayed_bytes_total", (("direction", "up"),)] == 5
    assert values["twisted_novnc_relayed_bytes_total", (("direction", "down"),)] == len(
        RFB_BANNER
    ) + 5
    assert values["twisted_novnc_readiness_wait_seconds_count", ()] == 1
    assert values["twisted_novnc_upstream_connect_seconds_count", ()] == 1
    assert values["twisted_novnc_connections_open", ()] == 0
    assert values["twisted_novnc_waiting_clients", ()] == 0
    assert values["twisted_novnc_listen_connected", ()] == 1
    assert values["twisted_novnc_build_info", (("version", "0.1.0"),)] == 1
    assert ("twisted_novnc_database_reconnects_total", ()) in values


@pytest_twisted.inlineCallbacks
def test_readyz_flips_with_the_database(private_cluster, private_daemon):
    """/readyz is 200 while the database is reachable and LISTEN is up, 503 (with why) while
    it is stopped, and 200 again after it restarts; /healthz stays 200."""
    daemon = yield private_daemon({"admin": {"listen": "tcp:0:interface=127.0.0.1"}})
    status, body = yield http_get(daemon.admin_port, "/readyz")
    assert (status, json.loads(body)["ready"]) == (200, True)
    private_cluster.stop()
    yield within(daemon.when_logged("database unreachable"))
    status, body = yield http_get(daemon.admin_port, "/readyz")
    assert status == 503
    assert json.loads(body)["ready"] is False and json.loads(body)["reason"]
    status, _ = yield http_get(daemon.admin_port, "/healthz")
    assert status == 200
    private_cluster.restart()
    yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=2))
    # LISTEN and the query pool reconnect each on their own backoff: /readyz turns 200 once
    # both are back, which a load balancer learns the same way, by asking again.
    answers: list = []

    def ready():
        return http_get(daemon.admin_port, "/readyz").addCallback(
            lambda answer: answers.append(answer) or answer[0] == 200
        )

    yield until(ready)
    status, body = answers[-1]
    assert (status, json.loads(body)["ready"]) == (200, True)


@pytest_twisted.inlineCallbacks
def test_json_log_lines(daemon_factory, pg, sessions_table, vnc_server):
    """With [log] format = json each line is a JSON object carrying the lifecycle's keys."""
    daemon = yield daemon_factory({"log": {"format": "json"}})
    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    client = yield connect_session(daemon.port, sid)
    yield within(client.when_received(len(RFB_BANNER)))
    client.sendClose(1000)
    yield within(client.closed)
    yield within(daemon.when_logged(f'"message": "closed {sid}'))
    events = [json.loads(line) for line in daemon.output.splitlines() if line.startswith("{")]
    assert events, daemon.output
    by_message = {e["message"].split(" ")[0]: e for e in events if e.get("session_id") == sid}
    assert {"request", "session", "upstream", "closed"} <= set(by_message)
    opened = by_message["upstream"]
    assert "relay open" in opened["message"] and opened["port"] == vnc_server.port
    assert opened["connect_seconds"] <= opened["wait_seconds"]
    closed = by_message["closed"]
    assert closed["client"] == "127.0.0.1" and closed["outcome"] == "1000"
    assert closed["down_bytes"] == len(RFB_BANNER) and closed["up_bytes"] == 0
    assert closed["level"] == "info" and isinstance(closed["wait_seconds"], float)


@pytest_twisted.inlineCallbacks
def test_log_file_reopened_on_sighup(postgres_dsn, sessions_table, tmp_path):
    """[log] file is written, and reopened on SIGHUP after logrotate moved it."""
    log = tmp_path / "novnc.log"
    port = yield _free_port()
    config = write_config(
        tmp_path / "log.ini", postgres_dsn, sessions_table,
        {"log": {"file": str(log)}}, listen=f"tcp:{port}:interface=127.0.0.1",
    )
    daemon = DaemonProcess()
    start = start_daemon(config, tmp_path, daemon)
    yield within(_file_contains(log, LISTENING_FOR_CHANGES))
    try:
        os.rename(log, tmp_path / "novnc.log.1")
        daemon.transport.signalProcess(signal.SIGHUP)
        yield within(_file_exists(log))
        client = yield connect_session(port, new_id())
        yield within(_file_contains(log, "request "))
        client.leave()
        rotated = (tmp_path / "novnc.log.1").read_text()
        assert LISTENING_FOR_CHANGES in rotated and "request " not in rotated
    finally:
        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.ended)
        start.cancel()
        start.addErrback(lambda _: None)




@pytest_twisted.inlineCallbacks
def test_proxy_protocol_client_address(daemon_factory):
    """Behind a haproxy: listener, the PROXY protocol's source address is the client's."""
    daemon = yield daemon_factory(
        listen="haproxy:tcp:0:interface=127.0.0.1", proxy_protocol_from="127.0.0.1",
        readiness_timeout=1,
    )
    sid = new_id()
    preamble = b"PROXY TCP4 203.0.113.7 127.0.0.1 4711 6080\r\n"
    proto = RawUpgrade(f"/websockify/{sid}", {}, preamble)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), proto)
    yield within(daemon.when_logged(f"request {sid} from 203.0.113.7"))
    yield within(proto.done)


@pytest_twisted.inlineCallbacks
def test_forwarded_for_only_from_trusted_proxies(daemon_factory):
    """X-Forwarded-For names the client only when the peer is a trusted proxy."""
    daemon = yield daemon_factory(trusted_proxies="127.0.0.1", readiness_timeout=1)
    trusted, untrusted = new_id(), new_id()
    headers = {"X-Forwarded-For": "198.51.100.4"}
    for sid, bind in ((trusted, "127.0.0.1"), (untrusted, "127.0.0.2")):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port, bindAddress=(bind, 0))
        proto = RawUpgrade(f"/websockify/{sid}", headers)
        yield connectProtocol(endpoint, proto)
        yield within(proto.done)
    yield within(daemon.when_logged(f"request {trusted} from 198.51.100.4"))
    yield within(daemon.when_logged(f"request {untrusted} from 127.0.0.2"))


@pytest_twisted.inlineCallbacks
def test_pings_keep_idle_sessions_and_find_vanished_browsers(
    daemon_factory, pg, sessions_table, vnc_server
):
    """An idle browser is pinged and stays; one that stops answering is closed, with its VM."""
    daemon = yield daemon_factory(ping_interval=1, ping_timeout=2)
    idle, vanished = new_id(), new_id()
    insert_ready(pg, sessions_table, idle, vnc_server.port)
    insert_ready(pg, sessions_table, vanished, vnc_server.port)
    a = yield connect_session(daemon.port, idle)
    b = yield connect_session(daemon.port, vanished)
    for client in (a, b):
        yield within(client.when_received(len(RFB_BANNER)))
    pings: list[bytes] = []
    a.onPing = lambda payload, a=a: (pings.append(payload), a.sendPong(payload))
    b.transport.pauseProducing()  # the browser vanished: it reads (and answers) nothing
    yield within(daemon.when_logged(f"closed {vanished} from 127.0.0.1"))
    yield within(until(lambda: len(pings) >= 3))
    assert not a.closed.called
    yield within(until(lambda: len(vnc_server.connections) == 1))  # the vanished one's VM
    b.transport.abortConnection()  # a paused socket is in no reactor set: close it ourselves
    a.sendClose(1000)
    yield within(a.closed)


@pytest_twisted.inlineCallbacks
def test_command_line_overrides_ini(postgres_dsn, sessions_table, tmp_path):
    """--listen and --set override the ini file's keys."""
    config = write_config(
        tmp_path / "c.ini", postgres_dsn, sessions_table, listen="tcp:1:interface=127.0.0.1"
    )
    daemon = DaemonProcess()
    yield start_daemon(
        config, tmp_path, daemon,
        args=("--listen", "tcp:0:interface=127.0.0.1", "--set", "novnc.readiness_timeout=1"),
    )
    try:
        client = yield connect_session(daemon.port, new_id())
        assert (yield within(client.closed)) == (4404, "no such session")
        assert "waited=1." in daemon.output or "after 1s" in daemon.output
    finally:
        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.ended)


@pytest_twisted.inlineCallbacks
def _free_port():
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    yield port.stopListening()
    return number


def _file_contains(path: Path, text: str) -> defer.Deferred:
    return until(lambda: path.exists() and text in path.read_text())


def _file_exists(path: Path) -> defer.Deferred:
    return until(path.exists)


@pytest_twisted.inlineCallbacks
def test_dsn_password_never_logged(postgres_dsn, sessions_table, tmp_path):
    """A DSN password never appears in the log, in text or JSON, even when the database fails."""
    secret = "sekrit-" + uuid.uuid4().hex
    for fmt, dsn in (("text", f"{postgres_dsn} password={secret}"),
                     ("json", f"host=/nonexistent password={secret}")):
        config = write_config(
            tmp_path / f"{fmt}.ini", dsn, sessions_table, {"log": {"format": fmt}},
            readiness_timeout=1,
        )
        daemon = DaemonProcess()
        yield start_daemon(config, tmp_path, daemon, wait_for_database=(fmt == "text"))
        try:
            client = yield connect_session(daemon.port, new_id())
            yield within(client.closed)
            yield within(daemon.when_logged("closed "))
        finally:
            daemon.transport.signalProcess(signal.SIGTERM)
            yield within(daemon.ended)
        assert secret not in daemon.output
