"""A worker process of ``[novnc] workers``: its settings from the supervisor, its proxy on the
shared sockets, its log and answers back up the pipe (:mod:`twisted_novnc.processes.ipc`).

``python -m twisted_novnc worker --index N`` runs :func:`run_worker`; only the supervisor
starts it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from prometheus_client import generate_latest
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_novnc._compat.twisted import read_pipe
from twisted_novnc.config import parse_config
from twisted_novnc.operations.admin import readiness
from twisted_novnc.processes.ipc import (
    ANSWER,
    ASK,
    CONTROL_FD,
    INIT,
    LOG,
    MESSAGES_FD,
    STOP,
    STOP_NOW,
    FrameError,
    Frames,
    WorkerInit,
    encode_event,
    frame,
    read_frame,
)
from twisted_novnc.processes.service import WorkerHandles, make_worker_service
from twisted_novnc.reactors import IRunningReactor, installed_reactor

_log = Logger()


@implementer(ILogObserver)
class ParentChannel:
    """The worker's pipe to the supervisor: log events and answers, written synchronously.

    Writes block, as a daemon's writes to its log file do, so nothing logged during shutdown
    is lost and frames never interleave (threads log too, hence the lock).  Once the pipe is
    broken (the supervisor is gone) log lines go to stderr instead.
    """

    def __init__(self, fd: int = MESSAGES_FD) -> None:
        self.fd = fd
        self.broken = False
        self._lock = threading.Lock()
        # Room for bursts, so that a busy supervisor rarely makes a worker wait.
        with contextlib.suppress(AttributeError, OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1024 * 1024)

    def send(self, kind: bytes, payload: bytes) -> bool:
        data = frame(kind, payload)
        with self._lock:
            if self.broken:
                return False
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError:
                self.broken = True
                return False
        return True

    def observe(self, event: dict[str, Any]) -> None:
        """A log observer: the event up the pipe, or to stderr once the pipe is broken."""
        if self.send(LOG, encode_event(event)):
            return
        stderr = sys.__stderr__
        if stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                stderr.write(formatEventAsClassicLogText(event) or "")

    __call__ = observe


class ControlInput:
    """Reads the supervisor's frames from the worker's stdin and acts on them."""

    def __init__(
        self, reactor: IRunningReactor, channel: ParentChannel, handles: WorkerHandles
    ) -> None:
        self.reactor = reactor
        self.channel = channel
        self.handles = handles
        self.frames = Frames()
        self.stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)

    def _shutting_down(self) -> None:
        self.stopping = True

    def stop(self) -> None:
        """Drain and stop (once, however many times the supervisor or a signal asks)."""
        if not self.stopping:
            self.stopping = True
            self.reactor.stop()

    def signalled(self, signum: int, frame: FrameType | None) -> None:
        _log.info("received {signal}: stopping", signal=signal.Signals(signum).name)
        self.reactor.callFromThread(self.stop)

    def childDataReceived(self, name: str, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except FrameError as e:
            _log.error("garbage from the supervisor ({error}): stopping", error=e)
            self.stop()
            return
        for kind, payload in frames:
            if kind == STOP:
                _log.info("asked to stop by the supervisor")
                self.stop()
            elif kind == STOP_NOW:
                self.stop()
                self.handles.drain.close_all()
            elif kind == ASK:
                self.answer(payload)

    def answer(self, payload: bytes) -> None:
        try:
            question = json.loads(payload)
            question.get("what")
        except (ValueError, AttributeError):
            _log.warn("an unreadable question from the supervisor: ignored")
            return
        body: Any = None
        if question.get("what") == "metrics":
            body = generate_latest(self.handles.metrics.registry).decode("utf-8")
        elif question.get("what") == "status":
            body = readiness(self.handles.metrics.live)
        answer = json.dumps({"id": question.get("id"), "body": body}).encode()
        self.channel.send(ANSWER, answer)

    def childConnectionLost(self, name: str, reason: Failure) -> None:
        if not self.stopping:
            _log.warn("the supervisor is gone (its pipe closed): stopping")
            self.stop()


def run_worker(index: int) -> int:
    """The worker process: read the settings, adopt the sockets, serve until told to stop."""
    # A terminal's hangup is the supervisor's business; it stops us through the pipe.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = ParentChannel()
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(channel, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)])],
        redirectStandardIO=False,
    )
    try:
        kind, payload = read_frame(CONTROL_FD)
        if kind != INIT:
            raise FrameError(f"expected the settings first, got {kind!r}")
        init = WorkerInit.decode(payload)
        settings = parse_config(init.settings, init.source)

        reactor = installed_reactor()
        service, handles = make_worker_service(settings, reactor, init.secret, init.sockets)
        control = ControlInput(reactor, channel, handles)
        read_pipe(reactor, control, "control", CONTROL_FD)
        service.privilegedStartService()
        service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        # Our own handlers, not the reactor's: a SIGTERM (say, from systemd to the whole
        # unit) and the supervisor's STOP are one stop, not a stop and a failed second one.
        # (During the drain, DrainService reads another SIGTERM as "close everything now".)
        signal.signal(signal.SIGTERM, control.signalled)
        signal.signal(signal.SIGINT, control.signalled)
    except EOFError:
        return 1
    except BaseException:
        _log.failure("worker {worker} could not start", worker=index)
        return 1
    # Every Twisted reactor's run() takes it; IReactorCore does not declare it.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    return 0
