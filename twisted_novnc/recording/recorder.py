"""The recorder: each relay's bytes into its own file (:mod:`.format`), off the relay's path.

The relay only appends to a list in memory (a record's 13-byte head, then the payload, not
copied when it is ``bytes``).  Everything that touches the disk (open, write, close, the
directory's size) runs on one writer thread per process, in the order it was asked for, so
the writes of one file stay in order and the reactor never waits on a disk.  What a recording
holds is handed to that thread once a second (a reactor timer), or at once past
:data:`FLUSH_BYTES`.

A recording stops on its own, never its session: at ``[record] max_bytes`` of payload, when
the disk is slower than the relay (:data:`BACKLOG_LIMIT` bytes not yet written), on a full
disk or any other I/O error; each with one log line and a metric.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from twisted_novnc import __version__
from twisted_novnc.config import ConfigError, RecordSettings
from twisted_novnc.operations.metrics import Metrics
from twisted_novnc.recording.format import (
    DOWN,
    UP,
    Ending,
    Header,
    encode_note,
    file_name,
    new_connection_id,
    record_head,
)

_log = Logger()

T = TypeVar("T")

#: Seconds between two flushes of every recording: what a crash may lose, at most.
FLUSH_INTERVAL = 1.0
#: A recording holding this many bytes not yet handed to the writer flushes at once.
FLUSH_BYTES = 256 * 1024
#: Bytes a recording may hold not yet written (the disk slower than the relay); beyond, it
#: stops (``backlog``), so that its memory stays bounded.
BACKLOG_LIMIT = 8 * 1024 * 1024
#: Seconds between two scans of the directory's size (``[record] max_total_bytes``); between
#: them, this process adds its own writes.
SCAN_INTERVAL = 5.0
#: How long a hand-off (upgrade) waits for the writer to put a recording on disk.
MOVE_FLUSH_TIMEOUT = 10.0
#: Seconds between two log lines about refused recordings (each is counted).
REFUSED_LOG_INTERVAL = 10.0


class Stopped:
    """Why a recording stopped before its relay ended (the ``reason`` label)."""

    MAX_BYTES = "max_bytes"
    BACKLOG = "backlog"
    DISK_FULL = "disk_full"
    IO_ERROR = "io_error"


def stop_reason(error: OSError) -> str:
    """``disk_full`` for a full disk or quota, ``io_error`` for anything else."""
    return Stopped.DISK_FULL if error.errno in (errno.ENOSPC, errno.EDQUOT) else Stopped.IO_ERROR


# --- the directory, checked at start --------------------------------------------------------


def prepare_directory(settings: RecordSettings, source: str) -> None:
    """Create ``[record] dir`` (0700) if missing; refuse one that group or others may use.

    A ConfigError names the key and the path.  A directory this process cannot write to is
    only a warning: each recording then fails on its own (logged, counted), sessions go on.
    """
    path = settings.dir
    if not path:
        return
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path)
    except OSError as e:
        raise ConfigError(source, "record", "dir",
                          f"{path}: cannot create the directory: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(source, "record", "dir", f"{path}: not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(
            source, "record", "dir",
            f"{path}: recordings must not be open to other users (mode {mode:04o});"
            f" run chmod 700 {path}",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        _log.warn("recording directory {path} is not writable: every recording will fail",
                  event="recording_directory_not_writable", path=path)


def directory_size(path: str) -> int:
    """The bytes of the regular files in ``path`` (not below it)."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue  # removed meanwhile
    return total


# --- the writer thread ----------------------------------------------------------------------


class Writer(Protocol):
    """Runs disk jobs one at a time, in order, off the reactor's thread."""

    def start(self) -> None: ...

    def run(self, job: Callable[[], T]) -> Deferred[T]:
        """Run ``job`` after every job asked for before it; its result in the reactor."""

    def run_now(self, job: Callable[[], T], timeout: float) -> T | None:
        """Run ``job`` after the others and wait for it (None if it took over ``timeout``)."""

    def stop(self) -> Deferred[None]:
        """Fires once every job asked for is done."""


@attrs.define(eq=False)
class ThreadWriter:
    """One thread per process (twisted's ThreadPool of one)."""

    reactor: IReactorFromThreads
    _pool: ThreadPool = attrs.field(
        factory=lambda: ThreadPool(1, 1, name="twisted_novnc-recorder")
    )

    def start(self) -> None:
        self._pool.start()

    def run(self, job: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self._pool, job)

    def run_now(self, job: Callable[[], T], timeout: float) -> T | None:
        done = threading.Event()
        result: list[T] = []

        def wrapped() -> None:
            try:
                result.append(job())
            finally:
                done.set()

        self._pool.callInThread(wrapped)
        done.wait(timeout)
        return result[0] if result else None

    def stop(self) -> Deferred[None]:
        d = self.run(lambda: None)

        def stopped(_: object) -> None:
            self._pool.stop()  # nothing queued: the thread ends at once

        return d.addCallback(stopped)


