"""Operations pieces without a network: health answers, JSON log events, log file reopening,
command-line overrides."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.logger import LogLevel
from twisted.python import usage

from twisted_novnc.config import LogSettings
from twisted_novnc.operations.admin import Readyz
from twisted_novnc.operations.logs import LogService, event_as_json
from twisted_novnc.operations.metrics import LiveState, Metrics, outcome_label
from twisted_novnc.tap import Options


def test_readyz_needs_database_and_listen():
    """/readyz is 200 only while the database is reachable and LISTEN is active."""
    state = {"db": True, "listen": True}
    metrics = Metrics(live=LiveState(
        database_reachable=lambda: state["db"], listen_connected=lambda: state["listen"]
    ))
    assert Readyz(metrics).status() == (
        200, {"ready": True, "database_reachable": True, "listen_connected": True}
    )
    state["listen"] = False
    code, body = Readyz(metrics).status()
    assert code == 503 and body["reason"] == "not listening for session changes"
    state["db"] = False
    assert Readyz(metrics).status()[1]["reason"].startswith("database unreachable")


def test_json_event_keeps_plain_fields_only():
    """A JSON log line has time, level, event name, message and the event's plain fields,
    nothing else."""
    event = {
        "log_format": "closed {session_id}: {outcome}",
        "event": "connection_closed",
        "log_level": LogLevel.info,
        "log_namespace": "twisted_novnc.front.protocol",
        "log_time": 1.5,
        "log_logger": object(),
        "session_id": "s1",
        "outcome": "1000",
        "up_bytes": 3,
        "protocol": object(),
    }
    record = json.loads(event_as_json(event))
    assert record == {
        "time": 1.5, "level": "info", "event": "connection_closed",
        "namespace": "twisted_novnc.front.protocol", "message": "closed s1: 1000",
        "session_id": "s1", "outcome": "1000", "up_bytes": 3,
    }


def test_log_file_reopens(tmp_path):
    """reopen() starts writing to a fresh file at the same path (after logrotate's move)."""
    path = tmp_path / "n.log"
    service = LogService(LogSettings(file=str(path)), reactor=None)
    service._open()
    service._write({"log_format": "one", "log_level": LogLevel.info, "log_time": 0})
    path.rename(tmp_path / "n.log.1")
    service.reopen()
    service._write({"log_format": "two", "log_level": LogLevel.info, "log_time": 0})
    service._file.close()
    assert "one" in (tmp_path / "n.log.1").read_text() and "two" not in (
        tmp_path / "n.log.1"
    ).read_text()
    assert "two" in path.read_text()


def test_options_override_ini_keys():
    """Named options and --set become overrides of ini keys."""
    options = Options()
    options.parseOptions([
        "--config", "x.ini", "--listen", "tcp:7000", "--dsn", "host=db",
        "--set", "novnc.readiness_timeout=5", "--set", "log.format=json",
    ])
    assert options.overrides == {
        ("novnc", "listen"): "tcp:7000",
        ("database", "dsn"): "host=db",
        ("novnc", "readiness_timeout"): "5",
        ("log", "format"): "json",
    }


def test_set_needs_section_and_key():
    """--set without SECTION.KEY=VALUE is a usage error."""
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--set", "listen=tcp:1"])


def test_nvx_in_use_and_logged():
    """Autobahn's native masking is in use here, and start-up says so in the log."""
    from twisted.logger import globalLogPublisher

    from twisted_novnc.processes.startup import log_nvx

    seen: list[str] = []

    def observe(event):
        seen.append(event.get("log_format", ""))

    globalLogPublisher.addObserver(observe)
    try:
        assert log_nvx() is True
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any("NVX native masking: in use" in text for text in seen)


@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=30))
@example([1.9999995231628418, 0.9999995, 1.0000004999, 1700000000.9999996, 1700000000.5])
def test_text_lines_are_exactly_twisteds(times):
    """[log] text lines (time stamp formatted once a second) are byte for byte what Twisted's
    own classic format gives, in any order of times."""
    from twisted.logger import LogLevel, formatEventAsClassicLogText

    from twisted_novnc.operations.logs import event_as_text

    for when in times:
        event = {
            "log_time": when, "log_level": LogLevel.info,
            "log_namespace": "twisted_novnc.front.protocol",
            "log_format": "closed {session_id}: {outcome}", "session_id": "s1", "outcome": "1000",
        }
        assert event_as_text(event) == formatEventAsClassicLogText(event)


