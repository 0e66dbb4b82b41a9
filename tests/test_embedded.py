"""The private PostgreSQL cluster: finding the server programs, creating, adopting, stopping."""

from __future__ import annotations

import os
import pwd
import select
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import psycopg2
import pytest
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import ILogObserver, globalLogPublisher

from twisted_novnc.database import embedded
from twisted_novnc.database.embedded import (
    BINDIR_ENV,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    EmbeddedPostgresService,
    apply_sql,
    find_pg_bindir,
    read_postmaster_pid,
)

MakeCluster = Callable[..., EmbeddedPostgres]


@pytest.fixture
def make_cluster(scratch_dir: str) -> Iterator[MakeCluster]:
    """Build non-durable clusters in the test's scratch directory; stop them all afterwards."""
    with ExitStack() as stops:  # every stop() runs, even if one of them fails

        def make(name: str = "pgdata") -> EmbeddedPostgres:
            cluster = EmbeddedPostgres(os.path.join(scratch_dir, name), durable=False)
            stops.callback(cluster.stop)
            return cluster

        yield make


def query_one(dsn: str, sql: str) -> Any:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        value = cursor.fetchone()[0]
    conn.close()
    return value


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Block until ``pid`` exits or ``timeout`` passes: a pidfd turns readable on exit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie awaiting its reaper has)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (ProcessLookupError, FileNotFoundError):
        return False


def cluster_uid() -> int:
    return pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()


@pytest.mark.integration
def test_start_creates_cluster_and_answers(make_cluster: MakeCluster) -> None:
    """start() runs initdb in a missing directory and the server answers on a private socket."""
    cluster = make_cluster()
    assert not os.path.exists(cluster.data_dir)
    dsn = cluster.start()
    assert dsn == f"host={cluster.socket_dir} port=5432 user=postgres dbname=postgres"
    assert cluster.owned
    info = os.stat(cluster.data_dir)
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == cluster_uid()
    assert cluster.socket_dir == cluster.data_dir + "-socket"  # beside it, on every start
    assert query_one(dsn, "SELECT 6 * 7") == 42
    assert query_one(dsn, "SHOW listen_addresses") == ""
    assert query_one(dsn, "SHOW fsync") == "off"


@pytest.mark.integration
def test_session_server_fixtures(pg: Any) -> None:
    """The suite's shared server (conftest's postgres_dsn and pg) answers in autocommit."""
    assert pg.autocommit
    with pg.cursor() as cursor:
        cursor.execute("SELECT current_user")
        assert cursor.fetchone() == ("postgres",)


@pytest.mark.integration
def test_start_after_stop_keeps_data(make_cluster: MakeCluster) -> None:
    """A second start on the same directory reuses the data, not a fresh initdb."""
    first = make_cluster()
    apply_sql(first.start(), "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42);")
    first.stop()
    second = make_cluster()
    assert query_one(second.start(), "SELECT x FROM kept") == 42
    assert second.owned


@pytest.mark.integration
def test_start_while_running_adopts_and_leaves_it_running(make_cluster: MakeCluster) -> None:
    """start() on a running cluster returns its DSN, and stop() leaves it to its owner."""
    owner = make_cluster()
    dsn = owner.start()
    adopter = make_cluster()
    assert adopter.start() == dsn
    assert not adopter.owned
    adopter.stop()
    assert os.path.isdir(owner.socket_dir)
    assert query_one(dsn, "SELECT 1") == 1


@pytest.mark.integration
def test_stop_removes_socket_dir_and_postmaster(make_cluster: MakeCluster) -> None:
    """stop() ends the postmaster and removes the socket directory."""
    cluster = make_cluster()
    cluster.start()
    postmaster = read_postmaster_pid(cluster.data_dir)
    assert postmaster is not None and is_running(postmaster.pid)
    socket_dir = cluster.socket_dir
    cluster.stop()
    assert not os.path.exists(socket_dir)
    assert wait_for_exit(postmaster.pid, timeout=10)
    assert not is_running(postmaster.pid)
    with pytest.raises(EmbeddedPostgresError, match="not started"):
        cluster.dsn  # noqa: B018


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["dead postmaster", "empty"])
def test_stale_pid_file_does_not_block_start(make_cluster: MakeCluster, damage: str) -> None:
    """A postmaster.pid left by a dead postmaster, or emptied by a crash, is cleared."""
    cluster = make_cluster()
    cluster.start()
    pid_file = Path(cluster.data_dir, "postmaster.pid")
    stale = pid_file.read_bytes() if damage == "dead postmaster" else b""
    cluster.stop()
    pid_file.write_bytes(stale)
    os.chown(pid_file, cluster_uid(), -1)
    assert query_one(cluster.start(), "SELECT 1") == 1
    assert cluster.owned


