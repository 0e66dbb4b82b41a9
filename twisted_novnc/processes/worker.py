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
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

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

from twisted_novnc import __version__
from twisted_novnc._compat.twisted import read_pipe
from twisted_novnc.config import parse_config
from twisted_novnc.operations.admin import readiness
from twisted_novnc.operations.logs import event_as_json
from twisted_novnc.processes.ipc import (
    ANSWER,
    ASK,
    CONTROL_FD,
    HANDED,
    INIT,
    LOG,
    MESSAGES_FD,
    READY,
    STOP,
    STOP_NOW,
    UPGRADE,
    FrameError,
    Frames,
    WorkerInit,
    encode_event,
    frame,
    read_frame,
)
from twisted_novnc.processes.service import WorkerHandles, make_worker_service
from twisted_novnc.processes.upgrade import MOVE_RATE, RelayAdopter, Retirement
from twisted_novnc.reactors import IDaemonReactor, IRunningReactor, installed_reactor
from twisted_novnc.relay.handoff import ADOPTED, DECLINED, RELAY, HandoffChannel, open_channel

_log = Logger()


@implementer(ILogObserver)
class ParentChannel:
    """The worker's pipe to the supervisor: log events and answers, written synchronously.

    Writes block, as a daemon's writes to its log file do, so nothing logged during shutdown
    is lost and frames never interleave (threads log too, hence the lock).  Once the pipe is
    broken (the supervisor is gone) log lines go to stderr instead, in the format ``[log]
    format`` says once the settings are in (:attr:`formatter`).
    """

    def __init__(self, fd: int = MESSAGES_FD) -> None:
        self.fd = fd
        self.broken = False
        self.formatter: Callable[[dict[str, Any]], str | None] = formatEventAsClassicLogText
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
                text = self.formatter(event)
                stderr.write(text.rstrip("\n") + "\n" if text else "")

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
        #: The relay hand-off channel to the supervisor (an upgrade's relays, both ways).
        self.handoff: HandoffChannel | None = None
        self.retirement: Retirement | None = None
        reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)

    def open_handoff(self, fd: int) -> None:
        """Take relays handed here by an old generation, and hand ours on in an upgrade."""
        reactor = cast(IDaemonReactor, self.reactor)
        assert self.handles.factory is not None
        adopter = RelayAdopter(
            self.handles.factory, reactor, reply=self._reply,
            accepting=lambda: not self.stopping and self.retirement is None,
        )

        def received(kind: bytes, payload: bytes, fds: list[int]) -> None:
            if kind == RELAY:
                adopter.received(payload, fds)
            elif kind in (ADOPTED, DECLINED) and self.retirement is not None:
                self.retirement.answered(kind, payload)

        def lost() -> None:
            if self.retirement is not None:
                self.retirement.channel_lost()

        self.handoff = open_channel(reactor, fd, HandoffChannel(received, lost))

    def _reply(self, kind: bytes, payload: bytes) -> None:
        if self.handoff is not None:
            self.handoff.send(kind, payload)

    def _send_relay(self, payload: bytes, fds: list[int]) -> bool:
        return self.handoff is not None and self.handoff.send(RELAY, payload, fds)

    def upgrade(self, payload: bytes) -> None:
        """A new generation serves: stop accepting, hand the relays on, drain the rest, stop."""
        if self.retirement is not None or self.stopping or self.handles.factory is None:
            return
        try:
            asked = json.loads(payload)
            drain_timeout = float(asked["drain_timeout"])
            rate = float(asked.get("move_rate", MOVE_RATE))
        except (ValueError, KeyError, TypeError, AttributeError):
            drain_timeout, rate = self.handles.upgrade_drain_timeout, MOVE_RATE
        _log.info("a new generation serves: handing live relays on", event="worker_handing_on")
        self.retirement = retirement = Retirement(
            self.handles.factory, cast(IDaemonReactor, self.reactor),
            self.handles.stop_accepting, self._send_relay, drain_timeout,
            self.handles.drain.close_generation, rate,
        )
        retirement.start().addCallback(self._handed)
        retirement.drained.addCallback(self._retired)

    def _retired(self, _: object) -> None:
        """Nothing is left here: stop, at the lowest CPU priority, so that tearing the process
        down takes no CPU from the relays streaming in the new generation."""
        with contextlib.suppress(OSError):
            os.nice(19)
        self.stop()

    def _handed(self, counts: tuple[int, int]) -> None:
        moved, kept = counts
        self.channel.send(HANDED, json.dumps({"moved": moved, "kept": kept}).encode())

    def ready(self) -> None:
        """Tell the supervisor this worker accepts, and which version it runs."""
        self.channel.send(
            READY, json.dumps({"version": __version__, "pid": os.getpid()}).encode()
        )

    def _shutting_down(self) -> None:
        self.stopping = True

    def stop(self) -> None:
        """Drain and stop (once, however many times the supervisor or a signal asks)."""
        if not self.stopping:
            self.stopping = True
            self.reactor.stop()

    def signalled(self, signum: int, frame: FrameType | None) -> None:
        _log.info("received {signal}: stopping",
                  event="worker_signalled", signal=signal.Signals(signum).name)
        self.reactor.callFromThread(self.stop)

    def childDataReceived(self, name: str, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except FrameError as e:
            _log.error("garbage from the supervisor ({error}): stopping",
                       event="supervisor_garbage", error=e)
            self.stop()
            return
        for kind, payload in frames:
            if kind == STOP:
                _log.info("asked to stop by the supervisor", event="worker_stopping")
                self.stop()
            elif kind == STOP_NOW:
                self.stop()
                self.handles.drain.close_all()
            elif kind == ASK:
                self.answer(payload)
            elif kind == UPGRADE:
                self.upgrade(payload)

    def answer(self, payload: bytes) -> None:
        try:
            question = json.loads(payload)
            question.get("what")
        except (ValueError, AttributeError):
            _log.warn("an unreadable question from the supervisor: ignored",
                      event="supervisor_bad_question")
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
            _log.warn("the supervisor is gone (its pipe closed): stopping", event="supervisor_gone")
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
        if settings.log.format == "json":
            channel.formatter = event_as_json

        reactor = installed_reactor()
        service, handles = make_worker_service(settings, reactor, init.secret, init.sockets)
        control = ControlInput(reactor, channel, handles)
        read_pipe(reactor, control, "control", CONTROL_FD)
        if init.handoff_fd is not None:
            control.open_handoff(init.handoff_fd)
        service.privilegedStartService()
        service.startService()
        control.ready()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        # Our own handlers, not the reactor's: a SIGTERM (say, from systemd to the whole
        # unit) and the supervisor's STOP are one stop, not a stop and a failed second one.
        # (During the drain, DrainService reads another SIGTERM as "close everything now".)
        signal.signal(signal.SIGTERM, control.signalled)
        signal.signal(signal.SIGINT, control.signalled)
    except EOFError:
        return 1
    except BaseException:
        _log.failure("worker {worker} could not start", event="worker_start_failed", worker=index)
        return 1
    # Every Twisted reactor's run() takes it; IReactorCore does not declare it.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    return 0
