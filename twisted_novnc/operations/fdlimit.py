"""The per-process descriptor limit (RLIMIT_NOFILE): raised at start-up, watched at accept.

Each relay holds two descriptors (the browser's socket and the VM's), so the soft limit, not
the proxy, is often what caps the number of connections.  At start-up the soft limit is raised
to the hard limit, and the log says how many relays that leaves room for.  At run time, when
``accept()`` fails for lack of a descriptor, Twisted's own recovery would accept and at once
close every waiting client, and with no spare descriptor it would spin on the still-readable
listening socket; instead the listener stops accepting for a moment (clients wait in the
kernel's backlog, or another worker takes them), the log says plainly that the descriptor
limit is refusing connections, and a metric counts it.
"""

from __future__ import annotations

import errno
import resource
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()

#: Descriptors a process needs besides its relays: stdio, the reactor's own, Twisted's spare
#: EMFILE descriptor, the log file, listening sockets, the pipes to a supervisor, a margin.
BASE_RESERVE = 32

#: How long a listener stops accepting after accept() found no free descriptor.
PAUSE_SECONDS = 0.25

#: At most one "descriptor limit reached" line per this many seconds (per listener).
LOG_INTERVAL = 10.0


@attrs.frozen
class DescriptorLimit:
    """RLIMIT_NOFILE as start-up left it: the soft limit before and after, and the hard one."""

    before: int
    soft: int
    hard: int

    @property
    def raised(self) -> bool:
        return self.soft > self.before


def _finite(value: int) -> int:
    # RLIM_INFINITY is -1 in Python; Linux never allows it for RLIMIT_NOFILE, other systems may.
    return 1 << 31 if value == resource.RLIM_INFINITY else value


