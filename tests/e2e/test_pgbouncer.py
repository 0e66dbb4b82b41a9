"""The daemon through a real PgBouncer (Debian's) in transaction mode: lookups and token
consumption go through the pooler, LISTEN goes straight to PostgreSQL ([database] listen_dsn),
and a session committed late is served."""

from __future__ import annotations

import os
import signal
import uuid

import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted
from daemon_process import DaemonProcess, start_daemon, stop_daemon, write_config
from e2e_support import CollectingProcess, connect_client, until, within
from required_tools import require_pgbouncer
from test_forwarded_haproxy import free_port
from twisted.internet import reactor

from twisted_novnc.front.auth import token_digest
from twisted_novnc.testing import RFB_BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

#: The pooler's database name for the suite's PostgreSQL database.
POOLED = "pooled"


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.fixture
def pgbouncer_pool_size() -> int:
    """PgBouncer's default_pool_size: a module overrides this fixture to have more."""
    return 1


@pytest.fixture
def pgbouncer(postgres_dsn, scratch_dir, pgbouncer_pool_size):
    """A PgBouncer on 127.0.0.1 and a free port, pool_mode = transaction, one server
    connection per pool unless ``pgbouncer_pool_size`` says otherwise (so the daemon's pooled
    connections take turns on it), logging in to
    the suite's PostgreSQL as the suite's DSN says; its clients are trusted by name (auth_file).
    Yields the daemon's DSN through it and a DSN of its admin console."""
    binary = require_pgbouncer()
    server = psycopg2.extensions.parse_dsn(postgres_dsn)
    user = server.get("user") or os.environ.get("PGUSER") or "postgres"
    target = " ".join(f"{k}={_quoted(v)}" for k, v in server.items() if k != "dbname")
    port = free_port()
    auth_file = os.path.join(scratch_dir, "users.txt")
    config = os.path.join(scratch_dir, "pgbouncer.ini")
    with open(auth_file, "w") as f:
        f.write(f'"{user}" ""\n')
    with open(config, "w") as f:
        f.write(
            "[databases]\n"
            f"{POOLED} = {target} dbname={_quoted(server.get('dbname', 'postgres'))}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {auth_file}\nadmin_users = {user}\n"
            "pool_mode = transaction\nmax_client_conn = 50\n"
            f"default_pool_size = {pgbouncer_pool_size}\n"
        )
    for path in (auth_file, config):
        os.chmod(path, 0o644)
    command = [binary, *(["-u", "postgres"] if os.getuid() == 0 else []), config]
    proto = CollectingProcess()
    reactor.spawnProcess(proto, binary, command, env={})

    def answers() -> bool:
        if proto.ended.called:
            raise RuntimeError(f"pgbouncer exited:\n{proto.output}")
        try:
            psycopg2.connect(dsn(POOLED), connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def dsn(dbname: str) -> str:
        return f"host=127.0.0.1 port={port} dbname={dbname} user={user}"

    try:
        pytest_twisted.blockon(until(answers))
        yield dsn(POOLED), dsn("pgbouncer")
    finally:
        if not proto.ended.called:
            proto.transport.signalProcess(signal.SIGTERM)
            pytest_twisted.blockon(within(proto.ended))


def _console(dsn: str, command: str) -> list[dict]:
    """Rows of a PgBouncer admin console command, as dicts."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True  # the console takes no transaction
    try:
        with conn.cursor() as cur:
            cur.execute(command)
            names = [c.name for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()


@pytest_twisted.inlineCallbacks
def test_late_commit_through_pgbouncer_with_a_direct_listen(
    pgbouncer, postgres_dsn, pg, sessions_table, vnc_server, tmp_path
):
    """dsn through PgBouncer (transaction mode, one server connection for the daemon's two),
    listen_dsn direct: a browser that arrives before its session is committed is served once
    it is (readiness by the direct LISTEN, lookup and one-time token through the pooler); a
    replay of the token is refused.  PgBouncer's clients are the pool alone, and the LISTEN
    backend PostgreSQL shows is not one of PgBouncer's server connections."""
    pooled, console = pgbouncer
    table = sessions_table.table
    with pg.cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" ADD COLUMN token_sha256 text')
    config = write_config(
        tmp_path / "pooled.ini", pooled, sessions_table,
        {"database": {"listen_dsn": postgres_dsn},
         "auth": {"mode": "column", "token_column": "token_sha256", "one_time": "on"}},
    )
    daemon = DaemonProcess()
    try:
        yield start_daemon(config, tmp_path, daemon)
        sid, token = str(uuid.uuid4()), "tok-" + uuid.uuid4().hex
        client = yield connect_client(daemon.port, f"/websockify/{sid}?token={token}")
        yield within(daemon.when_logged(rf"request {sid} .*waiting"))
        with pg.cursor() as cur:  # committed late: the browser is already waiting
            cur.execute(
                f'INSERT INTO "{table}" (session_id, vm_ip, vnc_port, status, token_sha256)'
                " VALUES (%s, '127.0.0.1', %s, 'running', %s)",
                (sid, vnc_server.port, token_digest(token)),
            )
        assert (yield within(client.when_received(len(RFB_BANNER)))) == RFB_BANNER
        replay = yield connect_client(daemon.port, f"/websockify/{sid}?token={token}")
        assert (yield within(replay.closed)) == (4403, "token already used")
        with pg.cursor() as cur:
            cur.execute(f'SELECT token_sha256 FROM "{table}" WHERE session_id = %s', (sid,))
            assert cur.fetchone() == (None,)

        clients = _console(console, "SHOW CLIENTS")
        servers = _console(console, "SHOW SERVERS")
        ours = [c for c in clients if c["database"] == POOLED]
        assert len(ours) == 2, clients  # [database] pool_size = 2 (write_config)
        assert {c["application_name"] for c in ours} == {"twisted_novnc-pool"}, clients
        assert len([s for s in servers if s["database"] == POOLED]) <= 1, servers
        with pg.cursor() as cur:
            # (PgBouncer gives its server connections its clients' application_name.)
            cur.execute(
                "SELECT pid, application_name FROM pg_stat_activity"
                " WHERE application_name LIKE 'twisted_novnc-%%'"
            )
            backends = cur.fetchall()
        listening = [pid for pid, name in backends if name == "twisted_novnc-listen"]
        assert len(listening) == 1, backends
        assert listening[0] not in {s["remote_pid"] for s in servers}, (backends, servers)
        client.sendClose(1000)
        assert (yield within(client.closed)) == (1000, None)
    finally:
        yield stop_daemon(daemon)
    assert "Traceback" not in daemon.output, daemon.output[-3000:]
