"""Log events: every line has a stable event name; twistd logs to [log]'s observer from its
first line; admin access lines only when asked for; a database outage is said once."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from twisted.application.service import Application
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from twisted_novnc.config import LogSettings
from twisted_novnc.database.readiness import LOOKUP_LOG_INTERVAL, ReadinessGate
from twisted_novnc.database.store import _Health
from twisted_novnc.operations.admin import admin_site
from twisted_novnc.operations.logs import LogService, event_as_json, event_name
from twisted_novnc.operations.metrics import Metrics
from twisted_novnc.processes.service import DaemonTree
from twisted_novnc.testing import MemorySessionSource

PACKAGE = Path(__file__).resolve().parent.parent / "twisted_novnc"
EVENT_LIST = PACKAGE.parent / "docs" / "operations.rst"
LEVELS = {"debug", "info", "warn", "error", "critical", "failure"}
NAME = re.compile(r"[a-z][a-z0-9_]*")


@pytest.fixture
def logged():
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def _log_calls():
    """Every ``_log.<level>(...)`` call in the package: (where, its event keyword's value)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS):
                continue
            target = node.func.value
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name != "_log":
                continue
            event = next((k.value for k in node.keywords if k.arg == "event"), None)
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            yield where, event


def test_every_log_call_names_its_event():
    """Each of the daemon's log lines carries an ``event`` name in snake case (a constant,
    or the one argument that log_refusal passes on)."""
    calls = list(_log_calls())
    assert len(calls) > 50
    for where, event in calls:
        assert event is not None, f"{where}: no event= keyword"
        if isinstance(event, ast.Constant):
            assert NAME.fullmatch(event.value), where


def test_the_docs_list_every_event_name():
    """docs/operations.rst's list of event names holds every constant name the code logs."""
    names = {
        event.value for _, event in _log_calls() if isinstance(event, ast.Constant)
    } | {"refused", "revoked"}
    text = EVENT_LIST.read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"``{name}``" not in text)
    assert missing == []


@pytest.mark.parametrize(("event", "name"), [
    ({"event": "relay_open", "log_namespace": "twisted_novnc.front.protocol"}, "relay_open"),
    ({"log_format": "twistd {version} ({exe} {pyVersion}) starting up."}, "twistd_starting"),
    ({"log_format": "reactor class: {reactor}."}, "twistd_reactor"),
    ({"log_format": "Server Shut Down."}, "twistd_stopped"),
    ({"log_format": "{log_io}", "log_io": "printed"}, "output"),
    ({"log_format": "{warning}", "warning": "w", "category": "DeprecationWarning"},
     "python_warning"),
    ({"log_format": "boom", "log_namespace": "twisted.internet.defer",
      "log_failure": Failure(ValueError())}, "failure"),
    ({"log_format": "(TCP Port 80 Closed)", "log_namespace": "twisted.internet.tcp.Port"},
     "twisted_log"),
    ({"log_format": "x", "log_namespace": "autobahn.websocket.protocol"}, "autobahn_log"),
    ({"log_format": "x"}, "unknown_log"),
])
def test_events_not_of_the_daemon_get_a_name_too(event, name):
    """twistd's own lines, printed text, warnings, tracebacks and libraries' lines are named
    by a fixed rule, and the JSON line carries the name."""
    assert event_name(event) == name
    assert json.loads(event_as_json({"log_level": LogLevel.info, **event}))["event"] == name


def test_twistd_is_given_the_json_observer_before_it_logs(tmp_path):
    """As the tree is added to twistd's application, [log] format = json offers its observer
    (twistd's AppLogger.start logs to an ILogObserver component from its first line); the
    observer writes JSON lines with an event name to [log] file."""
    path = tmp_path / "daemon.log"
    log = LogService(LogSettings(format="json", file=str(path)), reactor=None)
    application = Application("novnc")
    DaemonTree(log).setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is log.observer()
    observer({"log_format": "twistd {version} ({exe} {pyVersion}) starting up.",
              "version": "1", "exe": "python", "pyVersion": "3.11",
              "log_level": LogLevel.info, "log_namespace": "twisted.application.app.AppLogger",
              "log_time": 1.0})
    log._file.close()
    [line] = path.read_text().splitlines()
    assert json.loads(line)["event"] == "twistd_starting"


