"""The store's queries as SQL prepared statements, and when to stop preparing them.

psycopg2 has no protocol-level prepare, so a statement is prepared with SQL ``PREPARE`` on
each server connection and run with ``EXECUTE``: PostgreSQL plans it once (about 40 µs of a
lookup, bench/README.md).  A prepared statement lives on one server connection, which a
pooler in transaction mode swaps under its client at every transaction -- PgBouncer 1.21's
``max_prepared_statements`` too, which tracks protocol-level prepares only.  The first sign
of one (EXECUTE on a server connection that never prepared the statement, PREPARE on one
that already has it) turns ``auto`` to unprepared for good, and that query runs again
unprepared at once: it did not run, so nothing happens twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import psycopg2.errorcodes
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from txpostgres import txpostgres

from twisted_novnc._compat.txpostgres import server_connection

_log = Logger()

#: EXECUTE of a name this server connection does not know; PREPARE of one it already knows.
NOT_PREPARED = psycopg2.errorcodes.INVALID_SQL_STATEMENT_NAME  # 26000
ALREADY_PREPARED = psycopg2.errorcodes.DUPLICATE_PREPARED_STATEMENT  # 42P05


@attrs.frozen
class Statement:
    """One query, as SQL to run unprepared and as PREPARE/EXECUTE under a name of its own."""

    name: str
    plain: str
    prepare: str
    execute: str


def statement(
    kind: str, types: Sequence[str], build: Callable[[Sequence[str]], str]
) -> Statement:
    """The query ``build`` writes around its placeholders, with parameters of these types
    ("" = the server infers it; only after the typed ones).  The name ends with a hash of
    the prepared text, so two configurations sharing a server connection never collide."""
    typed = [t for t in types if t]
    assert list(types[: len(typed)]) == typed, "untyped parameters come last"
    body = build([f"${n}" for n in range(1, len(types) + 1)])
    params = [f"%s::{t}" if t else "%s" for t in types]
    digest = hashlib.sha256(f"{typed} {body}".encode()).hexdigest()[:12]
    name = f"twisted_novnc_{kind}_{digest}"
    return Statement(
        name=name,
        plain=build(params),
        prepare=f"PREPARE {name}({', '.join(typed)}) AS {body}",
        execute=f"EXECUTE {name}({', '.join(params)})",
    )


@attrs.define(eq=False)
class PreparedStatements:
    """Runs statements on pool connections, prepared or not as ``[database]
    prepared_statements`` (``auto``, ``on``, ``off``) and what has been seen say."""

    #: The setting as it stands: ``auto`` becomes ``off`` at the first sign of a pooler.
    mode: str
    #: Each pool connection's psycopg2 connection (a new one after a reconnect, with nothing
    #: prepared on it) and the names prepared on that.
    _on: dict[txpostgres.Connection, tuple[object, set[str]]] = attrs.field(factory=dict)

    @property
    def prepared(self) -> bool:
        return self.mode != "off"

    def forget(self) -> None:
        """Nothing is prepared anywhere (the store starts over with new connections)."""
        self._on.clear()

    def run(
        self, connection: txpostgres.Connection, query: Statement, params: tuple[Any, ...]
    ) -> Deferred[Any]:
        """The query's rows from ``connection``: prepared there first if it is not yet."""
        if not self.prepared:
            return connection.runQuery(query.plain, params)
        raw = server_connection(connection)
        known = self._on.get(connection)
        if known is None or known[0] is not raw:
            known = self._on[connection] = (raw, set())
        names = known[1]
        if query.name in names:
            d = connection.runQuery(query.execute, params)
        else:
            d = connection.runOperation(query.prepare)

            def prepared(_: object) -> Deferred[Any]:
                names.add(query.name)
                return connection.runQuery(query.execute, params)

            d.addCallback(prepared)
        return d.addErrback(self._failed, connection, query, params, names)

    def _failed(
        self, f: Any, connection: txpostgres.Connection, query: Statement,
        params: tuple[Any, ...], names: set[str],
    ) -> Any:
        """With ``auto``, a pooler's sign: this query again unprepared at once, and every
        later one.  With ``on`` (a direct connection, by the operator's word), the error
        (the readiness gate retries), and this connection's account put right."""
        code = getattr(f.value, "pgcode", None)
        if code not in (NOT_PREPARED, ALREADY_PREPARED):
            return f
        if self.mode == "on":
            if code == NOT_PREPARED:
                names.discard(query.name)
            else:
                names.add(query.name)
            return f
        if self.mode == "auto":
            self.mode = "off"
            self._on.clear()
            _log.warn(
                "prepared statements do not last on this database connection (SQLSTATE"
                " {sqlstate}: {error}): a pooler in transaction mode, probably; running queries"
                " unprepared from now on ([database] prepared_statements = off says so at once)",
                event="database_unprepared", sqlstate=code,
                error=" ".join(f.getErrorMessage().split()),
            )
        return connection.runQuery(query.plain, params)