@attrs.define(eq=False)
class InlineWriter:
    """Runs each job at once, on the caller's thread: for tests."""

    def start(self) -> None:
        pass

    def run(self, job: Callable[[], T]) -> Deferred[T]:
        return maybeDeferred(job)

    def run_now(self, job: Callable[[], T], timeout: float) -> T | None:
        return job()

    def stop(self) -> Deferred[None]:
        return succeed(None)


@attrs.define(eq=False)
class FileOps:
    """The system calls the writer makes: the os module's, or a test's that fail on cue."""

    open: Callable[[str, int, int], int] = os.open
    writev: Callable[[int, list[bytes]], int] = os.writev
    close: Callable[[int], None] = os.close


#: Buffers one ``writev`` takes at most (Linux's IOV_MAX).
IOV_MAX = 1024


@attrs.frozen
class Written:
    """What a disk job did: bytes written, and the error that stopped the file (reported
    once, by the job that met it)."""

    written: int = 0
    error: OSError | None = None


@attrs.define(eq=False)
class _Sink:
    """One recording's file, touched only by the writer thread.

    No descriptor is held between two writes: each opens the file to append, writes with
    ``writev`` (the held chunks as they are, not joined) and closes it.  A descriptor per
    recording would make every recorded relay cost three (its two sockets and the file), and
    recording would take from the relays the descriptors the limit was sized for.
    """

    path: str
    ops: FileOps
    failed: bool = False

    def open(self, flags: int, head: bytes) -> Written:
        """Create the file (or, for a moved relay, check it can be appended to)."""
        return self._append([head] if head else [], flags)

    def write(self, chunks: list[bytes]) -> Written:
        if self.failed or not chunks:
            return Written()
        return self._append(chunks, os.O_APPEND)

    def close(self, chunks: list[bytes]) -> Written:
        """The last write (the end record, or what a move leaves here)."""
        return self.write(chunks)

    def _append(self, chunks: list[bytes], flags: int) -> Written:
        try:
            fd = self.ops.open(self.path, flags | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self.failed = True
            return Written(0, e)
        done = 0
        try:
            for start in range(0, len(chunks), IOV_MAX):
                batch = chunks[start:start + IOV_MAX]
                want = sum(map(len, batch))
                n = self.ops.writev(fd, batch)
                done += n
                if n < want:
                    # A short write (a file size limit, a disk filling up): the rest, one
                    # buffer at a time, until it goes or fails.
                    rest = memoryview(b"".join(batch))[n:]
                    while rest:
                        n = self.ops.writev(fd, [rest])  # type: ignore[list-item]
                        if n == 0:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        done += n
                        rest = rest[n:]
        except OSError as e:
            self.failed = True
            with contextlib.suppress(OSError):
                self.ops.close(fd)
            return Written(done, e)
        try:
            # (Where writes are deferred, NFS say, this is where their error shows.)
            self.ops.close(fd)
        except OSError as e:
            self.failed = True
            return Written(done, e)
        return Written(done)


# --- one relay's recording ------------------------------------------------------------------


@attrs.define(eq=False)
class Recording:
    """What one relay's browser saw (and sent), on its way to the file.

    Called by the relay (:meth:`down`, :meth:`up`) on the reactor's thread; costs a list
    append per chunk.
    """

    recorder: Recorder
    header: Header
    path: str
    _sink: _Sink
    #: Payload bytes of ``D`` and ``U`` records taken, this process and those before it.
    recorded: int = 0
    #: Why it stopped early, if it did.
    stopped: str | None = None
    #: An I/O error stopped it: nothing more is written, not even the end.
    failed: bool = False
    #: The file is closed here (ended, moved, or the process stopping).
    closed: bool = False
    _chunks: list[bytes] = attrs.field(factory=list)
    _held: int = 0
    _in_flight: int = 0

    def down(self, data: bytes) -> None:
        """Bytes the browser is being sent."""
        self._add(DOWN, data)

    def up(self, data: bytes) -> None:
        """Bytes the browser sent (recorded with ``input = on`` only)."""
        if self.header.input:
            self._add(UP, data)

    def _add(self, kind: bytes, data: bytes) -> None:
        if self.stopped is not None:
            return
        n = len(data)
        if self._held + self._in_flight + n > BACKLOG_LIMIT:
            self._stop(Stopped.BACKLOG)
            return
        room = self.recorder.settings.max_bytes - self.recorded
        if n > room:
            data, n = data[:room], room
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray the caller reuses (the fast path's frames)
        if n:
            self._chunks.append(record_head(kind, self._ms(), n))
            self._chunks.append(data)
            self._held += n + 13
            self.recorded += n
        if self.recorded >= self.recorder.settings.max_bytes:
            self._stop(Stopped.MAX_BYTES)
        elif self._held >= FLUSH_BYTES:
            self.flush()

    def _ms(self) -> int:
        return max(0, int((self.recorder.clock.seconds() - self.header.started_at) * 1000))

    def _note(self, note: dict[str, Any]) -> None:
        record = encode_note(self._ms(), note)
        self._chunks.append(record)
        self._held += len(record)

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        self._note({"stopped": reason})
        self.flush()
        self.recorder.stopped(self, reason)

    def open(self, flags: int, head: bytes) -> None:
        job = self._sink.open
        self._in_flight += len(head)
        self.recorder.writer.run(lambda: job(flags, head)).addCallback(self._written, len(head))

    def flush(self) -> None:
        """Hand what is held to the writer."""
        if self.failed or self.closed or not self._chunks:
            return
        chunks, size = self._chunks, self._held
        self._chunks, self._held = [], 0
        self._in_flight += size
        write = self._sink.write
        self.recorder.writer.run(lambda: write(chunks)).addCallback(self._written, size)

    def _written(self, result: Written, size: int) -> None:
        self._in_flight -= size
        self.recorder.wrote(result.written)
        if result.error is not None and not self.failed:
            self.failed = True
            self._chunks, self._held = [], 0
            reason = stop_reason(result.error)
            already = self.stopped is not None
            self.stopped = reason
            self.recorder.stopped(self, reason, result.error, already)

    def _closing_here(self) -> bool:
        """This process stops writing it (the relay ended, moved or was given back): whether
        there is a file left to finish (not closed here already, not stopped by an I/O error)."""
        if self.closed:
            return False
        self.closed = True
        self.recorder.forget(self)
        return not self.failed

    def finish(self, outcome: str, up_bytes: int, down_bytes: int) -> None:
        """The relay ended: the end record, then the file is closed."""
        if not self._closing_here():
            return
        ending = Ending(
            self.recorder.clock.seconds(), outcome, up_bytes, down_bytes, self.recorded,
            self.stopped,
        )
        self._chunks.append(ending.encode(self._ms()))
        self._close_file()

    def _close_file(self) -> None:
        chunks, size = self._chunks, self._held
        self._chunks, self._held = [], 0
        self._in_flight += size
        close = self._sink.close
        self.recorder.writer.run(lambda: close(chunks)).addCallback(self._written, size)

    def moved(self) -> dict[str, Any] | None:
        """The relay goes on in another process: what is held is written now (the reactor
        waits: hand-offs are rare), a note says so, the file is closed without an end.  The
        state the new process appends with, or None when it should not."""
        if not self._closing_here():
            return None
        self._note({"moved": os.getpid()})
        chunks, self._chunks, self._held = self._chunks, [], 0
        close = self._sink.close
        result = self.recorder.writer.run_now(lambda: close(chunks), MOVE_FLUSH_TIMEOUT)
        if result is None:
            _log.warn("recording {path} of {session_id} was not written within {timeout:g}s"
                      " of the hand-off: the new process does not go on with it",
                      event="recording_move_slow", path=self.path,
                      session_id=self.header.session_id, timeout=MOVE_FLUSH_TIMEOUT)
            return None
        self._written(result, 0)
        # (Every earlier job is done: the sink says whether one of them failed.)
        if self.failed or self._sink.failed:
            return None
        return {
            "path": self.path,
            "header": attrs.asdict(self.header),
            "recorded": self.recorded,
            "stopped": self.stopped,
        }

    def let_go(self) -> None:
        """This process gives the relay back (a failed take-over): what is held is written
        now, and the file closed without an end or a note; the other process goes on."""
        if not self._closing_here():
            return
        chunks, self._chunks, self._held = self._chunks, [], 0
        close = self._sink.close
        self.recorder.writer.run_now(lambda: close(chunks), MOVE_FLUSH_TIMEOUT)

    def abandon(self) -> None:
        """The process stops with the relay still open: what is held is written, the file
        closed without an end (read as a cut recording)."""
        if self.closed:
            return
        self.closed = True
        if not self.failed:
            self._close_file()


# --- the process's recorder -----------------------------------------------------------------


@attrs.define(eq=False)
class Recorder:
    """Every recording of one process: their files, the flush timer, the limits, the counts."""

    settings: RecordSettings
    clock: IReactorTime
    writer: Writer
    metrics: Metrics = attrs.field(factory=Metrics)
    ops: FileOps = attrs.field(factory=FileOps)
    version: str = __version__
    new_id: Callable[[], str] = new_connection_id
    #: The directory's bytes as last scanned, plus this process's writes since.
    total: int = 0
    _live: set[Recording] = attrs.field(factory=set)
    _scanned_at: float | None = None
    _scanning: bool = False
    _timer: LoopingCall | None = None
    _refused_logged_at: float | None = None
    _refused_since_log: int = 0
    _started: bool = False

    def start(self) -> None:
        self._started = True
        self.writer.start()
        self._timer = LoopingCall(self.tick)
        self._timer.clock = self.clock
        self._timer.start(FLUSH_INTERVAL, now=False)
        if self.settings.max_total_bytes:
            self._scan()

    def tick(self) -> None:
        """Once a second: every recording's bytes to the writer; the directory's size, every
        :data:`SCAN_INTERVAL`."""
        for recording in list(self._live):
            recording.flush()
        if self.settings.max_total_bytes and not self._scanning and (
            self._scanned_at is None or self.clock.seconds() - self._scanned_at >= SCAN_INTERVAL
        ):
            self._scan()

    def _scan(self) -> None:
        self._scanning = True
        directory = self.settings.dir

        def scanned(size: int | None) -> None:
            self._scanning = False
            self._scanned_at = self.clock.seconds()
            if size is not None:
                self.total = size

        def scan() -> int | None:
            try:
                return directory_size(directory)
            except OSError:
                return None

        self.writer.run(scan).addCallback(scanned)

    def begin(self, session_id: str, client: str, record: bool | None) -> Recording | None:
        """A new relay's recording, or None: not this session's (``mode = column``), or the
        directory is full (``max_total_bytes``)."""
        settings = self.settings
        if settings.mode == "column" and record is not True:
            return None
        if settings.max_total_bytes and self.total >= settings.max_total_bytes:
            self.metrics.recordings.labels("refused").inc()
            self._log_refused(session_id)
            return None
        started = self.clock.seconds()
        connection_id = self.new_id()
        header = Header(session_id, connection_id, client, started, settings.input, self.version)
        path = os.path.join(settings.dir, file_name(session_id, started, connection_id))
        recording = Recording(self, header, path, _Sink(path, self.ops))
        self._live.add(recording)
        recording.open(os.O_CREAT | os.O_EXCL, header.encode())
        self.metrics.recordings.labels("started").inc()
        return recording

    def resume(self, state: dict[str, Any]) -> Recording | None:
        """A moved relay's recording, appended to where the old process left it."""
        try:
            header = Header(**state["header"])
            path, recorded, stopped = state["path"], int(state["recorded"]), state["stopped"]
        except (KeyError, TypeError, ValueError):
            return None
        recording = Recording(self, header, path, _Sink(path, self.ops), recorded, stopped)
        self._live.add(recording)
        recording.open(os.O_APPEND, b"")
        self.metrics.recordings.labels("resumed").inc()
        return recording

    def _log_refused(self, session_id: str) -> None:
        self._refused_since_log += 1
        now = self.clock.seconds()
        last = self._refused_logged_at
        if last is not None and now - last < REFUSED_LOG_INTERVAL:
            return
        self._refused_logged_at = now
        _log.warn(
            "not recording {session_id}: the recording directory holds {total} bytes,"
            " [record] max_total_bytes is {limit} ({refused} refused since the last line)",
            event="recording_refused", session_id=session_id, total=self.total,
            limit=self.settings.max_total_bytes, refused=self._refused_since_log,
        )
        self._refused_since_log = 0

    def wrote(self, written: int) -> None:
        if written:
            self.total += written
            self.metrics.recorded_bytes.inc(written)

    def stopped(
        self, recording: Recording, reason: str, error: OSError | None = None,
        already: bool = False,
    ) -> None:
        """One line and a count per recording that stops early (an I/O error after a stop
        for another reason is told too: the file is cut there)."""
        self.metrics.recordings_stopped.labels(reason).inc()
        _log.warn(
            "recording of {session_id} stopped ({reason}{detail}): {path}; the session goes on",
            event="recording_stopped", session_id=recording.header.session_id,
            path=recording.path, reason=reason,
            detail=f": {error.strerror or error}" if error is not None else "",
        )

    def forget(self, recording: Recording) -> None:
        self._live.discard(recording)

    def stop(self) -> Deferred[None]:
        """Every end record written and file closed (relays still open are cut here)."""
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        for recording in list(self._live):
            recording.abandon()
        self._live.clear()
        if not self._started:
            return succeed(None)
        self._started = False
        return self.writer.stop()


@attrs.define(eq=False)
class RecorderService(Service):
    """Starts the recorder with the process; stops it once the relays are gone (``after``:
    the drain), so that the process exits only with every end record written."""

    recorder: Recorder
    after: Callable[[], Deferred[None]] = lambda: succeed(None)

    def startService(self) -> None:
        Service.startService(self)
        self.recorder.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.after().addBoth(lambda _: self.recorder.stop())