_names = st.sampled_from(["session_id", "client", "n", "wait_seconds", "missing", "log_level"])
_fields = st.one_of(
    st.builds(lambda n: "{" + n + "}", _names),
    st.builds(lambda n, spec: "{" + n + ":" + spec + "}", _names,
              st.sampled_from([".3f", ">8", "g", "d", "x", "!", "{w}"])),
    st.sampled_from(["{0}", "{}", "{n!r}", "{client.upper()}", "{a[0]}", "{", "}", "{{", "}}"]),
)
_formats = st.lists(st.one_of(st.text(max_size=8), _fields), max_size=6).map("".join)
_values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10),
                    st.sampled_from(["line\nbreak", "\u00e9t\u00e9", ""]))


@given(
    log_format=st.one_of(_formats, st.just(None), st.just(b"bytes {n}")),
    values=st.dictionaries(st.sampled_from(["session_id", "client", "n", "wait_seconds", "w"]),
                           _values),
    when=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9, allow_nan=False)),
    level=st.sampled_from([None, LogLevel.info, LogLevel.warn]),
    namespace=st.sampled_from([None, "twisted_novnc.front.protocol", "-"]),
    system=st.sampled_from([None, None, "ws,42,127.0.0.1"]),
)
@example(log_format="closed {session_id}: {wait_seconds:.3f}s\nmore", values={
    "session_id": "s", "wait_seconds": 0.25}, when=1700000000.5, level=LogLevel.info,
    namespace="twisted_novnc.front.protocol", system=None)
def test_text_lines_of_any_event_are_exactly_twisteds(log_format, values, when, level,
                                                      namespace, system):
    """event_as_text's fast path (plain fields, no failure) and its fallback give, for any
    format, field values and event keys, exactly Twisted's classic line, or nothing."""
    from twisted.logger import formatEventAsClassicLogText

    from twisted_novnc.operations.logs import event_as_text

    event = dict(values)
    for key, value in (("log_format", log_format), ("log_time", when), ("log_level", level),
                       ("log_namespace", namespace), ("log_system", system)):
        if value is not None:
            event[key] = value
    assert event_as_text(event) == (formatEventAsClassicLogText(event) or "")


def test_text_line_with_a_failure_keeps_its_traceback():
    """An event carrying a failure takes Twisted's path: the traceback follows the line."""
    from twisted.logger import formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from twisted_novnc.operations.logs import event_as_text

    try:
        raise ValueError("why it broke")
    except ValueError:
        failure = Failure()
    event = {"log_format": "while {what}", "what": "relaying", "log_failure": failure,
             "log_time": 1700000000.0, "log_level": LogLevel.critical, "log_namespace": "x"}
    assert event_as_text(event) == formatEventAsClassicLogText(event)
    assert "ValueError: why it broke" in event_as_text(event)


def test_twistd_text_observer_formats_faster_and_the_same():
    """With [log] at its defaults, twistd's own text observer keeps its file and gets the
    byte-identical formatter; observers of other kinds and time formats are left alone."""
    import io

    from twisted.logger import globalLogPublisher, textFileLogObserver

    from twisted_novnc.operations.logs import event_as_text, speed_up_twistd_text_observer

    twistds, other_format = io.StringIO(), io.StringIO()
    observer = textFileLogObserver(twistds)
    custom = textFileLogObserver(other_format, timeFormat="%H:%M")
    original = observer.formatEvent
    globalLogPublisher.addObserver(observer)
    globalLogPublisher.addObserver(custom)
    try:
        assert speed_up_twistd_text_observer() == 1
        assert observer.formatEvent is event_as_text
        assert custom.formatEvent is not event_as_text
        event = {"log_format": "request {session_id}", "session_id": "s1",
                 "log_time": 1700000000.25, "log_level": LogLevel.info,
                 "log_namespace": "twisted_novnc.front.protocol"}
        observer(event)
        assert twistds.getvalue() == original(event)
    finally:
        globalLogPublisher.removeObserver(observer)
        globalLogPublisher.removeObserver(custom)


