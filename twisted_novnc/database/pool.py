"""The store's query pool: a fixed set of connections, one query on each at a time.

txpostgres' ``ConnectionPool`` hides which connection a query runs on and passes every query
through a ``DeferredSemaphore`` (a Deferred and a callback chain of its own per query, about
35 µs of a lookup: bench/README.md).  A prepared statement exists on one server connection
only, so the store must know which connection it runs on; and a free connection is simply
taken here, with a queue only when every usable one is busy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred

C = TypeVar("C")
T = TypeVar("T")


@attrs.define(eq=False)
class Pool(Generic[C]):
    """Runs each piece of work on a free connection, or once one is free, in order."""

    connections: list[C]
    #: Whether a connection can take work now (one being re-established cannot).  Work goes
    #: to the most recently freed usable connection; while none is free it waits for one, as
    #: long as some connection is usable; when none is (an outage), it takes any free one and
    #: fails at once, for its caller to retry, rather than waiting out the outage.
    usable: Callable[[C], bool] = lambda connection: True
    _idle: list[C] = attrs.field(init=False)
    _waiting: deque[Deferred[C]] = attrs.field(init=False, factory=deque)

    def __attrs_post_init__(self) -> None:
        self._idle = list(self.connections)

    @property
    def queued(self) -> int:
        """Work waiting for a free connection (cancelled waiters included until skipped)."""
        return len(self._waiting)

    def run(self, work: Callable[[C], Deferred[T]]) -> Deferred[T]:
        """``work(connection)`` on a free connection; the connection is free again once its
        Deferred has fired, whatever the outcome."""
        if self._waiting:
            self.wake()  # skips cancelled waiters: none left, and this work need not queue
        connection = self._take() if not self._waiting else None
        if connection is not None:
            return self._on(connection, work)
        waiter: Deferred[C] = Deferred()
        self._waiting.append(waiter)
        return waiter.addCallback(self._on, work)

    def wake(self) -> None:
        """Hand free connections to waiting work: after a release, and when a connection
        has become usable again (work may be waiting for a usable one while it sits idle)."""
        waiting = self._waiting
        while waiting:
            if waiting[0].called:  # a cancelled waiter has been called (with CancelledError)
                waiting.popleft()
                continue
            connection = self._take()
            if connection is None:
                return
            waiting.popleft().callback(connection)

    def _take(self) -> C | None:
        idle = self._idle
        for i in range(len(idle) - 1, -1, -1):
            if self.usable(idle[i]):
                return idle.pop(i)
        if idle and not any(self.usable(c) for c in self.connections):
            return idle.pop()
        return None

    def _on(self, connection: C, work: Callable[[C], Deferred[T]]) -> Deferred[T]:
        try:
            d = work(connection)
        except BaseException:
            d = defer.fail()
        return d.addBoth(self._release, connection)

    def _release(self, result: Any, connection: C) -> Any:
        self._idle.append(connection)
        if self._waiting:
            self.wake()
        return result
