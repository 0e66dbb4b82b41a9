"""``[novnc] workers``: the supervisor keeps N worker processes running.

The supervisor (the ``twistd`` process) creates the listening sockets, starts N workers with
those sockets inherited (:mod:`twisted_novnc.processes.sharedports`, started by
:mod:`twisted_novnc.processes.launcher`), and restarts any worker that ends, with capped
backoff.  Each worker (:mod:`twisted_novnc.processes.worker`) is a whole proxy of its own (its
own store, LISTEN connection and readiness gate: the database is the only shared state), so any
worker serves any session.  They talk over two pipes (:mod:`twisted_novnc.processes.ipc`).

Workers are stopped through the pipe rather than by signal: under systemd's default
``KillMode=control-group`` every process of the unit gets the SIGTERM, and a second one from
the supervisor would read as "close everything now".
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from twisted_novnc.backoff import jittered_backoff
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
    decode_event,
    frame,
)
from twisted_novnc.reactors import SignalHandler
from twisted_novnc.relay.handoff import HandoffChannel

_log = Logger()

#: Seconds a worker gets to answer a question (a scrape must never hang on a stuck worker).
ANSWER_TIMEOUT = 2.0
#: A worker that ran this long before it ended is restarted at once, not after backoff.
STABLE_AFTER = 10.0
#: Seconds after the drain (``drain_timeout``) before a worker still running is killed.
KILL_GRACE = 10.0


def restart_backoff() -> Iterator[float]:
    """At once the first time, then 0.5 s growing to 30 s while a worker keeps dying young."""
    return jittered_backoff(initial=0.5, maximum=30.0)


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


class WorkerEnded(Exception):
    """A worker ended before it said it was ready (its exit status or signal)."""


class NotReadyInTime(Exception):
    """A new generation's workers did not all say they accept in time."""


