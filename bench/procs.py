"""Processes the bench starts: free ports, waiting for a listener, memory, stopping by PID.

Everything here reads /proc (Linux only) and touches only processes the bench started itself.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_listening(port: int) -> bool:
    """Whether a socket listens on ``port``, read from /proc (a probe connection would be
    served: socat would fork, a ``source`` target would start sending)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(suffix) and fields[3] == "0A":
                        return True
        except (OSError, StopIteration):
            continue
    return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (socat and websockify fork one child per connection)."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory_kb(pids: Iterable[int]) -> dict[str, int]:
    """Summed RSS and PSS (kB) of these processes; PSS shares forked pages fairly."""
    rss = pss = n = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
        except (OSError, ValueError):
            pass
    return {"rss_kb": rss, "pss_kb": pss, "procs": n}


def cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """User plus system CPU seconds each of these processes has used so far (live ones)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            fields = stat[stat.rfind(")") + 2 :].split()
            out[p] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            continue
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU time these processes have used so far (live ones only)."""
    return sum(cpu_by_pid(pids).values())


def machine_busy() -> tuple[int, int]:
    """(busy, total) clock ticks of every core so far, from /proc/stat's first line (idle and
    iowait are the idle part)."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    total = sum(ticks[:8])  # guest time is counted in user already
    return total - idle, total


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of every core's time that was busy between two :func:`machine_busy` looks."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


class CpuSampler:
    """Samples a process tree's CPU per process on a thread (every ``interval`` s), so the
    CPU of a process that exits between two looks is still counted up to its last sample."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> dict[int, float]:
        """Take a sample now; every process seen so far and its CPU seconds at its last look."""
        seen = cpu_by_pid(process_tree(self.root))
        with self._lock:
            self.last.update(seen)
            return dict(self.last)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def stop(
    proc: subprocess.Popen[Any] | None, grace: float = 10.0, sig: int = signal.SIGTERM
) -> None:
    """Stop a process we started and its descendants, each by PID: ``sig``, then SIGKILL."""
    if proc is None:
        return
    pids = process_tree(proc.pid)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()
        if not any(_alive(p) for p in pids):
            break
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class LineReader:
    """Reads a child's stdout lines on a thread, so the bench can wait for one with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None at end of stream or when ``timeout`` seconds pass first."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
