"""``[novnc] workers``: a supervisor process and the worker processes it keeps running.

The supervisor (the ``twistd`` process) creates the listening sockets, starts N workers with
those sockets inherited (:mod:`twisted_novnc.processes.sharedports`), and restarts any worker that ends,
with capped backoff.  Each worker is a whole proxy of its own (its own store, LISTEN connection
and readiness gate: the database is the only shared state), so any worker serves any session.

Between the supervisor and each worker there are two pipes, carrying frames of
``<length:4><kind:1><payload>``:

- supervisor -> worker, the worker's stdin: first its settings (``INIT``), later questions
  (``ASK``: its metrics or its readiness) and ``STOP`` (drain as on SIGTERM) or ``STOP_NOW``
  (close every relay now, as on a second SIGTERM).  Its end of file means the supervisor is
  gone, whatever killed it: the worker then stops too, so no worker outlives it.
- worker -> supervisor, descriptor 3: its log events (``LOG``), which the supervisor logs as its
  own with a ``worker`` field, so they go wherever ``[log]`` sends the supervisor's; and its
  answers (``ANSWER``).

Workers are stopped through the pipe rather than by signal: under systemd's default
``KillMode=control-group`` every process of the unit gets the SIGTERM, and a second one from
the supervisor would read as "close everything now".
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    eventFromJSON,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from twisted_novnc.backoff import jittered_backoff
from twisted_novnc.config import Settings, parse_config, settings_text
from twisted_novnc.processes.sharedports import SharedSocket

_log = Logger()

# -- frames ------------------------------------------------------------------------------------

INIT = b"I"
ASK = b"?"
STOP = b"S"
STOP_NOW = b"N"
LOG = b"L"
ANSWER = b"A"

_HEADER = struct.Struct("!Ic")
#: A frame larger than this is a broken pipe, not a message.
MAX_FRAME = 64 * 1024 * 1024

#: The worker's descriptors: 0 = from the supervisor, 3 = to it, shared sockets from 4 on.
CONTROL_FD = 0
MESSAGES_FD = 3
FIRST_SOCKET_FD = 4


class FrameError(Exception):
    """The byte stream is not a sequence of frames."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload), kind) + payload


class Frames:
    """Splits a byte stream into ``(kind, payload)`` frames as the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            length, kind = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise FrameError(f"a frame of {length} bytes")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[_HEADER.size:end])))
            del self._buffer[:end]
        return frames


def read_frame(fd: int) -> tuple[bytes, bytes]:
    """One frame read from a blocking descriptor, byte-exact (nothing after it is consumed)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError("the supervisor closed the pipe")
            data += chunk
        return data

    length, kind = _HEADER.unpack(exactly(_HEADER.size))
    if length > MAX_FRAME:
        raise FrameError(f"a frame of {length} bytes")
    return kind, exactly(length)


@attrs.frozen
class WorkerInit:
    """Everything a worker is told at start: which one it is, its settings, its sockets."""

    index: int
    settings: str
    source: str
    secret: bytes
    sockets: tuple[SharedSocket, ...]

    def encode(self) -> bytes:
        return json.dumps({
            "index": self.index,
            "settings": self.settings,
            "source": self.source,
            "secret": base64.b64encode(self.secret).decode(),
            "sockets": [[s.description, s.fd, s.family] for s in self.sockets],
        }).encode()

    @classmethod
    def decode(cls, payload: bytes) -> WorkerInit:
        data = json.loads(payload)
        return cls(
            data["index"], data["settings"], data["source"], base64.b64decode(data["secret"]),
            tuple(SharedSocket(d, fd, family) for d, fd, family in data["sockets"]),
        )


def worker_count(workers: int | None) -> int:
    """``[novnc] workers`` as a number: ``auto`` (None) is one per core this process may use."""
    if workers is not None:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_command(index: int) -> list[str]:
    """The worker's command line; ``-P`` so that a ``twisted_novnc`` directory in the working
    directory can never shadow the installed package the supervisor runs."""
    return [sys.executable, "-P", "-m", "twisted_novnc", "worker", "--index", str(index)]