class WorkerProcess(ProcessProtocol):
    """The supervisor's end of one worker process: its pipes, its questions, its end."""

    def __init__(self, supervisor: Supervisor, index: int, generation: int = 1) -> None:
        self.supervisor = supervisor
        self.index = index
        self.generation = generation
        self.init = b""
        self.pid: int | None = None
        self.started_at = 0.0
        self.ended = False
        #: The version it runs, as it said when ready.
        self.version: str | None = None
        #: Fires with its READY message once it accepts; fails with WorkerEnded if it ends first.
        self.ready: Deferred[dict[str, Any]] = Deferred()
        #: While it hands its relays on (an upgrade): fires with its HANDED message, or at its end.
        self.handed: Deferred[dict[str, Any]] | None = None
        #: Its relay hand-off channel (processes/launcher.py opens it).
        self.channel: HandoffChannel | None = None
        self._frames = Frames()
        self._pending: dict[int, Deferred[Any]] = {}
        self._next_id = 0

    def _transport(self) -> IProcessTransport:
        if self.transport is None:
            raise RuntimeError(f"worker {self.index} has no process")
        return self.transport

    def connectionMade(self) -> None:
        transport = self._transport()
        self.pid = transport.pid
        transport.writeToChild(CONTROL_FD, frame(INIT, self.init))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != MESSAGES_FD:
            return
        try:
            frames = self._frames.feed(data)
        except FrameError as e:
            _log.error("worker {worker} sent garbage ({error}): killing it",
                       event="worker_garbage", worker=self.index,
                       error=e)
            self.signal("KILL")
            return
        for kind, payload in frames:
            if kind == LOG:
                self.supervisor.publish(self.index, payload)
            elif kind == ANSWER:
                self._answered(payload)
            elif kind == READY:
                self._ready(payload)
            elif kind == HANDED:
                self._handed(payload)

    def _ready(self, payload: bytes) -> None:
        try:
            info = json.loads(payload)
            self.version = str(info.get("version"))
        except (ValueError, AttributeError):
            info = {}
        if not self.ready.called:
            self.ready.callback(info)

    def _handed(self, payload: bytes) -> None:
        try:
            counts = json.loads(payload)
        except ValueError:
            counts = {}
        handed, self.handed = self.handed, None
        if handed is not None:
            handed.callback(counts)

    def upgrade(self, drain_timeout: float, move_rate: float) -> Deferred[dict[str, Any]]:
        """Have this (old-generation) worker hand its relays on, ``move_rate`` a second at
        most, and drain the rest; fires with its counts (``moved``, ``kept``) once handed, or
        empty if it ends first."""
        handed: Deferred[dict[str, Any]] = Deferred()
        self.handed = handed
        message = {"drain_timeout": drain_timeout, "move_rate": move_rate}
        if not self._send(UPGRADE, json.dumps(message).encode()):
            self.handed = None
            handed.callback({})
        return handed

    def _send(self, kind: bytes, payload: bytes = b"") -> bool:
        try:
            self._transport().writeToChild(CONTROL_FD, frame(kind, payload))
        except (KeyError, OSError, RuntimeError):  # the pipe or the process is gone
            return False
        return True

    def signal(self, name: str) -> None:
        with contextlib.suppress(Exception):  # it has just ended
            self._transport().signalProcess(name)

    def stop(self, now: bool = False) -> None:
        """Ask the worker to drain (``now``: to close every relay at once)."""
        if not self._send(STOP_NOW if now else STOP):
            self.signal("TERM")

    def ask(
        self, what: str, clock: IReactorTime, timeout: float = ANSWER_TIMEOUT
    ) -> Deferred[Any]:
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

        def cancel_timer(result: object) -> object:
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
            _log.warn("worker {worker} sent an unreadable answer",
                      event="worker_bad_answer", worker=self.index)
            return
        if d is not None:
            d.callback(answer.get("body"))

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.callback(None)
        if not self.ready.called:
            self.ready.errback(WorkerEnded(describe_end(reason)))
            # Only a new generation waits on ``ready`` (start_generation, which has seen the
            # failure by now); a serving worker's early end is worker_ended's to handle, not
            # an "Unhandled error in Deferred" when the Deferred is collected.
            self.ready.addErrback(_ended_before_ready)
        handed, self.handed = self.handed, None
        if handed is not None:
            handed.callback({})
        self.supervisor.worker_ended(self, reason)


def _ended_before_ready(failure: Failure) -> None:
    failure.trap(WorkerEnded)


@attrs.define(eq=False)
class _Slot:
    """One worker's place: the process now in it, and its restart history."""

    index: int
    backoff: Iterator[float]
    process: WorkerProcess | None = None
    timer: IDelayedCall | None = None
    restarts: int = 0


