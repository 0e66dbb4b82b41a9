"""Honest logs and metrics with the real daemon (``twistd -n novnc``, ``[log] format = json``):
every line JSON with an event name from the first, in one process and with workers and a log
file; plain HTTP requests counted as such under their real client; a database outage said
once."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytest_twisted
from daemon_process import (
    LISTENING_FOR_CHANGES,
    DaemonProcess,
    start_daemon,
    stop_daemon,
    write_config,
)
from e2e_support import connect_client, exchange, http_get, metric_values, new_id, until, within
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


class SplitOutput(DaemonProcess):
    """The daemon, with its stdout and stderr kept apart (DaemonProcess joins them)."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout = ""
        self.stderr = ""

    def outReceived(self, data: bytes) -> None:
        self.stdout += data.decode("utf-8", "replace")
        super().outReceived(data)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data.decode("utf-8", "replace")
        super().outReceived(data)


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as JSON, each with an event name; fails on the first that is not."""
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(event, dict) and event.get("event"), f"line {number}: {line!r}"
        events.append(event)
    return events


@pytest.fixture
def web_root(tmp_path):
    root = tmp_path / "novnc"
    root.mkdir()
    (root / "vnc.html").write_text("<title>noVNC</title>")
    return root


@pytest_twisted.inlineCallbacks
def test_every_line_is_json_and_http_requests_are_counted_apart(
    postgres_dsn, sessions_table, tmp_path, web_root
):
    """format = json: every stdout line, twistd's first and last included, is JSON with an
    event name, and nothing goes to stderr; a file, a 404 and a 400 are http_request lines
    from 127.0.0.1 counted in twisted_novnc_http_requests_total, and none of them in
    twisted_novnc_connections_total; admin requests log no line."""
    config = write_config(
        tmp_path / "json.ini", postgres_dsn, sessions_table,
        {"log": {"format": "json"}, "web": {"root": str(web_root)},
         "admin": {"listen": "tcp:0:interface=127.0.0.1"}},
        # The start-up warnings, in JSON too.
        allowed_origins="",
    )
    daemon = SplitOutput()
    yield start_daemon(config, tmp_path, daemon)
    try:
        page = yield exchange(daemon.port, b"GET /vnc.html?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 200 ")
        missing = yield exchange(daemon.port, b"GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404 ")
        bad = yield exchange(daemon.port, b"GET /a b HTTP/1.1\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ")
        yield within(daemon.when_logged('"event": "http_request"', times=3))
        status, body = yield http_get(daemon.admin_port, "/metrics")
        assert status == 200
    finally:
        yield stop_daemon(daemon)
    values = metric_values(body.decode())
    for code in ("200", "404", "400"):
        assert values["twisted_novnc_http_requests_total", (("status", code),)] == 1
    assert values["twisted_novnc_http_request_duration_seconds_count", ()] == 3
    assert not [key for key in values if key[0] == "twisted_novnc_connections_total"]
    events = json_lines(daemon.stdout)
    assert daemon.stderr == ""
    names = [event["event"] for event in events]
    assert names[0] in ("twistd_starting", "versions"), names[:3]
    assert {"twistd_starting", "twistd_reactor", "versions", "origins_open_warning", "nvx",
            "descriptor_limit", "listening", "twistd_stopped"} <= set(names)
    requests = [event for event in events if event["event"] == "http_request"]
    assert sorted((e["path"], e["status"]) for e in requests) == [
        ("/a", 400), ("/nothing", 404), ("/vnc.html", 200)
    ]
    assert {e["client"] for e in requests} == {"127.0.0.1"}
    assert all(0 <= e["duration_seconds"] < 30 for e in requests)
    assert "connection_closed" not in names and "admin_request" not in names


@pytest_twisted.inlineCallbacks
def _free_port():
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    yield port.stopListening()
    return number


@pytest_twisted.inlineCallbacks
def test_workers_and_a_log_file_are_json_from_the_first_line(
    postgres_dsn, sessions_table, tmp_path
):
    """workers = 2 with [log] file: every line of the file is JSON with an event name from
    the first, the workers' lines included (with their index), and stdout stays empty."""
    log = tmp_path / "novnc.log"
    port = yield _free_port()
    config = write_config(
        tmp_path / "workers.ini", postgres_dsn, sessions_table,
        {"log": {"format": "json", "file": str(log)}},
        listen=f"tcp:{port}:interface=127.0.0.1", workers=2,
    )
    daemon = SplitOutput()
    start = start_daemon(config, tmp_path, daemon)
    try:
        yield within(until(lambda: log.exists() and log.read_text().count(
            LISTENING_FOR_CHANGES) >= 2))
        sid = new_id()
        client = yield connect_client(port, f"/websockify/{sid}")
        yield within(until(lambda: f'"request {sid} from 127.0.0.1' in log.read_text()))
        client.leave()
    finally:
        daemon.transport.signalProcess(signal.SIGTERM)
        yield within(daemon.ended)
        start.cancel()
        start.addErrback(lambda _: None)
    events = json_lines(log.read_text())
    assert events[0]["event"] in ("twistd_starting", "versions"), events[:3]
    workers = {event.get("worker") for event in events if event["event"] == "request_waiting"}
    assert workers <= {1, 2} and workers
    assert {"twistd_starting", "workers_starting", "worker_started", "twistd_stopped"} <= {
        event["event"] for event in events
    }
    assert daemon.stdout == "" and daemon.stderr == ""


