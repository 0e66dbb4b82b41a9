"""Fault injection with the real daemon, the real PostgreSQL and real sockets (issue: live
sessions and faults).  Each test waits on events, bounded in time, and checks nothing is lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted
from daemon_process import (
    LISTENING_FOR_CHANGES,
)
from db_fixtures import insert_ready
from e2e_support import connect_session, new_id, until, within
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory

from twisted_novnc.testing import RFB_BANNER, VNCEchoFactory

pytestmark = [pytest.mark.e2e, pytest.mark.integration]




def insert_many(dsn: str, db, rows) -> None:
    """Commit rows (session_id, vm_ip, port, status), one transaction for all."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.executemany(
                f'INSERT INTO "{db.table}" (session_id, vm_ip, "{db.port_column}", status)'
                " VALUES (%s, %s, %s, %s)",
                rows,
            )
    finally:
        conn.close()


def execute(dsn: str, sql: str, args=()) -> list:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@pytest_twisted.inlineCallbacks
def echo_round_trip(client, payload: bytes) -> defer.Deferred:
    before = len(client.received)
    client.sendMessage(payload, isBinary=True)
    data = yield within(client.when_received(before + len(payload)))
    assert data[before:] == payload


@pytest_twisted.inlineCallbacks
def test_postmaster_killed_while_fifty_wait(private_cluster, private_daemon, vnc_server):
    """kill -9 of the postmaster with 50 clients waiting; after a restart and the commits,
    every client connects before its deadline."""
    daemon = yield private_daemon(readiness_timeout=60)
    ids = [new_id() for _ in range(50)]
    clients = []
    for sid in ids:
        clients.append((yield connect_session(daemon.port, sid)))
    yield within(daemon.when_logged("request .* waiting for readiness", times=50))

    yield private_cluster.kill()
    yield within(daemon.when_logged("database unreachable"))
    private_cluster.restart()
    insert_many(
        private_cluster.dsn, private_cluster.db,
        [(sid, "127.0.0.1", vnc_server.port, "running") for sid in ids],
    )
    for client in clients:
        data = yield within(client.when_received(len(RFB_BANNER)))
        assert data == RFB_BANNER
    assert daemon.count("refused [0-9a-f-]+ from") == 0, daemon.output
    for client in clients:
        client.sendClose(1000)
        yield within(client.closed)


@pytest_twisted.inlineCallbacks
def test_listen_connection_terminated_then_commit(private_cluster, private_daemon, vnc_server):
    """pg_terminate_backend on the LISTEN connection, then a commit: the waiter is served."""
    daemon = yield private_daemon()
    sid = new_id()
    client = yield connect_session(daemon.port, sid)
    yield within(daemon.when_logged(f"request {sid} from"))
    killed = execute(
        private_cluster.dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'twisted_novnc-listen'",
    )
    assert killed == [(True,)]
    yield within(daemon.when_logged("database unreachable"))
    row = (sid, "127.0.0.1", vnc_server.port, "up")
    insert_many(private_cluster.dsn, private_cluster.db, [row])
    data = yield within(client.when_received(len(RFB_BANNER)))
    assert data == RFB_BANNER
    yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=2))
    client.sendClose(1000)
    yield within(client.closed)


@pytest_twisted.inlineCallbacks
def test_database_stops_while_hundred_relays_run(private_cluster, private_daemon, vnc_server):
    """The database stops while 100 relays run: every relay keeps moving bytes."""
    # All 100 come from 127.0.0.1 at once: above the default max_waiting_per_ip (64).
    daemon = yield private_daemon(max_waiting_per_ip=200)
    ids = [new_id() for _ in range(100)]
    insert_many(
        private_cluster.dsn, private_cluster.db,
        [(sid, "127.0.0.1", vnc_server.port, "running") for sid in ids],
    )
    clients = []
    for sid in ids:
        clients.append((yield connect_session(daemon.port, sid)))
    for client in clients:
        yield within(client.when_received(len(RFB_BANNER)))
    private_cluster.stop()
    yield within(daemon.when_logged("database unreachable"))
    for i, client in enumerate(clients):
        yield echo_round_trip(client, f"still here {i}".encode())
    assert not any(c.closed.called for c in clients)
    for client in clients:
        client.sendClose(1000)
        yield within(client.closed)


