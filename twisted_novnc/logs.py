"""``[log]``: JSON lines or text, to twistd's log or to a file that SIGHUP reopens.

twistd sets up its own log observer before the plugin runs.  When ``[log]`` asks for anything
but its defaults, this service takes the log over: it removes twistd's observers from the
global publisher and writes every event of level info and above itself.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from typing import IO, Any

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)

from .config import LogSettings

#: Event keys that describe the event itself, not the connection it is about.
_INTERNAL = {"log_logger", "log_source", "log_io", "log_legacy", "log_trace", "log_failure"}


def event_as_json(event: dict[str, Any]) -> str:
    """One event as one JSON object: time, level, namespace, message and its plain fields."""
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL or key in record:
            continue
        if isinstance(value, str | int | float | bool) or value is None:
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str)


class _TimePrefix:
    """The classic line's time stamp, formatted once per second instead of once per line.

    Twisted's ``formatTime`` works out the time zone for every event (about a third of the
    cost of a log line); the stamp has whole seconds only, so it is the same for every line
    of the same second.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = math.floor(when)
        if round((when - second) * 1e6) >= 1_000_000:
            second += 1  # datetime rounds to the microsecond first, as Twisted's stamp does
        if second != self._second:
            self._text = formatTime(second)
            self._second = second
        return self._text


_time_prefix = _TimePrefix()


def event_as_text(event: dict[str, Any]) -> str:
    """One event as twistd writes it (time, [namespace#level], message, any traceback)."""
    return formatEventAsClassicLogText(event, formatTime=_time_prefix) or ""


class LogService(Service):
    """Writes the log as ``[log]`` says, and reopens its file on SIGHUP (for logrotate)."""

    def __init__(self, settings: LogSettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self._file: IO[str] | None = None
        self._observer: Any = None
        self._previous_hup: Any = None
        self._format = event_as_json if settings.format == "json" else event_as_text

    @property
    def takes_over(self) -> bool:
        return self.settings.format != "text" or bool(self.settings.file)

    def privilegedStartService(self) -> None:
        # Before any other service logs (listeners start in privilegedStartService).
        Service.privilegedStartService(self)
        self._take_over()

    def startService(self) -> None:
        Service.startService(self)
        self._take_over()

    def _take_over(self) -> None:
        if not self.takes_over or self._observer is not None:
            return
        self._open()
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        self._observer = FilteringLogObserver(self._write, [predicate])  # type: ignore[arg-type]
        # Private, but the only handle there is on twistd's observers; without this every
        # line would be written twice, once in twistd's format.
        for observer in list(getattr(globalLogPublisher, "_observers", [])):
            globalLogPublisher.removeObserver(observer)
        globalLogPublisher.addObserver(self._observer)
        if self.settings.file and threading.current_thread() is threading.main_thread():
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None

    def _open(self) -> None:
        if self.settings.file:
            self._file = open(self.settings.file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        else:
            # twistd redirects sys.stdout into the log itself; write to the real one.
            self._file = sys.__stdout__

    def reopen(self) -> None:
        """Close and open the file again: logrotate has moved the old one away."""
        old = self._file
        self._open()
        if old is not None and old is not sys.__stdout__:
            old.close()

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reopen)

    def _write(self, event: dict[str, Any]) -> None:
        if self._file is None:
            return
        text = self._format(event)
        if text:
            self._file.write(text.rstrip("\n") + "\n")
            self._file.flush()
