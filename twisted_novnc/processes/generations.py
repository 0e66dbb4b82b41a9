"""The main process's side of an upgrade: SIGUSR2 or ``POST /upgrade`` starts one.

:class:`Upgrader` runs the steps of :mod:`twisted_novnc.processes.upgrade` in order: reread
the config, start the new generation and wait until it accepts, make it the serving one, and
have every process of the old generation hand its relays on.  The upgrade is complete once
every old process has handed on what could move; what stays drains on (``[novnc]
upgrade_drain_timeout``) and is no business of the upgrade's.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_novnc.config import Settings
from twisted_novnc.front.protocol import NoVNCServerFactory
from twisted_novnc.processes.launcher import Launcher, worker_count
from twisted_novnc.processes.listeners import ListenerService
from twisted_novnc.processes.sharedports import SharedSocket
from twisted_novnc.processes.supervisor import (
    NotReadyInTime,
    Supervisor,
    WorkerEnded,
    WorkerProcess,
)
from twisted_novnc.processes.upgrade import (
    MOVE_RATE,
    READY_TIMEOUT,
    Retirement,
    UpgradeRefused,
    reread_settings,
    upgrade_report,
)
from twisted_novnc.reactors import IDaemonReactor, SignalHandler

_log = Logger()


@attrs.define(eq=False)
class LocalGeneration:
    """With ``[novnc] workers = 1``: the main process's own proxy, the first generation."""

    factory: NoVNCServerFactory
    listeners: list[ListenerService]
    close_all: Callable[[], None]

    def sockets(self) -> list[SharedSocket]:
        """Its listening sockets, for the workers of the generations after it."""
        shared = []
        for listener in self.listeners:
            port = listener.port
            family = getattr(port, "addressFamily", socket.AF_UNIX)
            shared.append(SharedSocket(listener.description, port.fileno(), int(family)))
        return shared

    def stop_accepting(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()


@attrs.define(eq=False)
class Upgrader(Service):
    """Upgrades the daemon on SIGUSR2 or when asked (:meth:`upgrade`), one at a time.

    ``launcher(settings, secret)`` makes the new generation's launcher (the same sockets and
    router, the new settings); ``supervisor`` is the daemon's, or None with ``workers = 1``,
    where the first upgrade makes one (added to ``tree``; ``supervising`` is told, to serve
    the workers' metrics on the admin listener) and hands ``local``'s relays on.
    """

    settings: Settings
    overrides: Mapping[tuple[str, str], str]
    reactor: IDaemonReactor
    launcher: Callable[[Settings, bytes], Launcher]
    validate: Callable[[Settings], bytes]
    tree: MultiService
    supervisor: Supervisor | None = None
    local: LocalGeneration | None = None
    supervising: Callable[[Supervisor], None] = lambda supervisor: None
    source: str = attrs.field(default="")
    #: The old local generation, once retired (workers = 1, after the first upgrade).
    retired_local: Retirement | None = attrs.field(default=None, init=False)
    _busy: bool = attrs.field(default=False, init=False)
    _previous_handler: SignalHandler = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        # The daemon may be started from any directory; the file it read is the one to reread.
        self.source = self.source or os.path.abspath(self.settings.source)

    # -- the trigger -----------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        if threading.current_thread() is not threading.main_thread():
            return
        call = getattr(self.reactor, "callFromThread", None)
        if call is None:
            return

        def signalled(signum: int, frame: FrameType | None) -> None:
            call(self._signalled)

        self._previous_handler = signal.signal(signal.SIGUSR2, signalled)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR2, self._previous_handler)
            self._previous_handler = None

    def _signalled(self) -> None:
        _log.info("received SIGUSR2: upgrading", event="upgrade_signal")
        self.upgrade().addErrback(lambda failure: None)  # logged by upgrade() itself

    # -- the upgrade -------------------------------------------------------------------------

    def upgrade(self) -> Deferred[dict[str, Any]]:
        """Upgrade now: fires with the report once every movable relay has moved, or fails
        with UpgradeRefused (the old generation serving everything, untouched) and why."""
        if self._busy:
            return self._refused(UpgradeRefused("an upgrade is already under way"))
        if not self.running:
            return self._refused(UpgradeRefused("the daemon is stopping"))
        if self.supervisor is not None and self.supervisor.stopping:
            return self._refused(UpgradeRefused("the daemon is stopping"))
        try:
            settings, secret = reread_settings(
                self.source, self.overrides, self.settings, self.validate
            )
            self._check_sockets(settings)
        except UpgradeRefused as refused:
            return self._refused(refused)
        self._busy = True
        started = self.reactor.seconds()
        count = worker_count(settings.novnc.workers)
        _log.info(
            "upgrade: starting a new generation of {count} worker(s) with the code installed"
            " now and {source}", event="upgrade_started", count=count, source=self.source,
        )
        launcher = self.launcher(settings, secret)
        supervisor = self._supervisor(launcher)

        def serve(workers: list[WorkerProcess]) -> Deferred[dict[str, Any]]:
            return self._serve(workers, supervisor, launcher, settings, started)

        d = supervisor.start_generation(launcher.spawn, count, READY_TIMEOUT)
        upgraded: Deferred[dict[str, Any]] = d.addCallbacks(serve, self._not_started)
        upgraded.addBoth(self._finished)
        return upgraded

    def _check_sockets(self, settings: Settings) -> None:
        for description in settings.novnc.listen:
            if "systemd:" in description:
                raise UpgradeRefused(
                    f"the listener {description!r} is systemd's (socket activation), which a"
                    " new generation cannot share: restart instead"
                )

    def _supervisor(self, launcher: Launcher) -> Supervisor:
        if self.supervisor is None:
            self.supervisor = Supervisor(
                0, launcher.spawn, self.reactor, self.settings.novnc.drain_timeout
            )
            self.supervisor.setServiceParent(self.tree)
            self.supervising(self.supervisor)
        return self.supervisor

    def _serve(
        self, workers: list[WorkerProcess], supervisor: Supervisor, launcher: Launcher,
        settings: Settings, started: float,
    ) -> Deferred[dict[str, Any]]:
        old = supervisor.serve(launcher.spawn, workers)
        launcher.router.targets = [w.channel for w in workers if w.channel is not None]
        for worker in workers:
            _log.info(
                "upgrade: worker {worker} (pid {pid}) of generation {generation} accepts,"
                " running twisted_novnc {version}", event="upgrade_worker_ready",
                worker=worker.index, pid=worker.pid, generation=worker.generation,
                version=worker.version,
            )
        drain = settings.novnc.upgrade_drain_timeout
        # The old generation shares the pace of the move (processes/upgrade.py, MOVE_RATE).
        sources = len(old) + (1 if self.local is not None and self.retired_local is None else 0)
        rate = MOVE_RATE / max(1, sources)
        handing: list[Deferred[Any]] = [process.upgrade(drain, rate) for process in old]
        if self.local is not None and self.retired_local is None:
            local = self.local
            router = launcher.router

            def send(payload: bytes, fds: list[int]) -> bool:
                assert self.retired_local is not None
                return router.relay(self.retired_local, payload, fds, False)

            retirement = Retirement(
                local.factory, self.reactor, local.stop_accepting, send, drain, local.close_all,
                rate,
            )
            self.retired_local = retirement
            handing.append(retirement.start().addCallback(
                lambda counts: {"moved": counts[0], "kept": counts[1]}
            ))
        self.settings = settings
        generation = supervisor.generation

        def report(results: list[tuple[bool, Any]]) -> dict[str, Any]:
            moved = sum(int((value or {}).get("moved", 0)) for ok, value in results if ok)
            kept = sum(int((value or {}).get("kept", 0)) for ok, value in results if ok)
            body = upgrade_report(
                generation,
                [{"worker": w.index, "pid": w.pid, "version": w.version} for w in workers],
                moved, kept, self.reactor.seconds() - started,
            )
            _log.info(
                "upgrade complete: generation {generation} serves ({workers} worker(s));"
                " {moved} relays moved, {kept} stay in the old generation until they end"
                " (in {seconds:.3f}s)", event="upgrade_complete",
                generation=generation, workers=len(workers), moved=moved, kept=kept,
                seconds=body["seconds"],
            )
            return body

        return DeferredList(handing, consumeErrors=True).addCallback(report)

    def _not_started(self, failure: Failure) -> Failure:
        if failure.check(WorkerEnded):
            reason = f"a worker of the new generation {failure.value} before it was ready"
        elif failure.check(NotReadyInTime):
            reason = str(failure.value)
        elif failure.check(Exception):
            reason = f"the new generation did not start: {failure.getErrorMessage()}"
        else:
            return failure
        return Failure(UpgradeRefused(reason))

    def _finished(self, result: Any) -> Any:
        self._busy = False
        if isinstance(result, Failure) and result.check(UpgradeRefused):
            _log.error("upgrade refused: {reason}; the running generation serves on,"
                       " untouched", event="upgrade_refused", reason=result.getErrorMessage())
        elif isinstance(result, Failure):
            _log.failure("upgrade failed", result, event="upgrade_failed")
        return result

    def _refused(self, refused: UpgradeRefused) -> Deferred[dict[str, Any]]:
        _log.error("upgrade refused: {reason}; the running generation serves on, untouched",
                   event="upgrade_refused",
                   reason=str(refused))
        return fail(refused)

