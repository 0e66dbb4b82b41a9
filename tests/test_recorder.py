"""The recorder (twisted_novnc.recording.recorder) on a Clock with a writer that runs each
disk job at once, and the relay's hooks into it."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twisted_novnc.config import ConfigError, RecordSettings
from twisted_novnc.operations.metrics import Metrics
from twisted_novnc.recording import recorder as rec
from twisted_novnc.recording.format import DOWN, NOTE, UP, decode_json, iter_records, read_header
from twisted_novnc.recording.format import read_info as read_file_info
from twisted_novnc.recording.recorder import (
    BACKLOG_LIMIT,
    FLUSH_BYTES,
    FileOps,
    InlineWriter,
    Recorder,
    RecorderService,
    Recording,
    ThreadWriter,
    prepare_directory,
)
from twisted_novnc.relay.handoff import MovedRelay
from twisted_novnc.relay.relay import Relay
from twisted_novnc.testing import MemoryPeer
from twisted_novnc.vnc.browser_greeting import BrowserGreeting

START = 1767225600.0


def make(
    tmp_path: Path, ops: FileOps | None = None, **settings: object
) -> tuple[Recorder, Clock, Metrics]:
    clock = Clock()
    clock.advance(START)
    metrics = Metrics()
    record = RecordSettings(dir=str(tmp_path), **settings)  # type: ignore[arg-type]
    recorder = Recorder(record, clock, InlineWriter(), metrics, ops or FileOps(), "test")
    recorder.start()
    return recorder, clock, metrics


def records(path: str) -> list[tuple[bytes, int, bytes]]:
    with open(path, "rb") as f:
        read_header(f)
        return [(r.kind, r.ms, r.payload) for r in iter_records(f)]


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def begin(recorder: Recorder) -> Recording:
    recording = recorder.begin("s1", "192.0.2.7", None)
    assert recording is not None
    return recording


def test_a_recording_is_written_once_a_second_and_ends_with_its_end_record(
    tmp_path: Path,
) -> None:
    """Bytes wait in memory until the next tick, then reach the file; the end record closes
    it with the outcome and the counts."""
    recorder, clock, metrics = make(tmp_path)
    recording = begin(recorder)
    assert stat.S_IMODE(os.stat(recording.path).st_mode) == 0o600
    assert os.path.dirname(recording.path) == str(tmp_path)
    clock.advance(0.25)
    recording.down(b"hello")
    assert records(recording.path) == []
    clock.advance(0.75)
    assert records(recording.path) == [(DOWN, 250, b"hello")]
    recording.down(b"more")
    recording.finish("1000", 3, 9)
    info = read_file_info(recording.path)
    assert info.ending is not None
    assert (info.ending.outcome, info.ending.up_bytes, info.ending.down_bytes) == ("1000", 3, 9)
    assert info.recorded_bytes == 9 and info.ending.stopped is None
    assert info.header.client == "192.0.2.7" and info.header.version == "test"
    assert counter(metrics, "twisted_novnc_recordings_total", result="started") == 1
    assert counter(metrics, "twisted_novnc_recorded_bytes_total") == info.size


def test_a_big_chunk_is_written_before_the_tick(tmp_path: Path) -> None:
    """Past FLUSH_BYTES held, the recording goes to the writer at once."""
    recorder, clock, _ = make(tmp_path)
    recording = begin(recorder)
    recording.down(b"x" * (FLUSH_BYTES - 20))
    assert records(recording.path) == []
    recording.down(b"y" * 10)
    assert [len(p) for _, _, p in records(recording.path)] == [FLUSH_BYTES - 20, 10]


def test_input_off_records_no_browser_bytes(tmp_path: Path) -> None:
    """With input = off (the default) what the browser sends is not recorded."""
    recorder, clock, _ = make(tmp_path)
    recording = begin(recorder)
    recording.up(b"secret keystrokes")
    recording.down(b"screen")
    recording.finish("1000", 17, 6)
    assert [k for k, _, _ in records(recording.path)] == [DOWN, b"E"]


def test_max_bytes_stops_at_the_limit_with_a_note(tmp_path: Path) -> None:
    """At max_bytes of payload the recording stops exactly there, says so in a note, and
    still gets its end record; the metric and a log line count it."""
    recorder, clock, metrics = make(tmp_path, max_bytes=10, input=True)
    recording = begin(recorder)
    logged: list[dict[str, object]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        recording.down(b"123456")
        recording.up(b"abcdef")
        recording.down(b"ignored")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    recording.finish("1000", 6, 13)
    got = records(recording.path)
    assert got[:2] == [(DOWN, 0, b"123456"), (UP, 0, b"abcd")]
    assert got[2][0] == NOTE and got[2][2] == b'{"stopped": "max_bytes"}'
    info = read_file_info(recording.path)
    assert info.ending is not None and info.ending.stopped == "max_bytes"
    assert info.recorded_bytes == 10
    assert counter(metrics, "twisted_novnc_recordings_stopped_total", reason="max_bytes") == 1
    lines = [e for e in logged if e.get("event") == "recording_stopped"]
    assert len(lines) == 1 and lines[0]["reason"] == "max_bytes"
    assert lines[0]["session_id"] == "s1" and lines[0]["path"] == recording.path


class SlowWriter(InlineWriter):
    """Holds every job until told: a disk slower than the relay."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], object], Deferred[object]]] = []

    def run(self, job: Callable[[], object]) -> Deferred[object]:  # type: ignore[override]
        d: Deferred[object] = Deferred()
        self.jobs.append((job, d))
        return d

    def run_all(self) -> None:
        while self.jobs:
            job, d = self.jobs.pop(0)
            d.callback(job())


