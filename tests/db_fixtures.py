"""Per-test sessions tables: each test gets its own table and NOTIFY channel on the shared
cluster, so tests (and the daemons they start) never see each other's sessions."""

from __future__ import annotations

import uuid

import psycopg2
import pytest

from twisted_novnc.config import parse_config
from twisted_novnc.database.embedded import apply_sql
from twisted_novnc.database.schema import schema_sql


def create_sessions_table(dsn: str, prefix: str = "sessions_"):
    """DatabaseSettings for a new table (with a port column) and its own NOTIFY channel."""
    name = prefix + uuid.uuid4().hex[:12]
    settings = parse_config(
        f"[database]\ndsn = {dsn}\ntable = {name}\nport_column = vnc_port\n"
        f"notify_channel = {name}\n",
        "<test>",
    ).database
    apply_sql(dsn, schema_sql(settings))
    return settings


def drop_sessions_table(dsn: str, settings) -> None:
    apply_sql(dsn, f'DROP TABLE IF EXISTS "{settings.table}"')


@pytest.fixture
def sessions_table(postgres_dsn):
    """DatabaseSettings for a fresh table (with a port column) and channel; dropped after."""
    settings = create_sessions_table(postgres_dsn)
    yield settings
    drop_sessions_table(postgres_dsn, settings)


@pytest.fixture
def pg_factory(postgres_dsn):
    """Open extra psycopg2 connections (e.g. a backend mid-transaction); closed after."""
    opened = []

    def connect(autocommit: bool = True):
        conn = psycopg2.connect(postgres_dsn)
        conn.autocommit = autocommit
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def insert_session(pg, db, session_id, vm_ip=None, port=None, status="pending") -> None:
    """Commit one session row into the test table ``db`` (``pg`` is an autocommit connection)."""
    with pg.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{db.table}" (session_id, vm_ip, "{db.port_column}", status)'
            " VALUES (%s, %s, %s, %s)",
            (session_id, vm_ip, port, status),
        )


def insert_ready(pg, db, session_id, port) -> None:
    """Commit a running session whose VM is on loopback at ``port``."""
    insert_session(pg, db, session_id, "127.0.0.1", port, "running")
