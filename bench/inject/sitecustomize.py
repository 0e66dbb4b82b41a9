"""Instruments twistd for ``bench/run.py --trace-malloc`` / ``--gc-log``; loaded through
PYTHONPATH only then, and does nothing unless its environment variables are set.

``TNOVNC_BENCH_TRACEMALLOC=PREFIX``: start tracemalloc; on each SIGRTMIN+3 run a full collection
and write ``PREFIX-N.txt``, the allocations by source line (the first snapshot whole, later ones
as growth since the first).  The bench signals before the conc clients connect, while they are
held and after they left, so the second file says which lines hold each idle connection's
memory and the third what stays behind.

``TNOVNC_BENCH_MALLOC=FILE`` (the soak's ``--soak-malloc-trim``): on each SIGRTMIN+2 (SIGUSR2 is
the daemon's upgrade) append one JSON line to FILE: RSS, glibc's heap (``mallinfo2``: bytes
from the system, in use, free) and pymalloc's arenas, after a full collection; then
``malloc_trim(0)`` and RSS again.  What the trim gives back was free memory the allocator kept.

``TNOVNC_BENCH_GCLOG=FILE``: append one line per garbage collection that takes 1 ms or more:
``<CLOCK_MONOTONIC ns at its end> gen<N> <ms>``, to line pauses up with the bench's timings.

``TNOVNC_BENCH_LOOKUP_FROM_MEMORY=1`` (``--lookup-from-memory``, an experiment, never a
deployment): the session store reads the first lookup's rows from PostgreSQL, then answers
every later lookup from memory with that row under the asked id (the setup scenario's rows all
name the same target).  What setup does without the database's round trip is what the lookup
costs, and what the rest of the cycle can reach at best.
"""

import contextlib
import ctypes
import gc
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc

_TOP = 80


def _trace_malloc(prefix: str) -> None:
    tracemalloc.start(int(os.environ.get("TNOVNC_BENCH_TRACEMALLOC_FRAMES", "1")))
    snapshots: list[tracemalloc.Snapshot] = []

    def dump(signum: int, frame: object) -> None:
        # Unreachable cycles (a closed connection's protocol, transport and Deferreds) wait
        # for a full collection: collect first, so what remains is really held.
        unreachable = gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        snapshots.append(snapshot)
        if len(snapshots) == 1:
            stats = snapshot.statistics("lineno")
            total = sum(s.size for s in stats)
        else:
            stats = snapshot.compare_to(snapshots[0], "lineno")
            total = sum(s.size_diff for s in stats)
        with open(f"{prefix}-{len(snapshots)}.txt", "w", encoding="utf-8") as f:
            f.write(f"total {total} bytes; gc.collect() found {unreachable} unreachable objects"
                    " first\n")
            for stat in stats[:_TOP]:
                f.write(f"{stat}\n")

    # Not SIGUSR2: the daemon's upgrade signal, whose handler replaces this one.
    signal.signal(signal.SIGRTMIN + 3, dump)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _pymalloc_arenas() -> int | None:
    """pymalloc's arenas now (1 MiB each), from ``sys._debugmallocstats``, which only writes
    to the C stderr: through a temporary file."""
    with tempfile.TemporaryFile("w+") as f:
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        for line in f:
            if line.startswith("# arenas allocated current"):
                return int(line.split("=")[1].replace(",", ""))
    return None


def _malloc(path: str) -> None:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2

    def sample(signum: int, frame: object) -> None:
        gc.collect()
        info = libc.mallinfo2()
        row = {"rss_kb": _rss_kb(), "heap_kb": (info.arena + info.hblkhd) // 1024,
               "heap_used_kb": (info.uordblks + info.hblkhd) // 1024,
               "heap_free_kb": info.fordblks // 1024, "pymalloc_arenas": _pymalloc_arenas()}
        libc.malloc_trim(0)
        row["rss_trimmed_kb"] = _rss_kb()
        with open(path, "a", encoding="ascii") as f:
            f.write(json.dumps(row) + "\n")

    with contextlib.suppress(AttributeError, OSError):  # not glibc: no samples, the bench says so
        libc.mallinfo2  # noqa: B018 - looked up to fail early
        signal.signal(signal.SIGRTMIN + 2, sample)


def _gc_log(path: str) -> None:
    out = open(path, "a", buffering=1, encoding="ascii")  # noqa: SIM115 - for the process
    started = [0]

    def callback(phase: str, info: dict[str, int]) -> None:
        now = time.monotonic_ns()
        if phase == "start":
            started[0] = now
        elif now - started[0] >= 1_000_000:
            out.write(f"{now} gen{info['generation']} {(now - started[0]) / 1e6:.1f}\n")

    gc.callbacks.append(callback)


if os.environ.get("TNOVNC_BENCH_TRACEMALLOC"):
    _trace_malloc(os.environ["TNOVNC_BENCH_TRACEMALLOC"])
if os.environ.get("TNOVNC_BENCH_MALLOC"):
    _malloc(os.environ["TNOVNC_BENCH_MALLOC"])
def _lookup_from_memory() -> None:
    """Patch ``PostgresSessionStore.fetch`` once its module is imported (importing it here
    would import Twisted before twistd has chosen its reactor)."""
    import importlib.abc
    import importlib.util

    name = "twisted_novnc.database.store"

    def patch(module: object) -> None:
        import attrs
        from twisted.internet import defer

        store = module.PostgresSessionStore  # type: ignore[attr-defined]
        real = store.fetch
        template: list[object] = []

        def fetch(self, session_ids):
            ids = list(session_ids)
            if template:
                return defer.succeed({i: attrs.evolve(template[0], session_id=i) for i in ids})

            def keep(rows):
                if rows and not template:
                    template.append(next(iter(rows.values())))
                return rows

            return real(self, ids).addCallback(keep)

        store.fetch = fetch
        sys.stderr.write("bench: lookups after the first are answered from memory\n")

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            loader = spec.loader
            original = loader.exec_module

            def exec_module(module):
                original(module)
                patch(module)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


if os.environ.get("TNOVNC_BENCH_GCLOG"):
    _gc_log(os.environ["TNOVNC_BENCH_GCLOG"])
if os.environ.get("TNOVNC_BENCH_LOOKUP_FROM_MEMORY"):
    _lookup_from_memory()