def _count(path_or_text: str, event: str) -> int:
    return sum(1 for line in path_or_text.splitlines() if f'"event": "{event}"' in line)


@pytest_twisted.inlineCallbacks
def test_a_database_outage_is_logged_once(private_cluster, tmp_path):
    """While the database is down every connection retries and a waiting browser's lookups
    fail again and again: one database_unreachable line, one database_reachable line, and
    one session_lookup_failed line."""
    config = write_config(
        tmp_path / "outage.ini", private_cluster.dsn, private_cluster.db,
        {"log": {"format": "json"}}, readiness_timeout=30,
    )
    daemon = SplitOutput()
    yield start_daemon(config, tmp_path, daemon)
    try:
        private_cluster.stop()
        yield within(daemon.when_logged('"event": "database_unreachable"'))
        sid = new_id()
        client = yield connect_client(daemon.port, f"/websockify/{sid}")
        yield within(daemon.when_logged(f"request {sid} from"))
        yield within(daemon.when_logged('"event": "listen_lost"'))
        yield _reconnects_tried(private_cluster)
        private_cluster.restart()
        yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=2), 60)
        yield within(daemon.when_logged('"event": "database_reachable"'))
        client.leave()
    finally:
        yield stop_daemon(daemon)
    json_lines(daemon.stdout)
    assert _count(daemon.stdout, "database_unreachable") == 1, daemon.stdout
    assert _count(daemon.stdout, "database_reachable") == 1
    assert _count(daemon.stdout, "session_lookup_failed") == 1


class _Knocks(Protocol):
    """A connection to the stopped cluster's socket: counted, then dropped."""

    def connectionMade(self) -> None:
        self.factory.knocks += 1  # type: ignore[attr-defined]
        self.transport.abortConnection()  # type: ignore[union-attr]


@pytest_twisted.inlineCallbacks
def _reconnects_tried(cluster, times: int = 4):
    """Stand in for the stopped cluster on its socket until the daemon's connections have
    tried to reconnect ``times`` times (each attempt dropped: "server closed the connection
    unexpectedly", another reason than the refusals before), then leave the socket free."""
    fields = dict(field.split("=", 1) for field in cluster.dsn.split())
    path = os.path.join(fields["host"], f".s.PGSQL.{fields['port']}")
    factory = Factory.forProtocol(_Knocks)
    factory.knocks = 0  # type: ignore[attr-defined]
    port = yield UNIXServerEndpoint(reactor, path).listen(factory)
    try:
        yield within(until(lambda: factory.knocks >= times), 60)  # type: ignore[attr-defined]
    finally:
        yield port.stopListening()
        if os.path.exists(path):
            os.unlink(path)
