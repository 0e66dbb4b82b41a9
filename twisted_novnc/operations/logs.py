"""``[log]``: JSON lines or text, to twistd's log or to a file that SIGHUP reopens.

When ``[log]`` asks for anything but its defaults, this service writes the log itself, every
event of level info and above, from the first line on: twistd asks its application for a log
observer before it logs anything (its ``ILogObserver`` component), and the top of the tree
offers this service's as the tree is added to it (:meth:`LogService.offer_to`), so twistd's
own lines and everything logged while the tree was built are written as ``[log]`` says.
Where no application asks (twistd's ``--logger``, a tree started by hand), the service takes
the log over as it starts: it removes the other observers from the global publisher.

Every JSON line has an ``event`` key, a stable machine name: the daemon's own events name
themselves (``_log.info(..., event="relay_open")``; docs/operations.rst lists them); others
are named by :func:`event_name`.
"""

from __future__ import annotations

import json
import math
import signal
import string
import sys
import threading
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python.components import Componentized

from twisted_novnc._compat.twisted import is_twistd_text_observer, log_observers
from twisted_novnc.config import LogSettings

#: Event keys that describe the event itself, not the connection it is about.
_INTERNAL = {"log_logger", "log_source", "log_io", "log_legacy", "log_trace", "log_failure"}


#: Lines of Twisted's own that every start and stop of twistd writes, by their format.
FOREIGN_EVENTS = {
    "twistd {version} ({exe} {pyVersion}) starting up.": "twistd_starting",
    "reactor class: {reactor}.": "twistd_reactor",
    "Server Shut Down.": "twistd_stopped",
    "Main loop terminated.": "reactor_stopped",
}


def event_name(event: dict[str, Any]) -> str:
    """The event's stable machine name: its own ``event`` key (every line of the daemon's
    has one); else one of :data:`FOREIGN_EVENTS`; ``output`` for text written to stdout or
    stderr, ``python_warning`` for a Python warning, ``failure`` for a traceback; else
    ``<package>_log`` after the logging library's package (``twisted_log``, ``autobahn_log``,
    ``txpostgres_log``)."""
    name = event.get("event")
    if isinstance(name, str) and name:
        return name
    log_format = event.get("log_format")
    if isinstance(log_format, str) and log_format in FOREIGN_EVENTS:
        return FOREIGN_EVENTS[log_format]
    if "log_io" in event:
        return "output"
    if "warning" in event and "category" in event:
        return "python_warning"
    if "log_failure" in event:
        return "failure"
    namespace = str(event.get("log_namespace") or "")
    return (namespace.split(".", 1)[0] or "unknown") + "_log"


def event_as_json(event: dict[str, Any]) -> str:
    """One event as one JSON object: time, level, event name, namespace, message and its
    plain fields."""
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "event": event_name(event),
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

#: A log format's parts, ``(literal, field name, format spec)``, when every field is a plain
#: name (``{session_id}``, ``{wait_seconds:.3f}``); None when it needs Twisted's formatter.
_Template = list[tuple[str, str | None, str]]
_templates: dict[str, _Template | None] = {}
_parse_format = string.Formatter().parse


def _template(log_format: str) -> _Template | None:
    try:
        return _templates[log_format]
    except KeyError:
        pass
    parts: _Template | None = []
    try:
        for literal, field, spec, conversion in _parse_format(log_format):
            if field is not None and (
                conversion or not field.isidentifier() or "{" in (spec or "")
            ):
                parts = None  # attribute, index, call or nested spec: Twisted's way
                break
            parts.append((literal, field, spec or ""))  # type: ignore[union-attr]
    except ValueError:
        parts = None  # malformed: Twisted's way says so in the line
    if len(_templates) < 4096:  # formats are the program's constants; never unbounded
        _templates[log_format] = parts
    return parts


def _fast_text(event: dict[str, Any]) -> str | None:
    """The classic line, for the common event (a str format of plain names, no failure, no
    ``log_system``), without ``string.Formatter`` per line; None for any other event."""
    log_format = event.get("log_format")
    if type(log_format) is not str or "log_failure" in event or "log_flattened" in event:
        return None
    if event.get("log_system") is not None:
        return None
    parts = _template(log_format)
    if parts is None:
        return None
    pieces = []
    for literal, field, spec in parts:
        pieces.append(literal)
        if field is not None:
            if field not in event:
                return None  # Twisted's "Unable to format event" line
            pieces.append(format(event[field], spec))
    text = "".join(pieces)
    if not text:
        return ""
    level = event.get("log_level")
    return (
        f"{_time_prefix(event.get('log_time'))} [{event.get('log_namespace', '-')}#"
        f"{'-' if level is None else level.name}] {text}".replace("\n", "\n\t")
        + "\n"
    )


def event_as_text(event: dict[str, Any]) -> str:
    """One event as twistd writes it (time, [namespace#level], message, any traceback).

    Byte for byte Twisted's ``formatEventAsClassicLogText``, at a fraction of its cost for
    the common event: a connection logs four lines, and Twisted's formatter (a time zone
    and a ``string.Formatter`` pass per line) was a fifth of its CPU.
    """
    try:
        fast = _fast_text(event)
    except Exception:
        fast = None  # whatever went wrong, Twisted's formatter says it its own way
    if fast is not None:
        return fast
    return formatEventAsClassicLogText(event, formatTime=_time_prefix) or ""


def speed_up_twistd_text_observer() -> int:
    """Have twistd's own text observer format with :func:`event_as_text`; how many it found.

    With ``[log]`` at its defaults the log is twistd's (stdout under ``-n``, ``twistd.log``,
    ``--logfile``): its observer, a ``FileLogObserver`` made by ``textFileLogObserver`` with
    the default time format, is kept, and only its public ``formatEvent`` is swapped for the
    byte-identical faster one.  Any other observer (``--logger``, syslog) is left as it is.
    """
    found = 0
    for observer in log_observers(globalLogPublisher):
        if is_twistd_text_observer(observer):
            observer.formatEvent = event_as_text
            found += 1
    return found


class LogService(Service):
    """Writes the log as ``[log]`` says, and reopens its file on SIGHUP (for logrotate)."""

    def __init__(self, settings: LogSettings, reactor: IReactorFromThreads) -> None:
        self.settings = settings
        self.reactor = reactor
        self._file: IO[str] | None = None
        self._observer: Any = None
        self._taken = False
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

    def observer(self) -> ILogObserver:
        """The observer that writes the log as ``[log]`` says (made, its file opened, once)."""
        if self._observer is None:
            self._open()
            predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
            self._observer = FilteringLogObserver(self._write, [predicate])  # type: ignore[arg-type]
        return self._observer

    def offer_to(self, application: object) -> bool:
        """Give twistd's application this log's observer, which twistd then logs to from its
        first line on; whether it was given (only when ``[log]`` takes the log over, to an
        application that has none yet)."""
        if not self.takes_over or not isinstance(application, Componentized):
            return False
        if application.getComponent(ILogObserver, None) is not None:
            return False
        application.setComponent(ILogObserver, self.observer())
        return True

    def _take_over(self) -> None:
        if not self.takes_over:
            speed_up_twistd_text_observer()
            return
        if self._taken:
            return
        self._taken = True
        ours = self.observer()
        # The only handle there is on other observers (twistd's, when it was not given ours);
        # without this every line would be written twice, once in twistd's format.
        observers = log_observers(globalLogPublisher)
        for observer in observers:
            if observer is not ours:
                globalLogPublisher.removeObserver(observer)
        if ours not in observers:
            globalLogPublisher.addObserver(ours)
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
