"""Small helpers every end-to-end test shares: bounded waits, session ids, browser clients."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from twisted_novnc.testing import recording_client_factory

#: Every wait in these tests is on an event; this bounds each one so a bug fails, not hangs.
EVENT_LIMIT = 30.0


def within(d: defer.Deferred, seconds: float = EVENT_LIMIT) -> defer.Deferred:
    """``d``, failed with a TimeoutError if it has not fired in ``seconds``."""
    return d.addTimeout(seconds, reactor)


def until(predicate: Callable[[], bool], interval: float = 0.02) -> defer.Deferred:
    """Fire once ``predicate()`` holds, checking every ``interval``, bounded by EVENT_LIMIT.

    Only for conditions nobody can announce (a process reaped by PID 1, a file another
    process writes, a counter in another object); everything else waits on its Deferred.
    """

    @pytest_twisted.inlineCallbacks
    def poll():
        while not predicate():
            yield task.deferLater(reactor, interval, lambda: None)

    return within(poll())


def new_id() -> str:
    return str(uuid.uuid4())


def connect_client(port: int, path: str, bind: str | None = None) -> defer.Deferred:
    """A recording WebSocket client for ``ws://127.0.0.1:port<path>`` (optionally bound to a
    local address, to come from another loopback IP)."""
    factory = recording_client_factory(f"ws://127.0.0.1:{port}{path}")
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, bindAddress=(bind, 0) if bind else None
    )
    return connectProtocol(endpoint, factory.buildProtocol(None))