class Supervisor(Service):
    """Keeps ``count`` worker processes running; stops them (drained) when it stops.

    ``spawn(process)`` starts one worker for a :class:`WorkerProcess` and returns its
    transport; ``publish`` receives the workers' log events (the global log by default).
    """

    def __init__(
        self,
        count: int,
        spawn: Callable[[WorkerProcess], IProcessTransport],
        clock: IReactorTime,
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
        #: The generation the slots run; older workers still draining after an upgrade.
        self.generation = 1
        self.retired: list[WorkerProcess] = []
        #: A generation starting (an upgrade), not yet serving.
        self.starting: list[WorkerProcess] = []
        self._next_index = count + 1
        self.restarts = 0
        self.stopping = False
        self._stopped: Deferred[None] | None = None
        self._kill_timer: IDelayedCall | None = None
        self._previous_sigterm: SignalHandler = None

    # -- running -------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        _log.info("starting {count} worker processes", event="workers_starting", count=self.count)
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.timer = None
        if self.stopping:
            return
        process = WorkerProcess(self, slot.index, self.generation)
        process.started_at = self.clock.seconds()
        try:
            self.spawn(process)
        except Exception:
            _log.failure("could not start worker {worker}",
                         event="worker_start_failed", worker=slot.index)
            self._restart_later(slot, "could not be started", 0.0, pid=None)
            return
        slot.process = process
        _log.info("worker {worker} started (pid {pid})",
                  event="worker_started", worker=slot.index, pid=process.pid)

    def worker_ended(self, process: WorkerProcess, reason: Failure) -> None:
        how = describe_end(reason)
        slot = next((s for s in self.slots if s.process is process), None)
        if slot is None:
            # An old generation's worker that drained, or a new one that never got ready.
            if process in self.retired:
                self.retired.remove(process)
            if process in self.starting:
                self.starting.remove(process)
            _log.info("worker {worker} (pid {pid}) of generation {generation} {how}",
                      event="worker_ended",
                      worker=process.index, pid=process.pid, generation=process.generation,
                      how=how)
            self._check_stopped()
            return
        slot.process = None
        lived = self.clock.seconds() - process.started_at
        if self.stopping:
            _log.info("worker {worker} (pid {pid}) {how}",
                      event="worker_ended", worker=process.index,
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
            " {delay:.1f}s",
            event="worker_restarting", worker=slot.index, pid=pid, how=how, lived=lived,
            delay=delay,
        )
        slot.timer = self.clock.callLater(delay, self._start, slot)

    def publish(self, index: int, payload: bytes) -> None:
        """Log a worker's event as the supervisor's own, marked with the worker's index."""
        try:
            event = decode_event(payload)
        except ValueError:
            _log.warn("worker {worker} sent an unreadable log event",
                      event="worker_bad_log_event", worker=index)
            return
        event["worker"] = index
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        event["log_system"] = f"worker {index}: {system}"
        self.publisher(event)

    # -- what the admin listener asks ----------------------------------------------------

    def alive(self) -> int:
        """The workers of the serving generation running now."""
        return sum(1 for slot in self.slots if slot.process is not None)

    def processes(self) -> list[WorkerProcess]:
        """Every worker process running: the serving generation's, older ones still
        draining, and a new one starting."""
        serving = [slot.process for slot in self.slots if slot.process is not None]
        return serving + self.retired + self.starting

    def pids(self) -> dict[int, int | None]:
        pids = {s.index: s.process.pid if s.process else None for s in self.slots}
        pids.update((process.index, process.pid) for process in self.retired)
        return pids

    def ask_all(self, what: str) -> Deferred[dict[int, Any]]:
        """Every worker's answer, by index: the serving generation's and the draining ones'."""
        indexes = [slot.index for slot in self.slots] + [p.index for p in self.retired]
        asks = [
            slot.process.ask(what, self.clock) if slot.process else succeed(None)
            for slot in self.slots
        ] + [process.ask(what, self.clock) for process in self.retired]

        def collect(results: list[tuple[bool, Any]]) -> dict[int, Any]:
            return {
                index: value if ok else None
                for index, (ok, value) in zip(indexes, results, strict=True)
            }

        return DeferredList(asks, consumeErrors=True).addCallback(collect)

    # -- a new generation (an upgrade, processes/generations.py) -------------------------

    def start_generation(
        self, spawn: Callable[[WorkerProcess], IProcessTransport], count: int,
        ready_timeout: float,
    ) -> Deferred[list[WorkerProcess]]:
        """Start ``count`` workers with ``spawn``; fires with them once each says it is ready,
        or fails (WorkerEnded, or a timeout) with the ones started stopped again.  Until it
        fires, the serving generation is untouched."""
        generation = self.generation + 1
        started: list[WorkerProcess] = []
        try:
            for index in range(self._next_index, self._next_index + count):
                process = WorkerProcess(self, index, generation)
                process.started_at = self.clock.seconds()
                self.spawn_one(spawn, process)
                started.append(process)
                self.starting.append(process)
        except Exception as e:
            self._abandon(started)
            return fail(WorkerEnded(f"could not be started: {e}"))
        self._next_index += count
        outcome: Deferred[list[WorkerProcess]] = Deferred()

        def serving(_: object) -> None:
            if not outcome.called:
                outcome.callback(started)

        def failed(failure: Failure) -> None:
            if not outcome.called:
                outcome.errback(failure.value.subFailure)  # a FirstError: the first failure

        def too_late() -> None:
            if not outcome.called:
                outcome.errback(NotReadyInTime(
                    f"the new generation did not say it accepts within {ready_timeout:g}s"
                ))

        timer = self.clock.callLater(ready_timeout, too_late)
        DeferredList(
            [process.ready for process in started], fireOnOneErrback=True, consumeErrors=True
        ).addCallbacks(serving, failed)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                self._abandon(started)
            return result

        return outcome.addBoth(settled)

    def spawn_one(
        self, spawn: Callable[[WorkerProcess], IProcessTransport], process: WorkerProcess
    ) -> None:
        spawn(process)

    def _abandon(self, started: list[WorkerProcess]) -> None:
        for process in started:
            if not process.ended:
                process.stop(now=True)
                self.clock.callLater(KILL_GRACE, self._kill_if_running, process)

    def _kill_if_running(self, process: WorkerProcess) -> None:
        if not process.ended:
            process.signal("KILL")

    def serve(
        self, spawn: Callable[[WorkerProcess], IProcessTransport], workers: list[WorkerProcess]
    ) -> list[WorkerProcess]:
        """The new generation serves from now on: its workers take the slots (restarted with
        ``spawn``, the new code and settings, if they end); the old ones, returned, are
        retired: never restarted, stopped when they have drained."""
        old: list[WorkerProcess] = []
        for slot in self.slots:
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
            if slot.process is not None:
                old.append(slot.process)
        for process in workers:
            if process in self.starting:
                self.starting.remove(process)
        self.retired.extend(old)
        self.generation = workers[0].generation if workers else self.generation + 1
        self.spawn = spawn
        self.count = len(workers)
        self.slots = [
            _Slot(process.index, self.backoff(), process=process) for process in workers
        ]
        return old

    # -- stopping ------------------------------------------------------------------------

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        self.stopping = True
        for slot in self.slots:
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
        running = self.processes()
        if not running:
            return None
        _log.info(
            "stopping {n} workers: each drains its live relays for up to {timeout:g}s",
            event="workers_stopping",
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
        _log.info("second SIGTERM: the workers close everything now", event="workers_forced")
        for process in self.processes():
            process.stop(now=True)

    def kill_all(self) -> None:
        self._kill_timer = None
        for process in self.processes():
            _log.warn(
                "worker {worker} (pid {pid}) is still running {seconds:g}s after it was"
                " asked to stop: killing it",
                event="worker_killed", worker=process.index, pid=process.pid,
                seconds=self.drain_timeout + KILL_GRACE,
            )
            process.signal("KILL")

    def _check_stopped(self) -> None:
        if self.processes() or self._stopped is None:
            return
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        stopped, self._stopped = self._stopped, None
        _log.info("all workers stopped", event="workers_stopped")
        stopped.callback(None)

    def _install_second_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        call = getattr(self.clock, "callFromThread", None)
        if call is None:  # a test clock
            return

        def again(signum: int, frame: FrameType | None) -> None:
            call(self.stop_now)

        self._previous_sigterm = signal.signal(signal.SIGTERM, again)


class SequentialMultiService(MultiService):
    """Stops its children one at a time, last first, each once the one before has stopped.

    The supervisor's tree needs it: the embedded database must outlive the workers' drain.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        d: Deferred[None] = succeed(None)
        for service in reversed(list(self)):
            d.addCallback(_stop_next, service)
            d.addErrback(_stop_failed)
        return d


def _stop_next(_: None, service: IService) -> Deferred[None]:
    return maybeDeferred(service.stopService)


def _stop_failed(failure: Failure) -> None:
    _log.failure("while stopping a service", failure, event="stop_error")
