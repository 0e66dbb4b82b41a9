"""The store's query pool: a fixed set of connections, one query on each at a time.

txpostgres' ``ConnectionPool`` hides which connection a query runs on and passes every query
through a ``DeferredSemaphore`` (a Deferred and a callback chain of its own per query, about
35 µs of a lookup: bench/README.md).  A prepared statement exists on one server connection
only, so the store must know which connection it runs on; and a free connection is simply
taken here, with a queue only when every one is busy.
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
    #: Whether a connection can take work now (one being re-established cannot): the most
    #: recently freed one that can is taken, else the most recently freed.
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
        if self._idle:
            return self._on(self._take(), work)
        waiter: Deferred[C] = Deferred()
        self._waiting.append(waiter)
        return waiter.addCallback(self._on, work)

    def _take(self) -> C:
        idle = self._idle
        for i in range(len(idle) - 1, -1, -1):
            if self.usable(idle[i]):
                return idle.pop(i)
        return idle.pop()

    def _on(self, connection: C, work: Callable[[C], Deferred[T]]) -> Deferred[T]:
        try:
            d = work(connection)
        except BaseException:
            d = defer.fail()
        return d.addBoth(self._release, connection)

    def _release(self, result: Any, connection: C) -> Any:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.called:  # a cancelled waiter has been called (with CancelledError)
                waiter.callback(connection)
                return result
        self._idle.append(connection)
        return result