def test_a_disk_slower_than_the_relay_stops_the_recording(tmp_path: Path) -> None:
    """Past BACKLOG_LIMIT bytes not yet written the recording stops (backlog): its memory
    stays bounded, the end record still comes."""
    clock = Clock()
    metrics = Metrics()
    writer = SlowWriter()
    recorder = Recorder(RecordSettings(dir=str(tmp_path)), clock, writer, metrics)
    recorder.start()
    recording = begin(recorder)
    chunk = b"z" * (FLUSH_BYTES)
    for _ in range(BACKLOG_LIMIT // FLUSH_BYTES + 2):
        recording.down(chunk)
    assert recording.stopped == "backlog"
    recording.down(chunk)
    writer.run_all()
    recording.finish("1000", 0, 0)
    writer.run_all()
    info = read_file_info(recording.path)
    assert info.ending is not None and info.ending.stopped == "backlog"
    assert info.recorded_bytes <= BACKLOG_LIMIT
    assert counter(metrics, "twisted_novnc_recordings_stopped_total", reason="backlog") == 1


def failing_write(error: int, after: int = 0) -> FileOps:
    """os calls whose writes fail with ``error`` once ``after`` bytes are written."""
    written = [0]

    def writev(fd: int, buffers: list[bytes]) -> int:
        size = sum(map(len, buffers))
        if written[0] + size > after:
            raise OSError(error, os.strerror(error))
        written[0] += size
        return os.writev(fd, buffers)

    return FileOps(writev=writev)


def test_no_descriptor_is_held_between_writes(tmp_path: Path) -> None:
    """A recording holds no descriptor of its own between two writes (each opens, appends,
    closes): recorded relays cost the two sockets they always did, whatever their number."""
    recorder, clock, _ = make(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    recordings = [begin(recorder) for _ in range(20)]
    for recording in recordings:
        recording.down(b"frame")
    clock.advance(1)
    assert len(os.listdir("/proc/self/fd")) == before
    for recording in recordings:
        recording.finish("1000", 0, 5)
    assert all(read_file_info(r.path).complete for r in recordings)


def test_a_short_write_goes_on_until_everything_is_written(tmp_path: Path) -> None:
    """writev may write less than it was given (a size limit, a disk filling): the rest
    follows, in order."""

    def writev(fd: int, buffers: list[bytes]) -> int:
        data = b"".join(bytes(b) for b in buffers)
        return os.write(fd, data[: max(1, len(data) // 3)])

    recorder, clock, _ = make(tmp_path, ops=FileOps(writev=writev))
    recording = begin(recorder)
    recording.down(b"x" * 1000)
    recording.down(b"y" * 10)
    recording.finish("1000", 0, 1010)
    info = read_file_info(recording.path)
    assert info.complete and info.recorded_bytes == 1010 and not recording.failed


@pytest.mark.parametrize(
    ("error", "reason"),
    [(errno.ENOSPC, "disk_full"), (errno.EROFS, "io_error"), (errno.EACCES, "io_error")],
)
def test_an_io_error_stops_the_recording_and_leaves_the_file(
    tmp_path: Path, error: int, reason: str
) -> None:
    """A write that fails stops that recording (one line, one count); the file stays as it
    was written, with no end record; later bytes and the end are dropped quietly."""
    recorder, clock, metrics = make(tmp_path, ops=failing_write(error, after=200))
    recording = begin(recorder)
    size = os.path.getsize(recording.path)
    recording.down(b"a" * 500)
    clock.advance(1)
    assert recording.stopped == reason and recording.failed
    recording.down(b"b" * 10)
    clock.advance(1)
    recording.finish("1000", 0, 510)
    assert os.path.getsize(recording.path) == size
    assert read_file_info(recording.path).ending is None
    assert counter(metrics, "twisted_novnc_recordings_stopped_total", reason=reason) == 1


def test_a_file_that_cannot_be_created_stops_the_recording(tmp_path: Path) -> None:
    """The open failing (a read-only directory) is an I/O error of that recording only."""

    def refuse(path: str, flags: int, mode: int) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    recorder, clock, metrics = make(tmp_path, ops=FileOps(open=refuse))
    recording = begin(recorder)
    assert recording.failed and recording.stopped == "io_error"
    recording.down(b"x")
    recording.finish("1000", 0, 1)
    assert os.listdir(tmp_path) == []
    assert counter(metrics, "twisted_novnc_recordings_stopped_total", reason="io_error") == 1


def test_mode_column_records_only_rows_that_say_so(tmp_path: Path) -> None:
    """With mode = column only a row whose column is true is recorded (NULL is not)."""
    recorder, _, _ = make(tmp_path, mode="column", record_column="rec")
    assert recorder.begin("s1", "c", None) is None
    assert recorder.begin("s1", "c", False) is None
    assert recorder.begin("s1", "c", True) is not None


def test_a_full_directory_refuses_new_recordings(tmp_path: Path) -> None:
    """At max_total_bytes (the last scan plus this process's writes) new recordings are
    refused and counted; the scan runs at most every SCAN_INTERVAL seconds."""
    (tmp_path / "old.tnrec").write_bytes(b"x" * 1000)
    recorder, clock, metrics = make(tmp_path, max_total_bytes=1000)
    assert recorder.total == 1000
    assert recorder.begin("s1", "c", None) is None
    assert counter(metrics, "twisted_novnc_recordings_total", result="refused") == 1
    (tmp_path / "old.tnrec").unlink()
    clock.advance(1)
    assert recorder.begin("s2", "c", None) is None  # not scanned again yet
    clock.advance(rec.SCAN_INTERVAL)
    assert recorder.total == 0
    recording = recorder.begin("s3", "c", None)
    assert recording is not None
    recording.down(b"y" * 2000)
    clock.advance(1)
    assert recorder.total >= 2000
    assert recorder.begin("s4", "c", None) is None


def test_a_moved_recording_goes_on_in_the_same_file(tmp_path: Path) -> None:
    """Handed off: what is held is written with a note, the file closed without an end; the
    new process appends to it and ends it."""
    old, clock, _ = make(tmp_path)
    recording = begin(old)
    recording.down(b"before")
    state = recording.moved()
    assert state is not None and state["recorded"] == 6
    assert [k for k, _, _ in records(recording.path)] == [DOWN, NOTE]
    new, clock2, metrics = make(tmp_path)
    clock2.advance(2)
    resumed = new.resume(state)
    assert resumed is not None and resumed.path == recording.path
    resumed.down(b"after")
    resumed.finish("1000", 0, 11)
    got = records(recording.path)
    assert [(k, p) for k, _, p in got if k == DOWN] == [(DOWN, b"before"), (DOWN, b"after")]
    assert got[2][1] == 2000
    assert decode_json(next(r for r in iter_records_of(recording.path) if r.kind == NOTE))[
        "moved"
    ] == os.getpid()
    info = read_file_info(recording.path)
    assert info.ending is not None and info.recorded_bytes == 11
    assert counter(metrics, "twisted_novnc_recordings_total", result="resumed") == 1


def iter_records_of(path: str) -> list:  # type: ignore[type-arg]
    with open(path, "rb") as f:
        read_header(f)
        return list(iter_records(f))


def test_stopping_waits_for_the_drain_then_cuts_what_is_left(tmp_path: Path) -> None:
    """The recorder's service stops after the drain; a relay still open then is written as
    far as it went, without an end (a cut recording)."""
    recorder, clock, _ = make(tmp_path)
    recording = begin(recorder)
    recording.down(b"abc")
    drained: Deferred[None] = Deferred()
    service = RecorderService(recorder, lambda: drained)
    service.running = True
    stopped = service.stopService()
    assert not stopped.called
    drained.callback(None)
    assert stopped.called
    assert records(recording.path) == [(DOWN, 0, b"abc")]
    assert read_file_info(recording.path).ending is None


# -- the directory at start -------------------------------------------------------------------


def test_the_directory_is_created_private(tmp_path: Path) -> None:
    """A missing directory is created 0700."""
    path = tmp_path / "rec" / "dings"
    prepare_directory(RecordSettings(dir=str(path)), "x.ini")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o750, 0o701, 0o770, 0o777])
def test_a_directory_open_to_others_refuses_start(tmp_path: Path, mode: int) -> None:
    """Any permission for group or others: a ConfigError naming the key and the path."""
    path = tmp_path / "rec"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        prepare_directory(RecordSettings(dir=str(path)), "x.ini")
    assert (info.value.section, info.value.key) == ("record", "dir")
    assert str(path) in str(info.value) and "chmod 700" in str(info.value)


def test_no_directory_no_check(tmp_path: Path) -> None:
    """dir empty: recording is off, nothing is created or checked."""
    prepare_directory(RecordSettings(), "x.ini")


# -- the relay's hooks ------------------------------------------------------------------------


def relay_with(tmp_path: Path, greeting: bool, **settings: object) -> tuple[Relay, Recording,
                                                                             MemoryPeer, Clock]:
    recorder, clock, _ = make(tmp_path, **settings)
    browser, vm = MemoryPeer(), MemoryPeer()
    relay = Relay("s1", browser=browser, vm=vm,
                  greeting=BrowserGreeting() if greeting else None)
    relay.recording = begin(recorder)
    relay.start()
    return relay, relay.recording, browser, clock


def test_the_relay_records_exactly_what_the_browser_received(tmp_path: Path) -> None:
    """D payloads, concatenated, are the browser's bytes: the proxy's own RFB opening
    included; with input off no U record."""
    relay, recording, browser, clock = relay_with(tmp_path, greeting=True)
    relay.from_vm(b"early VM bytes")  # held until the greeting is over
    relay.from_browser(bytearray(b"RFB 003.008\n"))
    relay.from_browser(bytearray(b"\x01"))
    relay.from_browser(bytearray(b"\x01"))  # ClientInit: to the VM
    relay.from_vm(b"ServerInit...")
    recording.finish("1000", relay.up_bytes, relay.down_bytes)
    got = records(recording.path)
    assert b"".join(p for k, _, p in got if k == DOWN) == browser.transport.value()
    assert UP not in {k for k, _, _ in got}


def test_input_on_records_the_browsers_bytes_copied(tmp_path: Path) -> None:
    """With input on the U payloads are exactly what the browser sent, greeting included,
    copied: the fast path reuses (unmasks in place) the bytearray it passes."""
    relay, recording, browser, clock = relay_with(tmp_path, greeting=True, input=True)
    sent = [b"RFB 003.008\n", b"\x01", b"\x01", b"\x03\x00\x00\x00"]
    for chunk in sent:
        buffer = bytearray(chunk)
        relay.from_browser(buffer)
        buffer[:] = b"\xff" * len(buffer)
    recording.finish("1000", relay.up_bytes, relay.down_bytes)
    got = records(recording.path)
    assert [p for k, _, p in got if k == UP] == sent


def test_a_relay_without_recording_is_untouched(tmp_path: Path) -> None:
    """recording None: the relay moves bytes as before."""
    browser, vm = MemoryPeer(), MemoryPeer()
    relay = Relay("s1", browser=browser, vm=vm)
    relay.start()
    relay.from_vm(b"abc")
    relay.from_browser(b"de")
    assert (browser.transport.value(), vm.transport.value()) == (b"abc", b"de")


@pytest_twisted.inlineCallbacks
def test_the_thread_writer_runs_jobs_in_order_off_the_reactor_thread():
    """Jobs run one at a time, in order, on one thread that is not the reactor's; run_now
    waits for every job before it; stop fires once all are done."""
    writer = ThreadWriter(reactor)
    writer.start()
    seen: list[tuple[int, str]] = []

    def job(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n

    results = [writer.run(lambda n=n: job(n)) for n in range(5)]
    assert writer.run_now(lambda: job(5), 10.0) == 5
    assert [n for n, _ in seen] == list(range(6))
    assert {name for _, name in seen} != {threading.current_thread().name}
    assert len({name for _, name in seen}) == 1
    got = yield defer.gatherResults(results)
    assert got == list(range(5))
    yield writer.stop()


def test_a_moved_relay_carries_its_recording_and_an_old_sender_none(tmp_path: Path) -> None:
    """The recording's state travels in MovedRelay; a record from an older generation,
    without the field, still decodes (recording None)."""
    recorder, _, _ = make(tmp_path)
    recording = begin(recorder)
    state = recording.moved()
    moved = MovedRelay(
        1, "s1", "10.0.0.5", 5900, None, "192.0.2.7", "tcp", None, True, 1, 2, 3, 0.5, 1.0,
        recording=state,
    )
    assert MovedRelay.decode(moved.encode()) == moved
    old = json.loads(moved.encode())
    del old["recording"]
    assert MovedRelay.decode(json.dumps(old).encode()).recording is None