@pytest.mark.integration
def test_stale_pid_file_of_unrelated_process_does_not_block_start(
    make_cluster: MakeCluster,
) -> None:
    """A postmaster.pid whose pid now belongs to another process (a reboot) is stale too."""
    cluster = make_cluster()
    cluster.start()
    pid_file = Path(cluster.data_dir, "postmaster.pid")
    lines = pid_file.read_text().splitlines()
    cluster.stop()
    uid = cluster_uid()
    squatter = subprocess.Popen(["sleep", "60"], user=uid, cwd="/")
    try:
        pid_file.write_text("\n".join([str(squatter.pid), *lines[1:]]) + "\n")
        os.chown(pid_file, uid, -1)
        assert query_one(cluster.start(), "SELECT 1") == 1
        assert cluster.owned
    finally:
        squatter.kill()
        squatter.wait()


@pytest.mark.integration
def test_initdb_failure_names_command_and_output(make_cluster: MakeCluster) -> None:
    """A failing initdb raises with its command line and what it printed."""
    cluster = make_cluster()
    os.makedirs(cluster.data_dir)
    Path(cluster.data_dir, "stray").write_text("")
    with pytest.raises(EmbeddedPostgresError) as caught:
        cluster.start()
    message = str(caught.value)
    assert "/initdb -D " + cluster.data_dir in message
    assert "exists but is not empty" in message


@pytest.mark.integration
def test_start_failure_names_command_and_log(make_cluster: MakeCluster) -> None:
    """A server that will not start raises with the pg_ctl command and the log's tail."""
    cluster = make_cluster()
    cluster.start()
    cluster.stop()
    with open(os.path.join(cluster.data_dir, "postgresql.conf"), "a") as conf:
        conf.write("no_such_setting = 1\n")
    with pytest.raises(EmbeddedPostgresError) as caught:
        cluster.start()
    message = str(caught.value)
    assert "/pg_ctl -D " + cluster.data_dir in message
    assert 'unrecognized configuration parameter "no_such_setting"' in message
    assert not os.path.exists(cluster.planned_socket_dir())  # the failed start's is gone


@pytest.mark.integration
def test_psql_command_runs_sql(make_cluster: MakeCluster) -> None:
    """psql_command() gives a shell line that runs the SQL against the cluster."""
    cluster = make_cluster()
    cluster.start()
    command = cluster.psql_command("SELECT 'it' || 's me'")
    result = subprocess.run(command, shell=True, capture_output=True, text=True, check=True)
    assert "its me" in result.stdout


@pytest.mark.integration
def test_service_starts_logs_and_stops(make_cluster: MakeCluster) -> None:
    """The service starts the cluster, says where it lives and stops it with the service."""
    cluster = make_cluster()
    service = EmbeddedPostgresService(cluster)
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(cast(ILogObserver, events))
    try:
        service.startService()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, events))
    assert service.running
    assert query_one(service.dsn, "SELECT 1") == 1
    assert any(e.get("data_dir") == cluster.data_dir and e.get("dsn") == service.dsn
               for e in events)
    socket_dir = cluster.socket_dir
    service.stopService()
    assert not os.path.exists(socket_dir)
    assert not service.running


def test_find_pg_bindir_honours_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$TWISTED_NOVNC_PG_BINDIR wins over every other place."""
    for name in ("initdb", "pg_ctl", "postgres"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))
    assert find_pg_bindir() == str(tmp_path)


def test_missing_bindir_gives_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server programs anywhere, or a wrong $TWISTED_NOVNC_PG_BINDIR, says what to do."""
    with pytest.raises(EmbeddedPostgresError, match="install the PostgreSQL server package"):
        find_pg_bindir(environ={"PATH": str(tmp_path)}, versioned_root=str(tmp_path / "no"))
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(EmbeddedPostgresError, match=BINDIR_ENV):
        find_pg_bindir()
    cluster = EmbeddedPostgres(str(tmp_path / "data"), bindir=str(tmp_path / "missing"))
    with pytest.raises(EmbeddedPostgresError, match="missing holds no initdb and pg_ctl"):
        cluster.start()
    assert not (tmp_path / "data").exists()


