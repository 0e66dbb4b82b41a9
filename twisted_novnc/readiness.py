"""The session-readiness gate: one Deferred per waiting browser, fired by committed rows.

A waiter is registered *before* its row is read, and every NOTIFY for its session triggers a
fresh read, so a commit can never fall between the read and the wait.  Reads are batched: all
sessions notified since the last query are read in one ``= ANY(...)`` query, which is what keeps
a burst of a thousand commits to a handful of round trips.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .backoff import jittered_backoff
from .errors import Refusal, Refused
from .session import SessionRow, Target, parse_vm_ip

_log = Logger()


class SessionSource(Protocol):
    """The part of a session store the gate needs (PostgreSQL, or in memory for tests)."""

    def fetch(self, session_ids: Iterable[str]) -> Deferred[dict[str, SessionRow]]: ...

    def normalise_id(self, raw: str) -> str | None: ...


class _Seen(enum.Enum):
    """What the last read said about a session, which decides the code at the deadline."""

    NOTHING = "not read yet"
    ABSENT = "no row"
    NOT_READY = "row not ready"
    DATABASE_ERROR = "database error"


_DEADLINE_REFUSALS = {
    _Seen.NOTHING: Refusal.DATABASE_UNAVAILABLE,
    _Seen.DATABASE_ERROR: Refusal.DATABASE_UNAVAILABLE,
    _Seen.ABSENT: Refusal.NOT_FOUND,
    _Seen.NOT_READY: Refusal.NOT_READY,
}


@attrs.define(eq=False)
class _Waiter:
    session_id: str
    deferred: Deferred[Target]
    timer: IDelayedCall | None = None


@attrs.define(eq=False)
class ReadinessGate:
    """Hands out ``when_ready`` Deferreds and fires them from the rows the store reads."""

    source: SessionSource
    clock: IReactorTime
    timeout: float
    ended_statuses: Collection[str]
    default_port: int
    _waiters: dict[str, set[_Waiter]] = attrs.field(factory=dict)
    _seen: dict[str, _Seen] = attrs.field(factory=dict)
    _pending: set[str] = attrs.field(factory=set)
    _flush_call: IDelayedCall | None = None
    _retry_call: IDelayedCall | None = None
    _retry_ids: set[str] = attrs.field(factory=set)
    _retry_delays: Any = attrs.field(factory=lambda: jittered_backoff(0.05, 2.0))
    _in_flight: bool = False

    # -- the public side -----------------------------------------------------------------

    def when_ready(self, session_id: str) -> Deferred[Target]:
        """Fire with the session's target once its committed row is ready.

        Fails with :class:`Refused`: ENDED at once for an ended session, and at the deadline
        NOT_FOUND, NOT_READY or DATABASE_UNAVAILABLE by what the last read saw.  Cancelling
        the Deferred (the browser left) removes the waiter and its timer.
        """
        key = self.source.normalise_id(session_id)
        if key is None:
            return _failed(Refused(Refusal.BAD_PATH, f"not a valid session id: {session_id!r}"))
        waiter = _Waiter(key, Deferred(lambda d: self._forget(waiter)))
        waiter.timer = self.clock.callLater(self.timeout, self._deadline, waiter)
        self._waiters.setdefault(key, set()).add(waiter)
        self._seen.setdefault(key, _Seen.NOTHING)
        self._schedule_read([key])
        return waiter.deferred

    @property
    def waiting(self) -> int:
        """How many browsers are held waiting right now."""
        return sum(len(w) for w in self._waiters.values())

    def waiting_for(self, session_id: str) -> int:
        return len(self._waiters.get(session_id, ()))

    def fail_all(self, refusal: Refusal, detail: str = "") -> None:
        """Fail every waiter now (the daemon is shutting down)."""
        for key in list(self._waiters):
            self._fail(key, Refused(refusal, detail))
        self._stop_calls()

    # -- the store's side (StoreObserver) ----------------------------------------------

    def notified(self, session_id: str) -> None:
        if session_id in self._waiters:
            self._schedule_read([session_id])

    def listening(self) -> None:
        """Notifications sent while LISTEN was down are lost: re-read every waiter."""
        self._schedule_read(self._waiters)

    def not_listening(self) -> None:
        _log.warn("not listening for session changes; {n} waiters keep their deadline",
                  n=self.waiting)

    # -- reading -------------------------------------------------------------------------

    def _schedule_read(self, keys: Iterable[str]) -> None:
        self._pending.update(keys)
        if self._flush_call is None and not self._in_flight and self._pending:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        batch = {k for k in self._pending if k in self._waiters}
        self._pending.clear()
        if not batch:
            return
        self._in_flight = True
        d = self.source.fetch(batch)
        d.addCallbacks(self._apply, self._read_failed, callbackArgs=(batch,),
                       errbackArgs=(batch,))
        d.addBoth(self._read_done)

    def _read_done(self, _: object) -> None:
        self._in_flight = False
        self._schedule_read(())

    def _apply(self, rows: dict[str, SessionRow], batch: set[str]) -> None:
        self._retry_delays = jittered_backoff(0.05, 2.0)
        for key in batch:
            if key in self._waiters:
                self._judge(key, rows.get(key))

    def _judge(self, key: str, row: SessionRow | None) -> None:
        if row is None:
            self._seen[key] = _Seen.ABSENT
        elif row.status is not None and row.status in self.ended_statuses:
            self._fail(key, Refused(Refusal.ENDED, f"status is {row.status!r}"))
        elif not row.vm_ip:
            self._seen[key] = _Seen.NOT_READY
        else:
            host = parse_vm_ip(row.vm_ip)
            if host is None:
                self._fail(key, Refused(Refusal.BAD_VM_ADDRESS, f"vm_ip {row.vm_ip!r}"))
            else:
                self._succeed(key, Target(key, host, row.port or self.default_port))

    def _read_failed(self, failure: Any, batch: set[str]) -> None:
        _log.warn("session lookup failed: {error}", error=failure.getErrorMessage())
        for key in batch:
            if key in self._waiters:
                self._seen[key] = _Seen.DATABASE_ERROR
        self._retry_ids.update(batch)
        if self._retry_call is None:
            self._retry_call = self.clock.callLater(next(self._retry_delays), self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        ids, self._retry_ids = self._retry_ids, set()
        self._schedule_read(ids)

    # -- ending a wait ---------------------------------------------------------------------

    def _deadline(self, waiter: _Waiter) -> None:
        waiter.timer = None
        seen = self._seen.get(waiter.session_id, _Seen.NOTHING)
        self._remove(waiter)
        waiter.deferred.errback(
            Refused(_DEADLINE_REFUSALS[seen], f"{seen.value} after {self.timeout:g}s")
        )

    def _succeed(self, key: str, target: Target) -> None:
        for waiter in self._take(key):
            waiter.deferred.callback(target)

    def _fail(self, key: str, error: Refused) -> None:
        for waiter in self._take(key):
            waiter.deferred.errback(error)

    def _take(self, key: str) -> list[_Waiter]:
        waiters = list(self._waiters.get(key, ()))
        for waiter in waiters:
            self._remove(waiter)
        return waiters

    def _forget(self, waiter: _Waiter) -> None:
        """The canceller: the browser left while waiting."""
        self._remove(waiter)

    def _remove(self, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        waiters = self._waiters.get(waiter.session_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[waiter.session_id]
                self._seen.pop(waiter.session_id, None)
                self._pending.discard(waiter.session_id)
                self._retry_ids.discard(waiter.session_id)
        if not self._waiters:
            self._stop_calls()

    def _stop_calls(self) -> None:
        for name in ("_flush_call", "_retry_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


__all__ = ["CancelledError", "ReadinessGate", "SessionSource"]