def test_with_the_default_log_twistd_keeps_its_own():
    """[log] at its defaults offers nothing: twistd's own observer writes its lines."""
    application = Application("novnc")
    DaemonTree(LogService(LogSettings(), reactor=None)).setServiceParent(application)
    assert application.getComponent(ILogObserver) is None


def test_taking_over_keeps_an_observer_twistd_was_given(tmp_path):
    """Starting the log service removes the other observers but never adds its own twice."""
    log = LogService(LogSettings(format="json", file=str(tmp_path / "l")), reactor=None)
    ours = log.observer()
    others = EventLoggingObserver()
    globalLogPublisher.addObserver(ours)
    globalLogPublisher.addObserver(others)
    kept = list(globalLogPublisher._observers)
    try:
        log._take_over()
        assert [o for o in globalLogPublisher._observers if o is ours] == [ours]
        assert others not in globalLogPublisher._observers
    finally:
        for observer in list(globalLogPublisher._observers):
            globalLogPublisher.removeObserver(observer)
        for observer in kept:
            if observer is not ours and observer is not others:
                globalLogPublisher.addObserver(observer)
        log._file.close()


def _admin_get(access_log: bool) -> bytes:
    site = admin_site(Metrics(), Clock(), access_log=access_log)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    return transport.value()


@pytest.mark.parametrize("access_log", [False, True])
def test_admin_access_lines_only_when_asked(access_log, logged):
    """[log] admin_access = off (the default): no line per admin request; on: one
    admin_request line with its method, path, status and client."""
    assert _admin_get(access_log).startswith(b"HTTP/1.1 200 ")
    lines = [e for e in logged if e.get("event") == "admin_request"]
    assert not [e for e in logged if "log_io" in e]  # twisted.web's own access line
    if access_log:
        [line] = lines
        assert (line["method"], line["path"], line["status"], line["client"]) == (
            "GET", "/healthz", 200, "127.0.0.1"
        )
    else:
        assert lines == []


def test_database_unreachable_is_said_once_per_outage(logged):
    """However often the connections fail, and with whatever reason, one line when the
    outage starts and one when it ends; the next outage is said again."""
    health = _Health()
    health.down("could not connect to server: Connection refused")
    health.down("could not connect to server: Connection refused")
    health.down("server closed the connection unexpectedly")
    health.up()
    health.up()
    health.down("timeout expired")
    events = [e["event"] for e in logged if e.get("event", "").startswith("database_")]
    assert events == ["database_unreachable", "database_reachable", "database_unreachable"]
    assert health.down_reason == "timeout expired"


class _FailingSource(MemorySessionSource):
    """Lookups fail while ``down``."""

    down = True

    def fetch(self, ids):
        if self.down:
            from twisted.internet.defer import fail

            return fail(ConnectionError("database gone"))
        return super().fetch(ids)


def test_failing_lookups_are_logged_once_a_minute_at_most(logged):
    """The gate retries a failing lookup with backoff: one line for the failures, not one per
    retry (nor per pool connection still reconnecting after a lookup answered); a minute on,
    a failure is said again."""
    clock = Clock()
    source = _FailingSource()
    gate = ReadinessGate(source, clock, 300, frozenset({"ended"}), 5900)
    waiting = gate.when_ready("s1")
    clock.advance(0)
    for _ in range(10):
        clock.advance(2)

    def failed() -> int:
        return sum(1 for e in logged if e.get("event") == "session_lookup_failed")

    assert failed() == 1
    source.down = False
    clock.advance(2)
    source.down = True
    gate.recheck("s1")
    clock.advance(0)
    assert failed() == 1
    clock.advance(LOOKUP_LOG_INTERVAL)
    gate.recheck("s1")
    clock.advance(2)
    assert failed() == 2
    waiting.cancel()
    waiting.addErrback(lambda _: None)
