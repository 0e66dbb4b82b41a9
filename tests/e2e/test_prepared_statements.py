"""[database] prepared_statements with the real daemon: through a real PgBouncer in transaction
mode (auto falls back at its first sign and every browser is served; off serves), and on a
direct connection (on and auto run prepared, also after a database restart)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from daemon_process import DaemonProcess, start_daemon, stop_daemon, write_config
from db_fixtures import insert_ready
from e2e_support import connect_client, connect_session, http_get, metric_values, until, within
from test_pgbouncer import pgbouncer  # noqa: F401  (fixture)
from twisted.internet import defer

from twisted_novnc.front.auth import token_digest
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ADMIN = {"listen": "tcp:0:interface=127.0.0.1"}
FALLBACK = "prepared statements do not last"
PREPARED = "twisted_novnc_database_prepared"


@pytest.fixture
def pgbouncer_pool_size() -> int:
    """Two server connections: one another client holds, one the daemon's pool gets."""
    return 2


@pytest_twisted.inlineCallbacks
def served(daemon: DaemonProcess, sid: str, suffix: str = "") -> Any:
    """A browser for ``sid`` gets the VM's banner, then closes cleanly."""
    client = yield connect_session(daemon.port, sid, suffix)
    assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER, sid
    client.sendClose(1000)
    assert (yield within(client.closed)) == (1000, None)


@pytest_twisted.inlineCallbacks
def prepared_gauge(daemon: DaemonProcess) -> Any:
    status, body = yield http_get(daemon.admin_port, "/metrics")
    assert status == 200
    return metric_values(body.decode())[PREPARED, ()]


