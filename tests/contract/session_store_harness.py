"""Every implementation of the session interfaces, each with a way to commit rows into it.

The contract suite (``test_session_store_contract.py``) runs once per implementation built here
(``conftest.py`` hands them out as the ``harness`` fixture): the in-memory fake, and the
PostgreSQL store on the suite's real server with a table of its own.  A new implementation
joins with a builder here and a parameter there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import psycopg2
import pytest_twisted
from twisted.internet import defer, reactor

from twisted_novnc.config import parse_config
from twisted_novnc.database.embedded import apply_sql
from twisted_novnc.database.store import PostgresSessionStore
from twisted_novnc.session import SessionRow, VNCCredentials
from twisted_novnc.testing import MemorySessionSource

#: How long the store may take to connect and LISTEN on a busy machine.
LIMIT = 30.0

#: Id column types the suite checks: the reference schema's uuid, integers, and text.
ID_TYPES = ("uuid", "integer", "bigint", "text")


@attrs.frozen
class Harness:
    """One implementation under test, with the id column type it was built for."""

    #: Provides ISessionSource and ITokenStore.
    source: Any
    id_type: str
    #: Commit a row (its ``session_id`` canonical), as the system that owns the table would.
    put: Callable[[SessionRow], None]


def memory(id_type: str) -> Harness:
    """The fake, its rows a dict."""
    source = MemorySessionSource(id_type=id_type)

    def put(row: SessionRow) -> None:
        source.rows[row.session_id] = row

    return Harness(source, id_type, put)


@attrs.define
class _Listening:
    """A store observer that only says when LISTEN (and so the lookup query) is ready."""

    ready: defer.Deferred[None] = attrs.field(factory=defer.Deferred)

    def notified(self, session_id: str) -> None:
        pass

    def listening(self) -> None:
        if not self.ready.called:
            self.ready.callback(None)

    def not_listening(self) -> None:
        pass


def postgres(dsn: str, id_type: str) -> Iterator[Harness]:
    """The store on a table of its own whose id column has type ``id_type``, once listening;
    stopped and the table dropped afterwards."""
    name = "contract_" + uuid.uuid4().hex[:12]
    settings = parse_config(
        f"[database]\ndsn = {dsn}\ntable = {name}\nport_column = vnc_port\n"
        f"expires_column = expires_at\nnotify_channel = {name}\n",
        "<contract>",
    ).database
    apply_sql(
        dsn,
        f'CREATE TABLE "{name}" (session_id {id_type} PRIMARY KEY, vm_ip text,'
        " vnc_port integer, status text, expires_at timestamptz, token_digest text,"
        " vnc_password text, vnc_user text, record boolean)",
    )
    connection = psycopg2.connect(dsn)
    connection.autocommit = True

    def put(row: SessionRow) -> None:
        credentials = row.credentials or VNCCredentials()
        with connection.cursor() as cursor:
            cursor.execute(
                f'INSERT INTO "{name}" (session_id, vm_ip, vnc_port, status, expires_at,'
                " token_digest, vnc_password, vnc_user, record)"
                " VALUES (%s, %s, %s, %s, to_timestamp(%s), %s, %s, %s, %s)",
                (row.session_id, row.vm_ip, row.port, row.status, row.expires_at,
                 row.token_digest, credentials.password, credentials.username, row.record),
            )

    observer = _Listening()
    store = PostgresSessionStore(
        settings, lambda: dsn, reactor, observer, token_column="token_digest",
        password_column="vnc_password", username_column="vnc_user", record_column="record",
    )
    store.start()
    try:
        pytest_twisted.blockon(observer.ready.addTimeout(LIMIT, reactor))
        # Listening says nothing of the pool: a query on a connection still connecting fails.
        assert pytest_twisted.blockon(store.when_pool_connected().addTimeout(LIMIT, reactor))
        yield Harness(store, id_type, put)
    finally:
        store.stop()
        connection.close()
        apply_sql(dsn, f'DROP TABLE IF EXISTS "{name}"')