def raise_descriptor_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> DescriptorLimit:
    """Raise the soft descriptor limit to the hard one and log what it was and is.

    Nothing is changed when they are already equal (so a sandbox that forbids setrlimit, like
    systemd's ``SystemCallFilter=~@resources`` with ``LimitNOFILE=``, is never asked).
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard != resource.RLIM_INFINITY and soft > hard):
        _log.info("descriptor limit (RLIMIT_NOFILE): {soft} (the hard limit)",
                  event="descriptor_limit", soft=soft)
        return DescriptorLimit(soft, soft, hard)
    try:
        setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        _log.warn(
            "descriptor limit (RLIMIT_NOFILE): cannot raise the soft limit {soft} to the hard"
            " limit {hard}: {error}", event="descriptor_limit", soft=soft, hard=hard, error=e,
        )
        return DescriptorLimit(soft, soft, hard)
    _log.info(
        "descriptor limit (RLIMIT_NOFILE): soft limit raised from {before} to {soft} (the hard"
        " limit)", event="descriptor_limit", before=soft, soft=hard,
    )
    return DescriptorLimit(soft, hard, hard)


def relay_capacity(limit: int, reserve: int) -> int:
    """About how many relays (two descriptors each) fit under ``limit`` descriptors."""
    return max(0, (_finite(limit) - reserve) // 2)


def check_capacity(limit: DescriptorLimit, max_connections: int, reserve: int) -> int:
    """Log how many relays the limit leaves room for; warn when that is below max_connections."""
    capacity = relay_capacity(limit.soft, reserve)
    if capacity < max_connections:
        _log.warn(
            "the descriptor limit ({limit}) caps this process at about {capacity} relays (two"
            " descriptors each), below [novnc] max_connections = {max_connections}: beyond that"
            " the limit, not the proxy, refuses connections.  Raise the hard limit (ulimit -Hn,"
            " LimitNOFILE= in the systemd unit) or run more [novnc] workers.",
            event="descriptor_capacity",
            limit=limit.soft, capacity=capacity, max_connections=max_connections,
        )
    else:
        _log.info(
            "descriptor limit {limit}: room for about {capacity} relays",
            event="descriptor_capacity", limit=limit.soft,
            capacity=capacity,
        )
    return capacity


def current_soft_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Accepting(Protocol):
    def accept(self) -> tuple[Any, Any]: ...


@runtime_checkable
class AcceptingPort(Protocol):
    """What the guard needs of a listening port (Twisted's ``tcp.Port``, ``unix.Port``): the
    socket it accepts from, and reading that can be stopped and started again."""

    socket: _Accepting | None

    def stopReading(self) -> None: ...

    def startReading(self) -> None: ...


class _WatchedSocket:
    """Stands in for a listening port's socket; only ``accept`` is different."""

    def __init__(self, sock: _Accepting, guard: AcceptGuard) -> None:
        self._socket = sock
        self._guard = guard

    def accept(self) -> tuple[Any, Any]:
        try:
            accepted = self._socket.accept()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._guard.exhausted(e.errno)
            # What Twisted's accept loop reads as "nobody else is waiting": it returns, without
            # its own EMFILE recovery (which would accept and close every waiting client).
            raise BlockingIOError(errno.EAGAIN, "accepting paused: no free descriptor") from None
        self._guard.accepted()
        return accepted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


@attrs.define(eq=False)
class AcceptGuard:
    """Pauses one listening port while the process has no descriptor left, and says why."""

    port: AcceptingPort
    clock: IReactorTime
    on_exhausted: Callable[[], None] = lambda: None
    soft_limit: Callable[[], int] = current_soft_limit
    pause: float = PAUSE_SECONDS
    log_interval: float = LOG_INTERVAL
    hits: int = 0
    _unlogged: int = 0
    _logged_at: float | None = None
    _resume: IDelayedCall | None = None
    _paused_since: float | None = None

    def install(self) -> None:
        if self.port.socket is not None:
            self.port.socket = _WatchedSocket(self.port.socket, self)

    def exhausted(self, code: int) -> None:
        """accept() found no free descriptor: count it, say so (now and then), stop a moment."""
        self.hits += 1
        self._unlogged += 1
        self.on_exhausted()
        now = self.clock.seconds()
        if self._paused_since is None:
            self._paused_since = now
        if self._logged_at is None or now - self._logged_at >= self.log_interval:
            self._say(code, now)
        self.port.stopReading()
        if self._resume is None or not self._resume.active():
            self._resume = self.clock.callLater(self.pause, self._start_again)

    def _say(self, code: int, now: float) -> None:
        if code == errno.ENFILE:
            what = "the system-wide open file limit (fs.file-max)"
        else:
            what = f"this process's descriptor limit (RLIMIT_NOFILE = {self.soft_limit()})"
        _log.warn(
            "{what} is refusing new connections, not the proxy: accept() failed with {error}"
            " {times} time(s) since the last report; accepting pauses for {pause:g}s at a time"
            " until descriptors are free.  Raise the limit (LimitNOFILE=, ulimit -n) or run"
            " more [novnc] workers.", event="descriptors_exhausted",
            what=what, error=errno.errorcode[code], times=self._unlogged, pause=self.pause,
        )
        self._unlogged = 0
        self._logged_at = now

    def _start_again(self) -> None:
        self._resume = None
        if getattr(self.port, "connected", False) and not getattr(self.port, "disconnecting", 0):
            self.port.startReading()

    def accepted(self) -> None:
        if self._paused_since is None:
            return
        _log.info(
            "descriptors are free again: accepting connections ({seconds:.1f}s after the"
            " descriptor limit was reached)",
            event="descriptors_free", seconds=self.clock.seconds() - self._paused_since,
        )
        self._paused_since = None

    def stop(self) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None


def guard_accepts(
    port: object, clock: IReactorTime, on_exhausted: Callable[[], None]
) -> AcceptGuard | None:
    """Watch a listening port's accepts for descriptor exhaustion (any port with a socket)."""
    if not isinstance(port, AcceptingPort) or port.socket is None:
        return None
    guard = AcceptGuard(port, clock, on_exhausted)
    guard.install()
    return guard
