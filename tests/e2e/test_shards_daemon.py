"""LISTEN per shard ([database] notify_shards) with the real daemon and the real PostgreSQL:
late commits and revocations reach it, empty shards are UNLISTENed after the linger, a
trigger that disagrees is reported, and a database restart re-LISTENs."""

from __future__ import annotations

import attrs
import psycopg2
import pytest
import pytest_twisted
from daemon_process import LISTENING_FOR_CHANGES
from db_fixtures import insert_ready, insert_session
from e2e_support import connect_session, http_get, metric_values, new_id, until, within

from twisted_novnc.database.channels import LINGER
from twisted_novnc.database.embedded import apply_sql
from twisted_novnc.database.schema import trigger_sql
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SHARDS = 1024
SHARDED = {
    "database": {"notify_shards": SHARDS},
    "admin": {"listen": "tcp:0:interface=127.0.0.1"},
}


@pytest_twisted.inlineCallbacks
def metric(daemon, name: str, labels: tuple = ()) -> float:
    status, body = yield http_get(daemon.admin_port, "/metrics")
    assert status == 200
    return metric_values(body.decode())[name, labels]


def listened(daemon, count: int):
    """Fires once the daemon listens on ``count`` channels (the metric; pg_listening_channels()
    shows only the asking session's own)."""
    return until(
        lambda: metric(daemon, "twisted_novnc_listened_channels").addCallback(
            lambda value: value == count
        ),
        interval=0.1,
    )


@pytest.fixture
def sharded_table(postgres_dsn, sessions_table):
    apply_sql(postgres_dsn, trigger_sql(attrs.evolve(sessions_table, notify_shards=SHARDS)))
    return sessions_table


@pytest_twisted.inlineCallbacks
def test_late_commit_revocation_and_linger(daemon_factory, pg, sharded_table, vnc_server):
    """A browser waiting in a shard is served by a later commit; ending the session reaches
    its live relay; its shard is UNLISTENed once the linger has passed after it closed."""
    daemon = yield daemon_factory(SHARDED)
    assert (yield metric(daemon, "twisted_novnc_listened_channels")) == 0
    sid = new_id()
    insert_session(pg, sharded_table, sid)  # pending: the browser waits
    client = yield connect_session(daemon.port, sid)
    yield listened(daemon, 1)
    with pg.cursor() as cur:
        cur.execute(
            f'UPDATE "{sharded_table.table}" SET vm_ip = %s, "{sharded_table.port_column}" = %s,'
            " status = 'running' WHERE session_id = %s", ("127.0.0.1", vnc_server.port, sid),
        )
    assert (yield within(client.when_received(len(RFB_BANNER)), 5.0)) == RFB_BANNER
    with pg.cursor() as cur:
        cur.execute(
            f"UPDATE \"{sharded_table.table}\" SET status = 'ended' WHERE session_id = %s",
            (sid,),
        )
    assert (yield within(client.closed, 2.0)) == (4410, "session ended")
    assert (yield metric(daemon, "twisted_novnc_listened_channels")) == 1, "lingering"
    yield within(listened(daemon, 0), LINGER + 10)
    needed = yield metric(daemon, "twisted_novnc_notifications_total", (("result", "needed"),))
    assert needed >= 2


@pytest_twisted.inlineCallbacks
def test_trigger_mismatch_is_reported(daemon_factory, sessions_table):
    """A daemon configured for shards on a table whose trigger NOTIFYs the one channel warns."""
    daemon = yield daemon_factory(SHARDED)
    yield within(daemon.when_logged("browsers may wait to their deadline"))
    assert "shards 0" in daemon.output and f"shards {SHARDS}" in daemon.output


@pytest_twisted.inlineCallbacks
def test_database_restart_relistens(private_cluster, private_daemon, vnc_server):
    """A browser waits in a shard across a database restart: the shard is LISTENed again and
    the commit after the restart serves it."""
    db = attrs.evolve(private_cluster.db, notify_shards=SHARDS)
    apply_sql(private_cluster.dsn, trigger_sql(db))
    daemon = yield private_daemon(SHARDED)
    sid = new_id()
    client = yield connect_session(daemon.port, sid)
    yield listened(daemon, 1)
    private_cluster.stop()
    yield within(daemon.when_logged("database unreachable"))
    private_cluster.restart()
    yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=2))
    yield listened(daemon, 1)
    conn = psycopg2.connect(private_cluster.dsn)
    conn.autocommit = True
    try:
        insert_ready(conn, private_cluster.db, sid, vnc_server.port)
    finally:
        conn.close()
    assert (yield within(client.when_received(len(RFB_BANNER)), 5.0)) == RFB_BANNER
    client.sendClose(1000)
    yield within(client.closed)