def describe_end(reason: Failure) -> str:
    """How a process ended, for the log: its exit status or the signal that killed it."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = "?"
            return f"was killed by signal {value.signal} ({name})"
        return f"exited with status {value.exitCode}"
    return f"ended ({value})"


# -- the supervisor's side ---------------------------------------------------------------------

#: Seconds a worker gets to answer a question (a scrape must never hang on a stuck worker).
ANSWER_TIMEOUT = 2.0
#: A worker that ran this long before it ended is restarted at once, not after backoff.
STABLE_AFTER = 10.0
#: Seconds after the drain (``drain_timeout``) before a worker still running is killed.
KILL_GRACE = 10.0


def restart_backoff() -> Iterator[float]:
    """At once the first time, then 0.5 s growing to 30 s while a worker keeps dying young."""
    return jittered_backoff(initial=0.5, maximum=30.0)


#: The key a worker's failure travels under, as its traceback's text.
_TRACEBACK = "worker_traceback"


class RemoteFailure:
    """A worker's failure as the supervisor's log sees it: the traceback, already written.

    (A Failure sent as JSON would lose its exception's message on the way.)
    """

    def __init__(self, traceback: str) -> None:
        self.traceback = traceback

    def getTraceback(self, *args: Any, **kwargs: Any) -> str:
        return self.traceback

    def getErrorMessage(self) -> str:
        lines = self.traceback.strip().splitlines()
        return lines[-1] if lines else ""

    def printTraceback(self, file: Any = None, *args: Any, **kwargs: Any) -> None:
        (file or sys.stderr).write(self.traceback)


class WorkerProcess(ProcessProtocol):
    """The supervisor's end of one worker process: its pipes, its questions, its end."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.init = b""
        self.pid: int | None = None
        self.started_at = 0.0
        self.ended = False
        self._frames = Frames()
        self._pending: dict[int, Deferred[Any]] = {}
        self._next_id = 0

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)
        self.transport.writeToChild(CONTROL_FD, frame(INIT, self.init))  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != MESSAGES_FD:
            return
        try:
            frames = self._frames.feed(data)
        except FrameError as e:
            _log.error("worker {worker} sent garbage ({error}): killing it", worker=self.index,
                       error=e)
            self.signal("KILL")
            return
        for kind, payload in frames:
            if kind == LOG:
                self.supervisor.publish(self.index, payload)
            elif kind == ANSWER:
                self._answered(payload)

    def _send(self, kind: bytes, payload: bytes = b"") -> bool:
        try:
            self.transport.writeToChild(CONTROL_FD, frame(kind, payload))  # type: ignore[union-attr]
        except (KeyError, OSError, AttributeError):  # the pipe is gone: the process is going
            return False
        return True

    def signal(self, name: str) -> None:
        with contextlib.suppress(Exception):  # it has just ended
            self.transport.signalProcess(name)  # type: ignore[union-attr]

    def stop(self, now: bool = False) -> None:
        """Ask the worker to drain (``now``: to close every relay at once)."""
        if not self._send(STOP_NOW if now else STOP):
            self.signal("TERM")

    def ask(self, what: str, clock: Any, timeout: float = ANSWER_TIMEOUT) -> Deferred[Any]:
        """The worker's answer to ``what`` ("metrics" or "status"); None if it gives none in
        ``timeout`` seconds or ends first."""
        if self.ended:
            return succeed(None)
        self._next_id += 1
        ident = self._next_id
        d: Deferred[Any] = Deferred()
        self._pending[ident] = d
        if not self._send(ASK, json.dumps({"id": ident, "what": what}).encode()):
            del self._pending[ident]
            return succeed(None)
        timer = clock.callLater(timeout, self._give_up, ident)

        def cancel_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(cancel_timer)

    def _give_up(self, ident: int) -> None:
        d = self._pending.pop(ident, None)
        if d is not None:
            d.callback(None)

    def _answered(self, payload: bytes) -> None:
        try:
            answer = json.loads(payload)
            d = self._pending.pop(answer["id"], None)
        except (ValueError, KeyError, TypeError):
            _log.warn("worker {worker} sent an unreadable answer", worker=self.index)
            return
        if d is not None:
            d.callback(answer.get("body"))

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.callback(None)
        self.supervisor.worker_ended(self, reason)


@attrs.define(eq=False)
class _Slot:
    """One worker's place: the process now in it, and its restart history."""

    index: int
    backoff: Iterator[float]
    process: WorkerProcess | None = None
    timer: Any = None
    restarts: int = 0