def test_metrics_page_negotiates_like_prometheus_client():
    """/metrics gives the text format, OpenMetrics when the scraper asks for it, gzip when
    accepted and only the ``name[]`` families asked for, rendered at once (no thread pool)."""
    import gzip

    from twisted.web.test.requesthelper import DummyRequest

    from twisted_novnc.operations.admin import MetricsPage

    metrics = Metrics()
    metrics.connections.labels("1000").inc(2)

    def get(headers: dict[bytes, bytes], args: dict[bytes, list[bytes]] | None = None):
        request = DummyRequest([b""])
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name, [value])
        request.args = args or {}
        body = MetricsPage(metrics.registry).render_GET(request)
        return request.responseHeaders, body

    headers, body = get({})
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert b'twisted_novnc_connections_total{outcome="1000"} 2.0' in body
    headers, body = get({b"accept": b"application/openmetrics-text; version=1.0.0"})
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    headers, body = get({b"accept-encoding": b"gzip"})
    assert headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    assert b"twisted_novnc_connections_total" in gzip.decompress(body)
    headers, body = get({}, {b"name[]": [b"twisted_novnc_connections_total"]})
    assert b"twisted_novnc_connections_total" in body and b"process_open_fds" not in body


@pytest.mark.parametrize(
    ("outcome", "label"),
    [("1000", "1000"), ("1006", "1006"), ("4404", "4404"), ("4502", "4502"),
     ("http_404", "http_404"), ("3999", "other"), ("4999", "other"), ("1004", "other"),
     ("2000", "other"), ("write_timeout", "write_timeout")],
)
def test_outcome_label_buckets_codes_nobody_documented(outcome, label):
    """RFC 6455's codes, the refusal table's and HTTP statuses are labels of their own; any
    other code a browser closes with is ``other``, so no client can mint time series."""
    assert outcome_label(outcome) == label


# -- the admin listener's request deadline -----------------------------------------------------


def _admin_connection(**timeout: float):
    """The admin Site on a Clock, one connection over a StringTransport."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twisted_novnc.operations.admin import admin_site

    clock = Clock()
    site = admin_site(Metrics(), clock, **timeout)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, channel, transport


@pytest.mark.parametrize("given", [None, 2.5])
def test_admin_drops_a_client_that_sends_nothing(given):
    """A connection that sends no request is aborted after request_timeout (by default
    [novnc] request_timeout's default)."""
    from twisted_novnc.config import NovncSettings
    from twisted_novnc.operations.admin import REQUEST_TIMEOUT

    assert NovncSettings().request_timeout == REQUEST_TIMEOUT
    clock, channel, transport = _admin_connection(
        **({} if given is None else {"request_timeout": given})
    )
    clock.advance((given or REQUEST_TIMEOUT) - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnected and transport.value() == b""


def test_admin_drops_a_client_that_trickles_its_request():
    """A byte now and then (which restarts Twisted's idle timeout) does not extend the
    deadline: the whole request must arrive in REQUEST_TIMEOUT."""
    from twisted_novnc.operations.admin import REQUEST_TIMEOUT

    clock, channel, transport = _admin_connection()
    for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
        channel.dataReceived(bytes([byte]))
        clock.advance(REQUEST_TIMEOUT / 40)
        if transport.disconnecting:
            break
    assert transport.disconnected and transport.value() == b""
    assert clock.seconds() == pytest.approx(REQUEST_TIMEOUT)


def test_admin_answers_and_times_each_request_from_its_first_byte():
    """A whole request is answered; on a kept-alive connection the next request has its own
    deadline from its first byte, and no deadline runs while the connection is idle."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from twisted_novnc.operations.admin import IDLE_TIMEOUT, REQUEST_TIMEOUT

    clock, channel, transport = _admin_connection()
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK") and not transport.disconnecting
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    transport.clear()
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\n")
    clock.advance(REQUEST_TIMEOUT)
    assert transport.disconnected and transport.value() == b""
    channel.connectionLost(Failure(ConnectionDone()))
    assert not clock.getDelayedCalls()
