"""txpostgres' internals the session store relies on, each behind one named function or class.

txpostgres reconnects a dead connection on its own, but cannot be told to stop and says
nothing of each failed attempt.  What closes those gaps leans on how txpostgres works inside;
each such reliance has a canary in
``tests/compat/test_txpostgres_internals.py`` naming it and the installed txpostgres.

- :class:`StoppableDetector`: a ``DeadConnectionDetector`` whose ``startReconnecting`` is
  re-implemented (txpostgres' own cannot be stopped or watched) on its ``RetryingCall``,
  ``reconnect`` and ``connectionRecovered``;
- :func:`is_open` and :func:`server_connection`: the psycopg2 connection a ``Connection``
  wraps (``pollable()``, the same object as its private ``_connection``), a new one after
  each reconnect;
- :class:`QuietConnection`: a ``Connection`` whose idle death is a lost connection, not an
  "Unhandled Error": txpostgres lets ``poll()``'s error (and re-registering a socket that is
  gone) escape ``doRead`` when no query waits for it, and the reactor logs a traceback for
  each, then loses the connection anyway.  It also hands NOTIFYs to their observers at once
  (``checkForNotifies``, which txpostgres calls after each read and each query), not through
  txpostgres' Cooperator: a task, a timer and a reactor turn for every notification was most
  of what a NOTIFY cost a daemon (bench/RESULTS.md, history 17).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import psycopg2
import psycopg2.errorcodes
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from txpostgres import reconnection, retrying, txpostgres

_log = Logger()


class Health(Protocol):
    """What a :class:`StoppableDetector` reports to (the store's view of the database)."""

    #: Called each time a dead connection is re-established.
    on_recovered: Callable[[], None] | None

    def down(self, error: str) -> None:
        """A connection died, or an attempt to re-establish it failed, with ``error``."""

    def up(self) -> None:
        """A dead connection is re-established."""


class StoppableDetector(reconnection.DeadConnectionDetector):
    """txpostgres' detector, plus a hook when the connection dies, a report of each failed
    attempt, and a way to stop retrying (:meth:`stop`, when the store stops).

    ``startReconnecting`` is txpostgres' own, re-implemented: it starts a ``RetryingCall`` of
    ``reconnect`` over the reconnection delays and calls ``connectionRecovered`` once one
    succeeds.  Here the call is kept, so that it can be cancelled.
    """

    on_death: Callable[[], None] | None = None
    _retrying: Deferred[Any] | None = None
    stopped: bool = False

    def __init__(
        self,
        health: Health,
        reconnectionIterator: Callable[[], Iterator[float]],
        reactor: IReactorTime,
    ) -> None:
        super().__init__(
            deathChecker=is_death, reconnectionIterator=reconnectionIterator, reactor=reactor
        )
        self.health = health

    def startReconnecting(self, f: Any) -> None:
        if self.stopped:
            return
        self.health.down(f.getErrorMessage())
        if self.on_death is not None:
            self.on_death()
        call = retrying.RetryingCall(self.reconnect)
        call.reactor = self.reactor
        self._retrying = call.start(self.reconnectionIterator())
        self._retrying.addCallback(lambda _: self.connectionRecovered())
        self._retrying.addErrback(lambda f: f.trap(defer.CancelledError))

    def reconnect(self) -> Deferred[Any]:
        d: Deferred[Any] = super().reconnect()
        d.addErrback(self._log_attempt)
        return d

    def _log_attempt(self, f: Any) -> Any:
        self.health.down(f.getErrorMessage())
        return f

    def connectionRecovered(self) -> Any:
        """The connection is usable first, then the outage's end is said: a lookup sent when
        "database reachable again" is logged runs on it."""
        self._retrying = None
        recovered = super().connectionRecovered()
        self.health.up()
        if self.health.on_recovered is not None:
            self.health.on_recovered()
        return recovered

    def stop(self) -> None:
        """Stop any reconnection under way, and never start another."""
        self.stopped = True
        pending, self._retrying = self._retrying, None
        if pending is not None:
            pending.cancel()


def is_death(f: Any) -> bool:
    """txpostgres' test of a dead connection (psycopg2's ``InterfaceError`` and
    ``OperationalError``), less SQLSTATE 26000: psycopg2 raises an EXECUTE of a name the
    server connection does not know as an ``OperationalError``, on a connection alive and
    well (behind a transaction pooler, the store's sign to stop preparing statements)."""
    if getattr(f.value, "pgcode", None) == psycopg2.errorcodes.INVALID_SQL_STATEMENT_NAME:
        return False
    return bool(reconnection.defaultDeathChecker(f))


def server_connection(connection: txpostgres.Connection) -> object | None:
    """The psycopg2 connection under ``connection`` now (None before its first connect): a
    new one after each reconnect, so what was prepared on the old one is gone."""
    raw: object | None = connection.pollable()
    return raw


def is_open(connection: txpostgres.Connection) -> bool:
    """The connection has a psycopg2 connection, not closed (it may still be connecting)."""
    raw = connection.pollable()
    return raw is not None and not raw.closed


def has_connection(connection: txpostgres.Connection) -> bool:
    """``connect`` has made a psycopg2 connection (open or not): ``close`` may be called."""
    return connection.pollable() is not None


class QuietConnection(txpostgres.Connection):
    """txpostgres' connection, whose death while idle (the server restarted, a backend
    terminated) reaches the reactor as the reason it is lost, not as an exception.

    Returned from ``doRead``/``doWrite``, the error makes the reactor disconnect the
    connection exactly as a raised one does (``connectionLost`` with it, so the detector
    reconnects), without the "Unhandled Error" traceback.  Only psycopg2's errors, and the
    reactor's refusal of a socket already closed (``ValueError``/``OSError`` with no
    descriptor left), are taken so; anything else still raises.
    """

    def doRead(self) -> Any:
        return _lost_quietly(self, super().doRead)

    def checkForNotifies(self) -> None:
        """Each NOTIFY psycopg2 has read, to every observer, now and in order.

        An observer must be quick (the store's only puts the session on the next read); its
        Deferred, if it returned one, is not waited for; its exception is logged, and the
        other observers and notifications go on (as in txpostgres' own).
        """
        raw = self.pollable()
        if raw is None or not raw.notifies:
            return
        notifies = list(raw.notifies)
        del raw.notifies[:]
        observers = self.getNotifyObservers()
        for notify in notifies:
            for observer in observers:
                try:
                    observer(notify)
                except Exception:
                    _log.failure("a NOTIFY observer failed on {channel}",
                                 event="notify_observer_failed", channel=notify.channel)

    def doWrite(self) -> Any:
        return _lost_quietly(self, super().doWrite)


def _lost_quietly(connection: txpostgres.Connection, step: Callable[[], None]) -> Any:
    """Run ``doRead``/``doWrite``; the error of a connection that died, returned (the reason
    the reactor loses it with) rather than raised."""
    try:
        step()
    except psycopg2.Error as e:
        return e
    except (ValueError, OSError) as e:
        if not _socket_gone(connection):
            raise
        return e
    return None


def _socket_gone(connection: txpostgres.Connection) -> bool:
    raw = connection.pollable()
    if raw is None or raw.closed:
        return True
    try:
        return bool(raw.fileno() < 0)
    except psycopg2.Error:
        return True