class Supervisor(Service):
    """Keeps ``count`` worker processes running; stops them (drained) when it stops.

    ``spawn(process)`` starts one worker for a :class:`WorkerProcess` and returns its
    transport; ``publish`` receives the workers' log events (the global log by default).
    """

    def __init__(
        self,
        count: int,
        spawn: Callable[[WorkerProcess], Any],
        clock: Any,
        drain_timeout: float,
        backoff: Callable[[], Iterator[float]] = restart_backoff,
        publisher: Callable[[dict[str, Any]], None] = globalLogPublisher,
    ) -> None:
        self.count = count
        self.spawn = spawn
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.backoff = backoff
        self.publisher = publisher
        self.slots = [_Slot(index, backoff()) for index in range(1, count + 1)]
        self.restarts = 0
        self.stopping = False
        self._stopped: Deferred[None] | None = None
        self._kill_timer: Any = None
        self._previous_sigterm: Any = None

    # -- running -------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        _log.info("starting {count} worker processes", count=self.count)
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.timer = None
        if self.stopping:
            return
        process = WorkerProcess(self, slot.index)
        process.started_at = self.clock.seconds()
        try:
            self.spawn(process)
        except Exception:
            _log.failure("could not start worker {worker}", worker=slot.index)
            self._restart_later(slot, "could not be started", 0.0, pid=None)
            return
        slot.process = process
        _log.info("worker {worker} started (pid {pid})", worker=slot.index, pid=process.pid)

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        slot = self.slots[process.index - 1]
        if slot.process is process:
            slot.process = None
        how = describe_end(reason)
        lived = self.clock.seconds() - process.started_at
        if self.stopping:
            _log.info("worker {worker} (pid {pid}) {how}", worker=process.index,
                      pid=process.pid, how=how)
            self._check_stopped()
            return
        self._restart_later(slot, how, lived, process.pid)

    def _restart_later(self, slot: _Slot, how: str, lived: float, pid: int | None) -> None:
        if lived >= STABLE_AFTER:
            slot.backoff = self.backoff()
        delay = next(slot.backoff)
        slot.restarts += 1
        self.restarts += 1
        _log.warn(
            "worker {worker} (pid {pid}) {how} after {lived:.1f}s; restarting it in"
            " {delay:.1f}s", worker=slot.index, pid=pid, how=how, lived=lived, delay=delay,
        )
        slot.timer = self.clock.callLater(delay, self._start, slot)

    def publish(self, index: int, payload: bytes) -> None:
        """Log a worker's event as the supervisor's own, marked with the worker's index."""
        try:
            event = eventFromJSON(payload.decode("utf-8"))
        except ValueError:
            _log.warn("worker {worker} sent an unreadable log event", worker=index)
            return
        for key in _LOCAL_KEYS:
            event.pop(key, None)
        traceback = event.pop(_TRACEBACK, None)
        if isinstance(traceback, str):
            event["log_failure"] = RemoteFailure(traceback)
        event["worker"] = index
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        event["log_system"] = f"worker {index}: {system}"
        self.publisher(event)

    # -- what the admin listener asks ----------------------------------------------------

    def alive(self) -> int:
        return sum(1 for slot in self.slots if slot.process is not None)

    def pids(self) -> dict[int, int | None]:
        return {s.index: s.process.pid if s.process else None for s in self.slots}

    def ask_all(self, what: str) -> Deferred[dict[int, Any]]:
        asks = [
            slot.process.ask(what, self.clock) if slot.process else succeed(None)
            for slot in self.slots
        ]

        def collect(results: list[tuple[bool, Any]]) -> dict[int, Any]:
            return {
                slot.index: value if ok else None
                for slot, (ok, value) in zip(self.slots, results, strict=True)
            }

        return DeferredList(asks, consumeErrors=True).addCallback(collect)

    # -- stopping ------------------------------------------------------------------------

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        self.stopping = True
        for slot in self.slots:
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
        running = [slot.process for slot in self.slots if slot.process is not None]
        if not running:
            return None
        _log.info(
            "stopping {n} workers: each drains its live relays for up to {timeout:g}s",
            n=len(running), timeout=self.drain_timeout,
        )
        self._stopped = Deferred()
        for process in running:
            process.stop()
        self._kill_timer = self.clock.callLater(self.drain_timeout + KILL_GRACE, self.kill_all)
        self._install_second_sigterm()
        return self._stopped

    def stop_now(self) -> None:
        """The second SIGTERM: every worker closes its relays at once."""
        _log.info("second SIGTERM: the workers close everything now")
        for slot in self.slots:
            if slot.process is not None:
                slot.process.stop(now=True)

    def kill_all(self) -> None:
        self._kill_timer = None
        for slot in self.slots:
            if slot.process is not None:
                _log.warn(
                    "worker {worker} (pid {pid}) is still running {seconds:g}s after it was"
                    " asked to stop: killing it", worker=slot.index, pid=slot.process.pid,
                    seconds=self.drain_timeout + KILL_GRACE,
                )
                slot.process.signal("KILL")

    def _check_stopped(self) -> None:
        if self.alive() or self._stopped is None:
            return
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        stopped, self._stopped = self._stopped, None
        _log.info("all workers stopped")
        stopped.callback(None)

    def _install_second_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        call = getattr(self.clock, "callFromThread", None)
        if call is None:  # a test clock
            return

        def again(signum: int, frame: Any) -> None:
            call(self.stop_now)

        self._previous_sigterm = signal.signal(signal.SIGTERM, again)