@pytest_twisted.inlineCallbacks
def test_vnc_server_starts_three_seconds_late(daemon_factory, pg, sessions_table):
    """The VNC server starts 3 s after the session is ready: the client still connects."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    reserved = port.getHost().port
    yield port.stopListening()
    daemon = yield daemon_factory()
    sid = new_id()
    insert_ready(pg, sessions_table, sid, reserved)
    client = yield connect_session(daemon.port, sid)
    yield within(daemon.when_logged(f"session {sid} ready"))
    late = VNCEchoFactory()
    listening = []

    def boot() -> None:
        endpoint = TCP4ServerEndpoint(reactor, reserved, interface="127.0.0.1")
        listening.append(endpoint.listen(late))

    reactor.callLater(3, boot)  # the scenario: the VM's VNC server comes up 3 s later
    try:
        data = yield within(client.when_received(len(RFB_BANNER)))
        assert data == RFB_BANNER
        yield echo_round_trip(client, b"booted")
        client.sendClose(1000)
        yield within(client.closed)
    finally:
        for d in listening:
            vnc_port = yield d
            yield vnc_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_vnc_server_dies_mid_relay(daemon_factory, pg, sessions_table, vnc_server):
    """The VNC server dies (its socket is reset) mid-relay: the client sees 4502 within 1 s."""
    daemon = yield daemon_factory()
    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    client = yield connect_session(daemon.port, sid)
    yield within(client.when_received(len(RFB_BANNER)))
    vnc_server.connections[0].transport.abortConnection()  # SO_LINGER 0: a reset, as a crash gives
    code, reason = yield within(client.closed, 1.0)
    assert (code, reason) == (4502, "VM connection lost")


@pytest_twisted.inlineCallbacks
def test_session_ended_with_three_viewers(daemon_factory, pg, sessions_table, vnc_server):
    """The session is ended while 3 viewers watch: all three see 4410 within one second."""
    daemon = yield daemon_factory()
    sid = new_id()
    table = sessions_table.table
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    viewers = []
    for _ in range(3):
        viewer = yield connect_session(daemon.port, sid)
        yield within(viewer.when_received(len(RFB_BANNER)))
        viewers.append(viewer)
    with pg.cursor() as cur:
        cur.execute(f'UPDATE "{table}" SET status = %s WHERE session_id = %s', ("ended", sid))
    results = yield within(defer.gatherResults([v.closed for v in viewers]), 1.0)
    assert results == [(4410, "session ended")] * 3


@pytest_twisted.inlineCallbacks
def test_session_moved_and_deleted_are_revoked(daemon_factory, pg, sessions_table, vnc_server):
    """A new vm_ip closes the relay with 4410 "session moved"; a deleted row with "ended"."""
    daemon = yield daemon_factory()
    table = sessions_table.table
    moved, deleted = new_id(), new_id()
    for sid in (moved, deleted):
        insert_ready(pg, sessions_table, sid, vnc_server.port)
    a = yield connect_session(daemon.port, moved)
    b = yield connect_session(daemon.port, deleted)
    for client in (a, b):
        yield within(client.when_received(len(RFB_BANNER)))
    with pg.cursor() as cur:
        cur.execute(f"UPDATE \"{table}\" SET vm_ip = '10.9.9.9' WHERE session_id = %s", (moved,))
        cur.execute(f'DELETE FROM "{table}" WHERE session_id = %s', (deleted,))
    assert (yield within(a.closed, 1.0)) == (4410, "session moved")
    assert (yield within(b.closed, 1.0)) == (4410, "session ended")


@pytest_twisted.inlineCallbacks
def test_session_expires_while_relayed(daemon_factory, pg, sessions_table, vnc_server):
    """With expires_column set, a live relay is closed with 4410 "session expired" on time,
    and an already expired session is refused."""
    table = sessions_table.table
    with pg.cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" ADD COLUMN expires_at timestamptz')
    daemon = yield daemon_factory({"database": {"expires_column": "expires_at"}})
    soon, past = new_id(), new_id()
    with pg.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{table}" (session_id, vm_ip, vnc_port, status, expires_at)'
            " VALUES (%s, '127.0.0.1', %s, 'running', now() + interval '2 seconds'),"
            " (%s, '127.0.0.1', %s, 'running', now() - interval '1 second')",
            (soon, vnc_server.port, past, vnc_server.port),
        )
    client = yield connect_session(daemon.port, soon)
    yield within(client.when_received(len(RFB_BANNER)))
    assert (yield within(client.closed, 10)) == (4410, "session expired")
    late = yield connect_session(daemon.port, past)
    assert (yield within(late.closed, 10)) == (4410, "session expired")


@pytest_twisted.inlineCallbacks
def test_connect_retry_off_refuses_at_once(daemon_factory, pg, sessions_table):
    """With [upstream] connect_retry = off, a refusing VM gives 4502 without waiting."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    closed_port = port.getHost().port
    yield port.stopListening()
    daemon = yield daemon_factory({"upstream": {"connect_retry": "off"}}, readiness_timeout=60)
    sid = new_id()
    insert_ready(pg, sessions_table, sid, closed_port)
    client = yield connect_session(daemon.port, sid)
    assert (yield within(client.closed, 10)) == (4502, "VM unreachable")