def test_relative_data_dir_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative data directory is fixed at construction, whatever the cwd later."""
    monkeypatch.chdir("/tmp")
    assert EmbeddedPostgres("var/pgdata").data_dir == "/tmp/var/pgdata"


def test_service_from_a_path_builds_a_durable_cluster() -> None:
    """Given a directory, the service runs a durable cluster there and starts nothing yet."""
    service = EmbeddedPostgresService("/srv/novnc/pgdata")
    assert service.embedded.data_dir == "/srv/novnc/pgdata"
    assert service.embedded.durable
    with pytest.raises(EmbeddedPostgresError, match="not started"):
        service.dsn  # noqa: B018


@pytest.mark.integration
def test_cluster_in_a_private_directory_still_starts(scratch_dir: str) -> None:
    """A checkout in a private directory (mode 0700, as mktemp -d makes): run as root, the
    cluster (the postgres user) could not enter it, so it lives in a reachable directory that
    the configured path links to, and the next start finds it and its data there again."""
    private = tempfile.mkdtemp(prefix="tnovnc-private-")
    os.chmod(private, 0o700)
    configured = os.path.join(private, "var", "postgres")
    relocated = os.path.join(scratch_dir, "relocated")
    with ExitStack() as stops:
        stops.callback(shutil.rmtree, private, True)
        first = EmbeddedPostgres(configured, durable=False, relocated_parent=relocated)
        stops.callback(first.stop)
        dsn = first.start()
        with psycopg2.connect(dsn) as conn, conn.cursor() as cursor:
            cursor.execute("CREATE TABLE kept (x int)")
        conn.close()
        if os.geteuid() == 0:
            assert first.data_dir.startswith(relocated + os.sep)
            assert os.path.realpath(configured) == first.data_dir
        else:
            assert first.data_dir == os.path.realpath(configured)  # our own directory
        first.stop()
        again = EmbeddedPostgres(configured, durable=False, relocated_parent=relocated)
        stops.callback(again.stop)
        assert query_one(again.start(), "SELECT count(*) FROM kept") == 0
        assert again.data_dir == first.data_dir


# --- the stable socket directory ------------------------------------------------------------


def test_socket_dir_is_beside_the_data_dir() -> None:
    """var/postgres gets var/postgres-socket: a path that is the same on every start."""
    assert embedded.stable_socket_dir("/srv/app/var/postgres") == "/srv/app/var/postgres-socket"
    assert embedded.stable_socket_dir("/srv/app/var/postgres/") == "/srv/app/var/postgres-socket"
    cluster = EmbeddedPostgres("/srv/app/var/postgres")
    assert cluster.planned_socket_dir() == "/srv/app/var/postgres-socket"


def test_too_deep_a_data_dir_falls_back_to_a_stable_short_path() -> None:
    """A socket path over 107 bytes cannot exist: the socket goes to /tmp/tnovnc-<hash of the
    data directory>, the same for the same directory, different for another."""
    deep = "/srv/" + "d" * 100 + "/var/postgres"
    fallback = embedded.stable_socket_dir(deep)
    assert fallback.startswith("/tmp/tnovnc-") and len(fallback) == len("/tmp/tnovnc-") + 16
    assert embedded.stable_socket_dir(deep) == fallback
    assert embedded.stable_socket_dir(deep + "2") != fallback
    assert embedded.fits_socket_path(fallback)
    # The limit itself: 107 bytes fit, 108 do not.
    at_limit = "/" + "x" * (107 - len("/.s.PGSQL.5432") - 1)
    assert embedded.fits_socket_path(at_limit)
    assert not embedded.fits_socket_path(at_limit + "x")


def test_no_short_enough_path_is_refused_clearly() -> None:
    """When even the fallback's parent is too deep, start-up says so instead of failing in
    PostgreSQL's log."""
    deep = "/srv/" + "d" * 100 + "/var/postgres"
    with pytest.raises(EmbeddedPostgresError, match="longer than a Unix socket allows"):
        embedded.stable_socket_dir(deep, fallback_parent="/" + "p" * 100)


def test_a_fallback_someone_else_made_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback's name is predictable: a symbolic link planted there is never used."""
    parent = tmp_path / "p"
    parent.mkdir()
    deep = str(tmp_path / ("d" * 110) / "postgres")
    cluster = EmbeddedPostgres(deep, socket_fallback_parent=str(parent))
    planted = cluster.planned_socket_dir()
    assert planted.startswith(str(parent))
    os.symlink(str(tmp_path), planted)
    monkeypatch.setattr(EmbeddedPostgres, "_cluster_user", lambda self: None)
    with pytest.raises(EmbeddedPostgresError, match="is not a directory of this user's"):
        cluster._prepare_socket_dir()


@pytest.mark.integration
def test_socket_path_and_dsn_are_the_same_on_every_start(make_cluster: MakeCluster) -> None:
    """A restart keeps the DSN (and so a saved psql line): the socket lives beside the data
    directory, not in a fresh temporary directory."""
    first = make_cluster()
    dsn = first.start()
    first.stop()
    second = make_cluster()
    assert second.start() == dsn
    assert second.socket_dir == second.data_dir + "-socket"
    assert os.path.exists(embedded.socket_file(second.socket_dir))
    info = os.stat(second.socket_dir)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == cluster_uid()


@pytest.mark.integration
def test_a_deep_data_dir_starts_on_the_fallback(scratch_dir: str) -> None:
    """A data directory too deep for a socket beside it still starts, on the fallback, and
    again on the same one."""
    deep = os.path.join(scratch_dir, "d" * 90, "postgres")
    os.makedirs(os.path.dirname(deep))
    fallback_parent = os.path.join(scratch_dir, "s")
    os.mkdir(fallback_parent, 0o711)
    with ExitStack() as stops:
        cluster = EmbeddedPostgres(deep, durable=False, socket_fallback_parent=fallback_parent)
        stops.callback(cluster.stop)
        dsn = cluster.start()
        assert cluster.socket_dir.startswith(fallback_parent + os.sep)
        assert query_one(dsn, "SELECT 1") == 1
        cluster.stop()
        assert cluster.start() == dsn