@attrs.define(eq=False)
class Launcher:
    """How a worker is started: its command, its inherited descriptors, its first message."""

    reactor: Any
    #: The supervisor's listening sockets (its descriptors), once it listens.
    sockets: Callable[[], Sequence[SharedSocket]]
    #: The settings the workers run with (the embedded database's DSN filled in).
    settings: Callable[[], Settings]
    secret: bytes = b""

    def descriptors(self) -> tuple[dict[int, Any], tuple[SharedSocket, ...]]:
        """``childFDs`` for spawnProcess, and the sockets as numbered in the worker."""
        child_fds: dict[int, Any] = {CONTROL_FD: "w", 1: 1, 2: 2, MESSAGES_FD: "r"}
        inherited = []
        for i, shared in enumerate(self.sockets()):
            child_fd = FIRST_SOCKET_FD + i
            child_fds[child_fd] = shared.fd
            inherited.append(attrs.evolve(shared, fd=child_fd))
        return child_fds, tuple(inherited)

    def spawn(self, process: WorkerProcess) -> Any:
        child_fds, inherited = self.descriptors()
        settings = self.settings()
        process.init = WorkerInit(
            process.index, settings_text(settings), settings.source, self.secret, inherited
        ).encode()
        return self.reactor.spawnProcess(
            process, sys.executable, worker_command(process.index), env=dict(os.environ),
            childFDs=child_fds,
        )


# -- the worker's side -------------------------------------------------------------------------

#: Event keys that mean nothing in another process (objects, the legacy bridge's own).
_LOCAL_KEYS = ("log_logger", "log_source", "log_legacy", "log_io", "log_observer")


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
        """A log observer: the event as JSON (flattened by eventAsJSON, so that it formats the
        same in the supervisor although its objects stay here)."""
        event = dict(event)
        failure = event.pop("log_failure", None)
        if failure is not None:
            event[_TRACEBACK] = failure.getTraceback()
        if not self.send(LOG, eventAsJSON(event).encode("utf-8")):
            if failure is not None:
                event["log_failure"] = failure
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.__stderr__.write(formatEventAsClassicLogText(event) or "")  # type: ignore[union-attr]


@attrs.define(eq=False)
class WorkerHandles:
    """What the worker's control pipe acts on: its metrics, readiness and drain."""

    metrics: Any
    drain: Any


class ControlInput:
    """Reads the supervisor's frames from the worker's stdin and acts on them."""

    def __init__(self, reactor: Any, channel: ParentChannel, handles: WorkerHandles) -> None:
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

    def signalled(self, signum: int, frame: Any) -> None:
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
        from prometheus_client import generate_latest

        from twisted_novnc.operations.admin import readiness

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
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(
            channel.observe,  # type: ignore[arg-type]
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
        )],
        redirectStandardIO=False,
    )
    try:
        kind, payload = read_frame(CONTROL_FD)
        if kind != INIT:
            raise FrameError(f"expected the settings first, got {kind!r}")
        init = WorkerInit.decode(payload)
        settings = parse_config(init.settings, init.source)
        from twisted.internet import reactor

        from twisted_novnc._compat.twisted import read_pipe
        from twisted_novnc.processes.service import make_worker_service

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
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined, call-arg]
    return 0