@pytest_twisted.inlineCallbacks
def test_sigterm_drains_then_closes_with_1001(daemon_factory, pg, sessions_table, vnc_server):
    """SIGTERM with live clients: waiters get 4503, each relay 1001 after the drain, the daemon
    exits cleanly, and no socket is left behind."""
    daemon = yield daemon_factory(drain_timeout=1)
    ids = [new_id() for _ in range(3)]
    for sid in ids:
        insert_ready(pg, sessions_table, sid, vnc_server.port)
    clients = []
    for sid in ids:
        client = yield connect_session(daemon.port, sid)
        yield within(client.when_received(len(RFB_BANNER)))
        clients.append(client)
    waiter = yield connect_session(daemon.port, new_id())
    yield within(daemon.when_logged("waiting for readiness", times=4))

    started = time.monotonic()
    daemon.transport.signalProcess(signal.SIGTERM)
    assert (yield within(waiter.closed, 5)) == (4503, "shutting down")
    yield echo_round_trip(clients[0], b"still relaying during the drain")
    results = yield within(defer.gatherResults([c.closed for c in clients]), 10)
    assert [code for code, _ in results] == [1001] * 3
    assert time.monotonic() - started >= 0.9, "relays were closed before the drain ended"
    exit_code = yield within(daemon.ended, 10)
    assert exit_code in (0, None), daemon.output
    assert not Path(f"/proc/{daemon.pid}").exists()
    yield until(lambda: not vnc_server.connections)
    refused = connect_session(daemon.port, new_id())
    with pytest.raises(Exception):  # noqa: B017  (ConnectionRefusedError, wrapped by Twisted)
        yield within(refused, 5)


@pytest_twisted.inlineCallbacks
def test_second_sigterm_closes_at_once(daemon_factory, pg, sessions_table, vnc_server):
    """A second SIGTERM during the drain closes every relay at once."""
    daemon = yield daemon_factory(drain_timeout=300)
    sid = new_id()
    insert_ready(pg, sessions_table, sid, vnc_server.port)
    client = yield connect_session(daemon.port, sid)
    yield within(client.when_received(len(RFB_BANNER)))
    daemon.transport.signalProcess(signal.SIGTERM)
    yield within(daemon.when_logged("draining"))
    daemon.transport.signalProcess(signal.SIGTERM)
    code, _ = yield within(client.closed, 10)
    assert code == 1001
    yield within(daemon.ended, 10)


@pytest_twisted.inlineCallbacks
def test_daemon_starts_without_database(private_cluster, private_daemon, vnc_server):
    """The daemon starts while PostgreSQL is down and serves once it comes up."""
    private_cluster.stop()
    daemon = yield private_daemon(wait_for_database=False, readiness_timeout=60)
    yield within(daemon.when_logged("database unreachable"))
    sid = new_id()
    client = yield connect_session(daemon.port, sid)
    yield within(daemon.when_logged(f"request {sid} from"))
    private_cluster.restart()
    row = (sid, "127.0.0.1", vnc_server.port, "up")
    insert_many(private_cluster.dsn, private_cluster.db, [row])
    data = yield within(client.when_received(len(RFB_BANNER)))
    assert data == RFB_BANNER
    client.sendClose(1000)
    yield within(client.closed)


@pytest_twisted.inlineCallbacks
def test_waiter_deadline_during_outage_is_4503(private_cluster, private_daemon):
    """A waiter whose deadline passes while the database is unreachable gets 4503."""
    daemon = yield private_daemon(readiness_timeout=2)
    private_cluster.stop()
    yield within(daemon.when_logged("database unreachable"))
    client = yield connect_session(daemon.port, new_id())
    assert (yield within(client.closed)) == (4503, "database unavailable")




@pytest_twisted.inlineCallbacks
def test_database_restart_is_quiet_and_served_after(private_cluster, private_daemon, vnc_server):
    """A database restart (stop, start, as an operator or a failover does) is one line each
    way and no traceback: the idle pool and LISTEN connections are lost and come back, and a
    session committed after it is served."""
    daemon = yield private_daemon()
    private_cluster.stop()
    yield within(daemon.when_logged("database unreachable"))
    private_cluster.restart()
    yield within(daemon.when_logged("database reachable again"))
    yield within(daemon.when_logged(LISTENING_FOR_CHANGES, times=2))
    sid = new_id()
    row = (sid, "127.0.0.1", vnc_server.port, "up")
    insert_many(private_cluster.dsn, private_cluster.db, [row])
    client = yield connect_session(daemon.port, sid)
    data = yield within(client.when_received(len(RFB_BANNER)))
    assert data == RFB_BANNER
    client.sendClose(1000)
    yield within(client.closed)
    assert "Unhandled" not in daemon.output and "Traceback" not in daemon.output, daemon.output
