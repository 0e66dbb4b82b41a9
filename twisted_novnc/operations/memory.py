"""Handing the heap's free memory back to the system (glibc's ``malloc_trim``).

A relay's buffers come and go by the thousand; glibc returns freed memory to the system only
from the top of its heap, and keeps the rest for later.  So a process's RSS stays near its
busiest moment's long after: +26 % after 1,000,000 connections through one daemon, all of it
free memory the allocator kept, +3.8 % once trimmed (bench/RESULTS.md, history 22).  This
trims every ``[novnc] memory_trim_interval`` seconds and once each time the process falls
idle (no browser connection), which is when a trim gives back the most and costs nothing
anyone waits for.

``malloc_trim`` is glibc's own public function; elsewhere (musl, macOS) there is none and this
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

#: Seconds between two looks at whether the process is idle.
TICK = 1.0


def libc_malloc_trim() -> Callable[[], int] | None:
    """``malloc_trim(0)`` of the C library this process runs on, or None where it has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


@attrs.define(eq=False)
class MemoryTrimmer(Service):
    """Trims every ``interval`` seconds, and once when the connections fall to none."""

    interval: float
    connections_open: Callable[[], int]
    clock: IReactorTime
    trim: Callable[[], int] | None = attrs.field(factory=libc_malloc_trim)
    #: Told of each trim (the ``twisted_novnc_memory_trims_total`` counter).
    on_trim: Callable[[], None] = lambda: None
    _last: float = 0.0
    _idle_trimmed: bool = True
    _loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.trim is None or self.interval <= 0:
            return
        self._last = self.clock.seconds()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(TICK, now=False)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self.connections_open() == 0:
            if not self._idle_trimmed:
                self._trim(now)
                self._idle_trimmed = True
            return
        self._idle_trimmed = False
        if now - self._last >= self.interval:
            self._trim(now)

    def _trim(self, now: float) -> None:
        assert self.trim is not None
        self._last = now
        self.trim()
        self.on_trim()
