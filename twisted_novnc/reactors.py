"""The reactor the service trees need, named by the interfaces it must provide.

A part that needs one thing takes that interface (``IReactorTime`` for a clock,
``IReactorProcess`` to start workers); a part that needs several takes one of the
intersections below.  Like Twisted's own ``_IReactorCommon`` they are types only: no reactor
declares them, so :func:`installed_reactor` checks every interface they extend before it hands
out the global reactor as one.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType
from typing import Any, cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
)


class IConnectingReactor(IReactorTime, IReactorTCP):
    """Connecting to a VM: timers and ``connectTCP`` (a test's fake reactor too)."""


class ISocketReactor(IReactorTime, IReactorFDSet):
    """A connect made on a bare socket: timers and watching the socket for writability."""


class IStoreReactor(IReactorTime, IReactorFDSet):
    """The session store: its timers, and txpostgres' watching of each connection's socket."""


class IClockFromThreads(IReactorTime, IReactorFromThreads):
    """A clock that a signal handler can reach: ``callLater`` and ``callFromThread``."""


class IRunningReactor(IReactorCore, IReactorFromThreads):
    """A reactor to stop, from a signal handler too (the worker's control pipe)."""


class IDaemonReactor(
    IClockFromThreads,
    IRunningReactor,
    IConnectingReactor,
    ISocketReactor,
    IStoreReactor,
    IReactorProcess,
    IReactorTCP,
    IReactorUNIX,
    IReactorSocket,
):
    """Everything the service trees use: timers, shutdown, workers, and listening (or, in a
    worker, adopting) on TCP and UNIX sockets."""


def installed_reactor() -> IDaemonReactor:
    """The global reactor (the default one is installed if none is yet), as the trees use it."""
    from twisted.internet import reactor

    return daemon_reactor(reactor)


def daemon_reactor(reactor: object) -> IDaemonReactor:
    """``reactor`` as an IDaemonReactor, once it is checked to provide every interface that
    one extends; TypeError naming those it does not."""
    missing = [
        interface.getName() for interface in IDaemonReactor.__iro__
        if interface.__module__ != __name__ and not interface.providedBy(reactor)
    ]
    if missing:
        raise TypeError(f"the reactor {reactor!r} does not provide {', '.join(missing)}")
    return cast(IDaemonReactor, reactor)


#: What ``signal.signal`` returns and takes: the handler a service replaces, then restores.
SignalHandler = Callable[[int, FrameType | None], Any] | int | None