def pool_backends(dsn: str) -> list[tuple[int, str]]:
    """(pid, last statement) of each backend running the daemon's pool (PgBouncer's server
    connections carry its clients' application_name)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pid, query FROM pg_stat_activity"
                " WHERE application_name = 'twisted_novnc-pool'"
            )
            return list(cur.fetchall())
    finally:
        conn.close()


def pool_queries(dsn: str) -> list[str]:
    return [query for _, query in pool_backends(dsn) if query]


def clean(daemon: DaemonProcess) -> None:
    """No traceback, no failed lookup, no browser closed with 4503 (as a close code: a session
    id may have "4503" in it)."""
    for bad in ("Traceback", "Unhandled", "session lookup failed", r": 4503 "):
        assert not re.search(bad, daemon.output), daemon.output[-3000:]


@pytest_twisted.inlineCallbacks
def many_served(daemon: DaemonProcess, pg: Any, table: Any, port: int, n: int) -> Any:
    """n sessions one after another, then n at once."""
    for _ in range(n):
        sid = str(uuid.uuid4())
        insert_ready(pg, table, sid, port)
        yield served(daemon, sid)
    sids = [str(uuid.uuid4()) for _ in range(n)]
    for sid in sids:
        insert_ready(pg, table, sid, port)
    yield defer.gatherResults([served(daemon, sid) for sid in sids], consumeErrors=True)


@pytest_twisted.inlineCallbacks
def test_auto_through_pgbouncer_falls_back_and_serves_everyone(
    pgbouncer, postgres_dsn, pg, sessions_table, vnc_server, tmp_path  # noqa: F811
):
    """auto through PgBouncer in transaction mode: prepared while one server connection
    serves the pool; once another client holds that one, the next EXECUTE lands on a server
    connection that never prepared it: that browser is served all the same (the lookup runs
    again unprepared at once), one database_unprepared line, the gauge drops to 0, and every
    later lookup and one-time token runs unprepared, for sessions one after another and at
    once."""
    pooled, _ = pgbouncer
    config = write_config(
        tmp_path / "auto.ini", pooled, sessions_table,
        {"database": {"listen_dsn": postgres_dsn}, "admin": ADMIN},
    )
    daemon = DaemonProcess()
    holder = None
    try:
        yield start_daemon(config, tmp_path, daemon)
        sid = str(uuid.uuid4())
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        yield served(daemon, sid)
        assert (yield prepared_gauge(daemon)) == 1
        assert FALLBACK not in daemon.output
        # Another client takes the one server connection the pool prepared on (PgBouncer
        # hands out its most recently used one), so the pool's next transaction gets another.
        holder = psycopg2.connect(pooled)
        with holder.cursor() as cur:
            cur.execute("SELECT 1")  # a transaction left open: the server connection is held
        sid = str(uuid.uuid4())
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        yield served(daemon, sid)
        yield within(daemon.when_logged(FALLBACK))
        assert "SQLSTATE 26000" in daemon.output
        assert (yield prepared_gauge(daemon)) == 0
        holder.rollback()
        holder.close()
        holder = None
        yield many_served(daemon, pg, sessions_table, vnc_server.port, 20)
        assert daemon.count(FALLBACK) == 1
        assert all(not q.startswith(("PREPARE", "EXECUTE")) for q in pool_queries(postgres_dsn))
    finally:
        if holder is not None:
            holder.close()
        yield stop_daemon(daemon)
    clean(daemon)


@pytest_twisted.inlineCallbacks
def test_auto_through_pgbouncer_consumes_tokens_after_falling_back(
    pgbouncer, postgres_dsn, pg, sessions_table, vnc_server, tmp_path  # noqa: F811
):
    """auto through PgBouncer with one-time tokens: the token update falls back as the lookup
    does (the update that met the pooler did not run, so the token is consumed once), and a
    replay is refused."""
    pooled, _ = pgbouncer
    table = sessions_table.table
    with pg.cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" ADD COLUMN token_sha256 text')
    config = write_config(
        tmp_path / "tokens.ini", pooled, sessions_table,
        {"database": {"listen_dsn": postgres_dsn}, "admin": ADMIN,
         "auth": {"mode": "column", "token_column": "token_sha256", "one_time": "on"}},
    )
    daemon = DaemonProcess()
    holder = None

    def ready_with_token() -> tuple[str, str]:
        sid, token = str(uuid.uuid4()), "tok-" + uuid.uuid4().hex
        insert_ready(pg, sessions_table, sid, vnc_server.port)
        with pg.cursor() as cur:
            cur.execute(
                f'UPDATE "{table}" SET token_sha256 = %s WHERE session_id = %s',
                (token_digest(token), sid),
            )
        return sid, token

    try:
        yield start_daemon(config, tmp_path, daemon)
        sid, token = ready_with_token()
        yield served(daemon, sid, f"?token={token}")
        holder = psycopg2.connect(pooled)
        with holder.cursor() as cur:
            cur.execute("SELECT 1")
        for _ in range(10):
            sid, token = ready_with_token()
            yield served(daemon, sid, f"?token={token}")
        yield within(daemon.when_logged(FALLBACK))
        assert (yield prepared_gauge(daemon)) == 0
        replay = yield connect_client(daemon.port, f"/websockify/{sid}?token={token}")
        assert (yield within(replay.closed)) == (4403, "token already used")
        assert daemon.count(FALLBACK) == 1
    finally:
        if holder is not None:
            holder.close()
        yield stop_daemon(daemon)
    clean(daemon)


@pytest_twisted.inlineCallbacks
def test_off_through_pgbouncer_serves_unprepared(
    pgbouncer, postgres_dsn, pg, sessions_table, vnc_server, tmp_path  # noqa: F811
):
    """off through PgBouncer: never a PREPARE (the server connections' last statements are
    the plain lookup), the gauge at 0, no fallback line, every browser served."""
    pooled, _ = pgbouncer
    config = write_config(
        tmp_path / "off.ini", pooled, sessions_table,
        {"database": {"listen_dsn": postgres_dsn, "prepared_statements": "off"}, "admin": ADMIN},
    )
    daemon = DaemonProcess()
    try:
        yield start_daemon(config, tmp_path, daemon)
        yield many_served(daemon, pg, sessions_table, vnc_server.port, 10)
        assert (yield prepared_gauge(daemon)) == 0
        queries = pool_queries(postgres_dsn)
        assert queries and all(q.startswith("SELECT") for q in queries), queries
    finally:
        yield stop_daemon(daemon)
    assert FALLBACK not in daemon.output
    clean(daemon)


@pytest.mark.parametrize("mode", ["on", "auto"])
@pytest_twisted.inlineCallbacks
def test_direct_connection_runs_prepared(
    mode, daemon_factory, postgres_dsn, pg, sessions_table, vnc_server
):
    """on and auto, connected directly: the lookups run as prepared statements (the pool's
    backends last ran EXECUTE twisted_novnc_fetch_...), the gauge at 1, every browser
    served, no fallback."""
    daemon = yield daemon_factory(
        {"database": {"prepared_statements": mode}, "admin": ADMIN}
    )
    yield many_served(daemon, pg, sessions_table, vnc_server.port, 10)
    assert (yield prepared_gauge(daemon)) == 1
    queries = pool_queries(postgres_dsn)
    assert any(q.startswith("EXECUTE twisted_novnc_fetch_") for q in queries), queries
    assert FALLBACK not in daemon.output
    clean(daemon)


@pytest_twisted.inlineCallbacks
def test_auto_prepares_again_after_a_database_restart(
    private_cluster, private_daemon, vnc_server
):
    """auto on a direct connection across a database restart: the reconnected pool
    connections are new server connections, which prepare again (an EXECUTE of a statement
    the new backend never saw would fail and make auto fall back): still prepared, and
    served before and after."""
    daemon = yield private_daemon({"admin": ADMIN})
    pg = psycopg2.connect(private_cluster.dsn)
    pg.autocommit = True
    try:
        yield many_served(daemon, pg, private_cluster.db, vnc_server.port, 3)
    finally:
        pg.close()
    private_cluster.stop()
    yield within(daemon.when_logged("database unreachable"))
    private_cluster.restart()
    yield within(daemon.when_logged("database reachable again"))
    yield within(daemon.when_logged("listening for session changes", times=2))
    # Each pool connection reconnects on its own backoff: a lookup before both are back may
    # meet a dead one (the gate retries it), which is not what this test is about.
    yield until(lambda: len(pool_backends(private_cluster.dsn)) == 2, interval=0.1)
    pg = psycopg2.connect(private_cluster.dsn)
    pg.autocommit = True
    try:
        yield many_served(daemon, pg, private_cluster.db, vnc_server.port, 5)
    finally:
        pg.close()
    assert (yield prepared_gauge(daemon)) == 1
    queries = pool_queries(private_cluster.dsn)
    assert any(q.startswith("EXECUTE twisted_novnc_fetch_") for q in queries), queries
    assert FALLBACK not in daemon.output
    clean(daemon)
