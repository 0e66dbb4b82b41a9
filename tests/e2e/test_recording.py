"""Recording ([record]) through a real daemon and PostgreSQL: the file holds exactly what the
WebSocket client received (and, with input = on, sent); mode = column; max_bytes and
max_total_bytes; a read-only and a full directory (tmpfs); the SIGTERM drain, kill -9 and an
upgrade each leave a readable file."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from db_fixtures import insert_ready
from e2e_support import connect_session, http_get, metric_values, new_id, until, within
from required_tools import require
from test_upgrade import moved_count
from test_vnc_login import (  # noqa: F401  (vnc_factory: a fixture)
    PASSWORD,
    add_password_column,
    greet,
    set_password,
    vnc_factory,
)
from upgrade_support import run_upgrade

from twisted_novnc.database.embedded import apply_sql
from twisted_novnc.recording.format import (
    DOWN,
    NOTE,
    SUFFIX,
    UP,
    decode_json,
    iter_records,
    read_header,
    read_info,
)
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ADMIN = {"admin": {"listen": "tcp:0:interface=127.0.0.1"}}


def recorded(directory: Path, **keys: object) -> dict[str, Any]:
    """Config sections: the admin listener, and [record] into ``directory``."""
    return {**ADMIN, "record": {"dir": str(directory), **keys}}


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


@pytest_twisted.inlineCallbacks
def only_file(directory: Path, daemon: Any) -> Any:
    """The one recording in ``directory``, once the writer thread has created it (the
    daemon's output says why when none comes, or more than one)."""
    try:
        yield until(lambda: files(directory))
    except TimeoutError:
        pytest.fail(f"no recording in {directory}:\n{daemon.output[-5000:]}")
    found = files(directory)
    assert len(found) == 1, daemon.output[-5000:]
    return found[0]


def recorded_bytes(path: Path) -> int:
    """The payload bytes whole in the file so far (-1 while its header is not written)."""
    try:
        return read_info(str(path)).recorded_bytes
    except (OSError, ValueError):
        return -1


def payloads(path: Path, kind: bytes) -> list[bytes]:
    with open(path, "rb") as f:
        read_header(f)
        return [r.payload for r in iter_records(f) if r.kind == kind]


def notes(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        read_header(f)
        return [decode_json(r) for r in iter_records(f) if r.kind == NOTE]


def complete(path: Path) -> bool:
    try:
        return read_info(str(path)).complete
    except (OSError, ValueError):
        return False


@pytest_twisted.inlineCallbacks
def metrics(daemon: Any) -> Any:
    status, body = yield http_get(daemon.admin_port, "/metrics")
    assert status == 200
    return metric_values(body.decode())


@pytest_twisted.inlineCallbacks
def echo_session(daemon: Any, pg: Any, db: Any, vnc_server: Any, sent: list[bytes]) -> Any:
    """A relay to the echoing VNC server: the banner, then each of ``sent`` echoed; the
    client is left open."""
    sid = new_id()
    insert_ready(pg, db, sid, vnc_server.port)
    client = yield connect_session(daemon.port, sid)
    yield within(client.when_received(len(RFB_BANNER)))
    total = len(RFB_BANNER)
    for chunk in sent:
        client.sendMessage(chunk, isBinary=True)
        total += len(chunk)
        yield within(client.when_received(total))
    return sid, client


@pytest_twisted.inlineCallbacks
def close(client: Any, daemon: Any, times: int = 1) -> Any:
    client.sendClose(1000)
    yield within(client.closed)
    yield within(daemon.when_logged(r"closed \S+ from", times))


@pytest.mark.parametrize("input_", ["off", "on"])
@pytest_twisted.inlineCallbacks
def test_the_file_holds_what_the_client_received(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path, input_
):
    """The D payloads are exactly the bytes the client received; with input = off no U
    record, with on the U payloads are exactly what it sent; the end says 1000."""
    directory = tmp_path / "rec"
    daemon = yield daemon_factory(recorded(directory, input=input_))
    assert (directory.stat().st_mode & 0o777) == 0o700
    sent = [b"hello", b"x" * 70000, b"bye"]
    sid, client = yield echo_session(daemon, pg, sessions_table, vnc_server, sent)
    yield close(client, daemon)
    path = yield only_file(directory, daemon)
    yield until(lambda: complete(path))
    assert (path.stat().st_mode & 0o777) == 0o600
    assert b"".join(payloads(path, DOWN)) == bytes(client.received)
    # (The fast path hands the relay each frame's bytes as they arrive: chunks, not messages.)
    assert b"".join(payloads(path, UP)) == (b"".join(sent) if input_ == "on" else b"")
    assert (payloads(path, UP) == []) == (input_ == "off")
    info = read_info(str(path))
    assert info.header.session_id == sid and info.header.client == "127.0.0.1"
    assert info.ending is not None and info.ending.outcome == "1000"
    assert info.ending.down_bytes == len(client.received)
    values = yield metrics(daemon)
    assert values["twisted_novnc_recordings_total", (("result", "started"),)] == 1


@pytest_twisted.inlineCallbacks
def test_mode_column_records_only_rows_that_say_so(
    daemon_factory, pg, sessions_table, postgres_dsn, vnc_server, tmp_path
):
    """With mode = column a row whose column is false is not recorded, true is."""
    apply_sql(postgres_dsn, f'ALTER TABLE "{sessions_table.table}" ADD COLUMN rec boolean')
    directory = tmp_path / "rec"
    daemon = yield daemon_factory(recorded(directory, mode="column", record_column="rec"))
    for n, flag in enumerate((False, True)):
        sid = new_id()
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        with pg.cursor() as cur:
            cur.execute(f'UPDATE "{sessions_table.table}" SET rec = %s WHERE session_id = %s',
                        (flag, sid))
        client = yield connect_session(daemon.port, sid)
        yield within(client.when_received(len(RFB_BANNER)))
        yield close(client, daemon, n + 1)
        if not flag:
            assert files(directory) == []
    path = yield only_file(directory, daemon)
    yield until(lambda: complete(path))  # the writer thread creates the file, then writes it
    assert read_info(str(path)).header.session_id == sid


@pytest_twisted.inlineCallbacks
def test_max_bytes_stops_the_file_and_the_session_goes_on(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """At max_bytes the file stops exactly there (a note, then the end record at the close)
    while the client goes on receiving; the metric counts the stop."""
    directory = tmp_path / "rec"
    daemon = yield daemon_factory(recorded(directory, max_bytes=100))
    sid, client = yield echo_session(
        daemon, pg, sessions_table, vnc_server, [b"a" * 80, b"b" * 80, b"after the stop"]
    )
    yield close(client, daemon)
    path = yield only_file(directory, daemon)
    yield until(lambda: complete(path))
    assert b"".join(payloads(path, DOWN)) == bytes(client.received)[:100]
    assert notes(path) == [{"stopped": "max_bytes"}]
    info = read_info(str(path))
    assert info.ending is not None and info.ending.stopped == "max_bytes"
    assert info.recorded_bytes == 100 and info.ending.outcome == "1000"
    values = yield metrics(daemon)
    assert values["twisted_novnc_recordings_stopped_total", (("reason", "max_bytes"),)] == 1
    assert f"recording of {sid} stopped (max_bytes)" in daemon.output


@pytest_twisted.inlineCallbacks
def test_a_full_directory_refuses_the_recording_not_the_session(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """A directory already at max_total_bytes: no new file, the session is served, the
    refusal is logged and counted."""
    directory = tmp_path / "rec"
    directory.mkdir(mode=0o700)
    (directory / "old.tnrec").write_bytes(b"x" * 5000)
    daemon = yield daemon_factory(recorded(directory, max_total_bytes=4096))
    sid, client = yield echo_session(daemon, pg, sessions_table, vnc_server, [b"served"])
    yield close(client, daemon)
    assert [p.name for p in files(directory)] == ["old.tnrec"]
    values = yield metrics(daemon)
    assert values["twisted_novnc_recordings_total", (("result", "refused"),)] == 1
    assert f"not recording {sid}" in daemon.output


# -- a read-only and a full directory: tmpfs mounts ----------------------------------------------


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """Mount a tmpfs (mode 0700) of a given size; every mount is undone after the test.
    Needs root and mount: skipped without them, a failure under CI."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir(mode=0o700)
        done = _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
        require([] if done.returncode == 0 else [f"root and mount(8): {done.stderr.strip()}"],
                "the tests of a read-only or full recording directory")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest_twisted.inlineCallbacks
def test_a_read_only_directory_stops_the_recording_not_the_session(
    daemon_factory, pg, sessions_table, vnc_server, tmpfs
):
    """The directory turned read-only under the daemon: the recording fails (io_error, a
    log line, the metric), the session is relayed to its end."""
    directory = tmpfs("ro", "1m")
    daemon = yield daemon_factory(recorded(directory))
    remounted = _mount("-o", "remount,ro", str(directory))
    assert remounted.returncode == 0, remounted.stderr
    sid, client = yield echo_session(daemon, pg, sessions_table, vnc_server, [b"served"])
    yield close(client, daemon)
    yield within(daemon.when_logged(f"recording of {sid} stopped"))
    assert f"recording of {sid} stopped (io_error: Read-only file system)" in daemon.output
    values = yield metrics(daemon)
    assert values["twisted_novnc_recordings_stopped_total", (("reason", "io_error"),)] == 1
    assert files(directory) == []


@pytest_twisted.inlineCallbacks
def test_a_directory_read_only_at_start_is_a_warning_not_a_refusal(
    daemon_factory, pg, sessions_table, vnc_server, tmpfs
):
    """A directory already read-only when the daemon starts: one warning naming it, the
    daemon serves, each recording fails on its own (io_error)."""
    directory = tmpfs("ro-at-start", "1m")
    remounted = _mount("-o", "remount,ro", str(directory))
    assert remounted.returncode == 0, remounted.stderr
    daemon = yield daemon_factory(recorded(directory))
    assert f"recording directory {directory} is not writable" in daemon.output
    sid, client = yield echo_session(daemon, pg, sessions_table, vnc_server, [b"served"])
    yield close(client, daemon)
    yield within(daemon.when_logged(f"recording of {sid} stopped"))
    values = yield metrics(daemon)
    assert values["twisted_novnc_recordings_stopped_total", (("reason", "io_error"),)] == 1


@pytest_twisted.inlineCallbacks
def test_a_full_disk_stops_the_recording_not_the_session(
    daemon_factory, pg, sessions_table, vnc_server, tmpfs
):
    """A 64 KiB tmpfs fills up: the recording stops (disk_full), the file stays readable up
    to where it was cut, and the client receives everything."""
    directory = tmpfs("full", "64k")
    daemon = yield daemon_factory(recorded(directory))
    sent = [b"y" * 50000] * 4
    sid, client = yield echo_session(daemon, pg, sessions_table, vnc_server, sent)
    assert bytes(client.received) == RFB_BANNER + b"".join(sent)
    yield within(daemon.when_logged(f"recording of {sid} stopped"))
    yield close(client, daemon)
    assert f"recording of {sid} stopped (disk_full" in daemon.output
    values = yield metrics(daemon)
    assert values["twisted_novnc_recordings_stopped_total", (("reason", "disk_full"),)] == 1
    path = yield only_file(directory, daemon)
    info = read_info(str(path))
    assert info.ending is None
    assert bytes(client.received).startswith(b"".join(payloads(path, DOWN)))


# -- the end of the process: drain, kill -9, upgrade ---------------------------------------------


@pytest_twisted.inlineCallbacks
def test_the_sigterm_drain_ends_every_file_with_1001(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """A SIGTERM closes the live relays with 1001 after the drain, and the process exits
    only once each file has its end record."""
    directory = tmp_path / "rec"
    daemon = yield daemon_factory(recorded(directory), drain_timeout=0.5)
    clients = []
    for _ in range(2):
        _, client = yield echo_session(daemon, pg, sessions_table, vnc_server, [b"live"])
        clients.append(client)
    daemon.transport.signalProcess(signal.SIGTERM)
    yield within(daemon.ended)
    paths = files(directory)
    assert len(paths) == 2
    for path in paths:
        info = read_info(str(path))
        assert info.ending is not None and info.ending.outcome == "1001", path
    for client in clients:
        code, _ = yield within(client.closed)
        assert code == 1001


@pytest_twisted.inlineCallbacks
def test_kill_9_leaves_a_file_readable_up_to_the_last_flush(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """kill -9 mid-relay: the file reads without an end record, its whole records are what
    was flushed, and its D payloads are a prefix of what the client received."""
    directory = tmp_path / "rec"
    daemon = yield daemon_factory(recorded(directory))
    sent = [b"k" * 3000, b"l" * 3000]
    _, client = yield echo_session(daemon, pg, sessions_table, vnc_server, sent)
    path = yield only_file(directory, daemon)
    received = len(client.received)
    # The flush comes within a second: wait for the file to hold every byte received.
    yield until(lambda: recorded_bytes(path) >= received)
    os.kill(daemon.pid, signal.SIGKILL)
    yield within(daemon.ended)
    info = read_info(str(path))
    assert info.ending is None and info.recorded_bytes == received
    assert bytes(client.received).startswith(b"".join(payloads(path, DOWN)))


@pytest_twisted.inlineCallbacks
def test_an_upgrade_moves_the_recording_with_its_relay(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """A recorded relay moved by an upgrade goes on in the same file: bytes from before and
    after the move, a note at the move, one end record at the end."""
    directory = tmp_path / "rec"
    daemon = yield daemon_factory(recorded(directory))
    sid, client = yield echo_session(daemon, pg, sessions_table, vnc_server, [b"before"])
    code, output = yield run_upgrade(daemon.admin_port)
    assert code == 0, output
    assert moved_count(output) == 1
    client.sendMessage(b"after", isBinary=True)
    yield within(client.when_received(len(RFB_BANNER) + len(b"before") + len(b"after")))
    client.sendClose(1000)
    yield within(client.closed)
    path = yield only_file(directory, daemon)
    yield until(lambda: complete(path))
    assert b"".join(payloads(path, DOWN)) == bytes(client.received)
    assert [list(note) for note in notes(path)] == [["moved"]]
    info = read_info(str(path))
    assert info.ending is not None and info.ending.outcome == "1000"
    assert info.recorded_bytes == len(client.received)


@pytest_twisted.inlineCallbacks
def test_each_worker_records_its_relays(
    daemon_factory, pg, sessions_table, vnc_server, tmp_path
):
    """With [novnc] workers = 2 each worker records the relays it serves (one file per
    relay, whole), and the metrics carry the worker's label."""
    directory = tmp_path / "rec"
    daemon = yield daemon_factory(recorded(directory), workers=2)
    yield within(daemon.when_logged("listening for session changes", times=2))
    clients = []
    for _ in range(6):
        _, client = yield echo_session(daemon, pg, sessions_table, vnc_server, [b"w"])
        clients.append(client)
    for n, client in enumerate(clients):
        yield close(client, daemon, n + 1)
    paths = files(directory)
    assert len(paths) == 6
    for path in paths:
        yield until(lambda path=path: complete(path))
    values = yield metrics(daemon)
    started = sum(
        values.get(("twisted_novnc_recordings_total", (("result", "started"), ("worker", w))), 0)
        for w in ("1", "2")
    )
    assert started == 6


@pytest_twisted.inlineCallbacks
def test_the_proxys_own_opening_is_recorded_as_the_browser_saw_it(
    daemon_factory, pg, sessions_table, postgres_dsn, vnc_factory, tmp_path  # noqa: F811
):
    """With [vnc] credentials the browser's RFB opening is the proxy's, not the VM's: the
    file's D payloads are still exactly what the browser received, greeting included, and
    the U payloads what it sent."""
    vm, port = vnc_factory()
    add_password_column(postgres_dsn, sessions_table)
    directory = tmp_path / "rec"
    daemon = yield daemon_factory({
        **recorded(directory, input="on"), "vnc": {"password_column": "vnc_pw"},
    })
    sid = new_id()
    insert_ready(pg, sessions_table, sid, port)
    set_password(sessions_table, pg, sid, PASSWORD)
    client = yield connect_session(daemon.port, sid)
    yield greet(client)
    client.sendMessage(b"frame", isBinary=True)
    yield within(client.when_received(len(client.received) + 5))
    yield close(client, daemon)
    path = yield only_file(directory, daemon)
    yield until(lambda: complete(path))
    assert b"".join(payloads(path, DOWN)) == bytes(client.received)
    assert b"".join(payloads(path, UP)) == b"RFB 003.008\n\x01\x01frame"
    assert PASSWORD.encode() not in path.read_bytes()
