"""The memory trimmer: every interval while busy, once when the process falls idle."""

from __future__ import annotations

from twisted.internet.task import Clock

from twisted_novnc.operations.memory import TICK, MemoryTrimmer, libc_malloc_trim


def trimmer(interval: float = 60.0) -> tuple[MemoryTrimmer, Clock, list[float], list[int]]:
    clock, trims, open_ = Clock(), [], [0]
    t = MemoryTrimmer(
        interval, lambda: open_[0], clock, trim=lambda: trims.append(clock.seconds()) or 1,
    )
    return t, clock, trims, open_


def test_trims_once_each_time_the_process_falls_idle():
    """Idle from the start: nothing to give back.  Busy, then idle: one trim within a tick;
    staying idle trims no more."""
    t, clock, trims, open_ = trimmer()
    t.startService()
    clock.pump([TICK] * 5)
    assert trims == []
    open_[0] = 3
    clock.advance(TICK)
    open_[0] = 0
    clock.advance(TICK)
    assert trims == [7 * TICK]
    clock.pump([TICK] * 30)
    assert trims == [7 * TICK]
    open_[0] = 1
    clock.advance(TICK)
    open_[0] = 0
    clock.advance(TICK)
    assert len(trims) == 2


def test_trims_every_interval_while_busy():
    t, clock, trims, open_ = trimmer(interval=10)
    open_[0] = 500
    t.startService()
    clock.pump([TICK] * 35)
    assert trims == [10.0, 20.0, 30.0]


def test_counts_each_trim_and_stops_with_the_service():
    t, clock, trims, open_ = trimmer(interval=5)
    counted: list[None] = []
    t.on_trim = lambda: counted.append(None)
    open_[0] = 1
    t.startService()
    clock.pump([TICK] * 6)
    assert len(counted) == len(trims) == 1
    t.stopService()
    assert clock.getDelayedCalls() == []
    clock.pump([TICK] * 20)
    assert len(trims) == 1


def test_zero_interval_never_trims():
    t, clock, trims, open_ = trimmer(0.0)
    open_[0] = 1
    t.startService()
    assert clock.getDelayedCalls() == []
    open_[0] = 0
    clock.pump([TICK] * 100)
    assert trims == []


def test_no_malloc_trim_means_nothing_scheduled():
    """On a C library without malloc_trim (musl, macOS) the service does nothing."""
    clock = Clock()
    t = MemoryTrimmer(60, lambda: 0, clock, trim=None)
    t.startService()
    assert clock.getDelayedCalls() == []
    t.stopService()


def test_glibc_malloc_trim_is_found_and_runs():
    """This machine's libc (glibc, Debian) has malloc_trim; it answers 0 or 1."""
    trim = libc_malloc_trim()
    assert trim is not None
    assert trim() in (0, 1)
