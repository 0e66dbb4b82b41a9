"""On shutdown: first ``/readyz`` turns 503 while the process serves on for ``[novnc]
drain_delay`` seconds (a load balancer's time to notice), then live relays get ``[novnc]
drain_timeout`` seconds before they are closed."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from twisted_novnc.errors import Refusal
from twisted_novnc.front.protocol import NoVNCServerFactory
from twisted_novnc.operations.admin import AdminSite
from twisted_novnc.reactors import IClockFromThreads, SignalHandler

_log = Logger()


@attrs.define(eq=False)
class ShutdownNotice(Service):
    """The first service to stop: ``/readyz`` turns 503 on every admin site at once, and the
    rest of the tree stops only ``delay`` seconds later.

    Meanwhile everything serves as before (new browsers are accepted and relayed), so a load
    balancer checking ``/readyz`` has marked this process down, and sends new browsers to
    another, before its listeners close.  Without an admin site nothing could notice: no
    delay.  A second SIGTERM ends the delay at once.
    """

    sites: list[AdminSite]
    delay: float
    clock: IClockFromThreads
    _timer: IDelayedCall | None = None
    _waiting: Deferred[None] | None = None
    _previous_handler: SignalHandler = None

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        for site in self.sites:
            site.shutting_down = True
        if not self.sites or self.delay <= 0:
            return None
        _log.info(
            "shutting down: /readyz answers 503; new browsers are still served for {delay:g}s"
            " ([novnc] drain_delay), then the drain starts",
            event="drain_delay_started", delay=self.delay,
        )
        self._waiting = Deferred()
        self._timer = self.clock.callLater(self.delay, self.end_delay)
        call = getattr(self.clock, "callFromThread", None)  # None: a test clock
        if call is not None and threading.current_thread() is threading.main_thread():

            def again(signum: int, frame: FrameType | None) -> None:
                _log.info("second SIGTERM: draining now", event="drain_delay_cut")
                call(self.end_delay)

            self._previous_handler = signal.signal(signal.SIGTERM, again)
        return self._waiting

    def end_delay(self) -> None:
        """The delay is over (or cut short): the rest of the tree stops, draining."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)


@attrs.define(eq=False)
class DrainService(Service):
    """On shutdown: let live relays go on for ``timeout`` seconds, then close them with 1001.

    Listeners stop accepting and waiters are refused (4503) by their own services at the same
    moment; this one holds the reactor's shutdown until every browser connection is gone.  A
    second SIGTERM closes everything at once.
    """

    factory: NoVNCServerFactory
    timeout: float
    clock: IClockFromThreads
    grace: float = 3.0
    _timers: list[IDelayedCall] = attrs.field(factory=list)
    _previous_handler: SignalHandler = None
    _draining: bool = False
    _waiting: list[Deferred[None]] = attrs.field(factory=list)

    def when_drained(self) -> Deferred[None]:
        """Fires once a drain under way is over (at once when none is): what must outlive
        the relays (the recorder's end records) waits here."""
        if not self._draining:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if not self.factory.connections:
            return None
        self._draining = True
        _log.info(
            "draining: {live} live relays may go on for {timeout:g}s ({total} connections open)",
            event="drain_started",
            live=len(self.factory.live),
            timeout=self.timeout,
            total=len(self.factory.connections),
        )
        drained: Deferred[None] = Deferred()
        self.factory.drained = drained
        self._timers.append(self.clock.callLater(self.timeout, self.close_all))
        self._install_second_sigterm()
        drained.addBoth(self._done)
        return drained

    def close_all(self) -> None:
        """Close every live relay with 1001 now; abort whatever is left after a grace period."""
        live = list(self.factory.live)
        if live:
            _log.info("closing {n} live relays: shutting down",
                      event="drain_closing_relays", n=len(live))
        for protocol in live:
            protocol.end_relay(1001, "server shutting down", "shutdown")
        self._timers.append(self.clock.callLater(self.grace, self._abort_all))

    def close_generation(self) -> None:
        """``[novnc] upgrade_drain_timeout`` has passed in an old generation: browsers still
        waiting get 4503 (shutting down), live relays 1001, and the rest is aborted after a
        grace period, as at the end of a drain."""
        self.factory.gate.fail_all(Refusal.SHUTTING_DOWN)
        self.close_all()

    def _abort_all(self) -> None:
        for protocol in list(self.factory.connections):
            protocol.transport.abortConnection()

    def _install_second_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        reactor = self.clock

        def again(signum: int, frame: FrameType | None) -> None:
            _log.info("second SIGTERM: closing everything now", event="drain_forced")
            reactor.callFromThread(self.close_all)

        self._previous_handler = signal.signal(signal.SIGTERM, again)

    def _done(self, result: object) -> object:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        _log.info("drained", event="drained")
        self._draining = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        return result
