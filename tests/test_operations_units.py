"""Operations pieces without a network: health answers, JSON log events, log file reopening,
command-line overrides."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.logger import LogLevel
from twisted.python import usage

from twisted_novnc.admin import Readyz
from twisted_novnc.config import LogSettings
from twisted_novnc.logs import LogService, event_as_json
from twisted_novnc.metrics import LiveState, Metrics
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
    """A JSON log line has time, level, message and the event's plain fields, nothing else."""
    event = {
        "log_format": "closed {session_id}: {outcome}",
        "log_level": LogLevel.info,
        "log_namespace": "twisted_novnc.front",
        "log_time": 1.5,
        "log_logger": object(),
        "session_id": "s1",
        "outcome": "1000",
        "up_bytes": 3,
        "protocol": object(),
    }
    record = json.loads(event_as_json(event))
    assert record == {
        "time": 1.5, "level": "info", "namespace": "twisted_novnc.front",
        "message": "closed s1: 1000", "session_id": "s1", "outcome": "1000", "up_bytes": 3,
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

    from twisted_novnc.service import log_nvx

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

    from twisted_novnc.logs import event_as_text

    for when in times:
        event = {
            "log_time": when, "log_level": LogLevel.info, "log_namespace": "twisted_novnc.front",
            "log_format": "closed {session_id}: {outcome}", "session_id": "s1", "outcome": "1000",
        }
        assert event_as_text(event) == formatEventAsClassicLogText(event)
