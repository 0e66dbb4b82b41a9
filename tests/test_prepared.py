"""When the store prepares its statements, and when it stops: database/prepared.py and the
store's own pool (database/pool.py), against fake connections whose server keeps the
prepared names (a direct connection) or changes at each statement (a transaction pooler)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import attrs
import psycopg2
import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import ILogObserver, globalLogPublisher

from twisted_novnc.database.pool import Pool
from twisted_novnc.database.prepared import (
    ALREADY_PREPARED,
    NOT_PREPARED,
    PreparedStatements,
    Statement,
    statement,
)

QUERY = statement("fetch", ["uuid[]"], lambda p: f"SELECT id FROM t WHERE id = ANY({p[0]})")


class ServerError(psycopg2.Error):
    """psycopg2's error with an SQLSTATE, as the server sends it."""

    pgcode: str | None = None


def server_error(code: str) -> ServerError:
    error = type(f"E{code}", (ServerError,), {"pgcode": code})
    return error(f"SQLSTATE {code}")


@attrs.define
class Server:
    """One server connection: the names prepared on it."""

    prepared: set[str] = attrs.field(factory=set)


@attrs.define(eq=False)
class FakeConnection:
    """A pool connection: each statement goes to ``servers`` next (one server: direct; several
    in turn: a transaction pooler), and is recorded."""

    servers: Iterator[Server]
    sent: list[str] = attrs.field(factory=list)
    raw: object = attrs.field(factory=object)
    fail_with: Exception | None = None

    def pollable(self) -> object:
        return self.raw

    def reconnect(self) -> None:
        self.raw = object()

    def runOperation(self, sql: str) -> Deferred[None]:
        return self._run(sql).addCallback(lambda _: None)

    def runQuery(self, sql: str, params: tuple[Any, ...] = ()) -> Deferred[list[tuple[str]]]:
        return self._run(sql)

    def _run(self, sql: str) -> Deferred[list[tuple[str]]]:
        self.sent.append(sql.split()[0])
        server = next(self.servers)
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        name = sql.split()[1].split("(")[0] if sql.split()[0] in ("PREPARE", "EXECUTE") else ""
        if sql.startswith("PREPARE"):
            if name in server.prepared:
                return defer.fail(server_error(ALREADY_PREPARED))
            server.prepared.add(name)
        elif sql.startswith("EXECUTE") and name not in server.prepared:
            return defer.fail(server_error(NOT_PREPARED))
        return defer.succeed([("row",)])


def direct() -> FakeConnection:
    server = Server()
    return FakeConnection(iter(lambda: server, None))


def pooled(*servers: Server) -> FakeConnection:
    """Each statement on the next server connection of the pooler's, in turn."""

    def turns() -> Iterator[Server]:
        while True:
            yield from servers

    return FakeConnection(turns())


@pytest.fixture
def events() -> Iterator[EventLoggingObserver]:
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    yield observer
    globalLogPublisher.removeObserver(cast(ILogObserver, observer))


def run(statements: PreparedStatements, connection: FakeConnection) -> Any:
    d = statements.run(cast(Any, connection), QUERY, (["x"],))
    return d


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the fake answers at once"
    return results[0]


def fallbacks(events: EventLoggingObserver) -> list[Any]:
    return [e for e in events if e.get("event") == "database_unprepared"]


def test_statement_names_carry_a_hash_of_the_sql() -> None:
    """The same SQL gets the same name; other SQL (another table, another id type) another,
    so two configurations sharing a server connection never run each other's statement."""
    again = statement("fetch", ["uuid[]"], lambda p: f"SELECT id FROM t WHERE id = ANY({p[0]})")
    other_table = statement(
        "fetch", ["uuid[]"], lambda p: f"SELECT id FROM u WHERE id = ANY({p[0]})"
    )
    other_type = statement(
        "fetch", ["text[]"], lambda p: f"SELECT id FROM t WHERE id = ANY({p[0]})"
    )
    assert again == QUERY
    assert len({QUERY.name, other_table.name, other_type.name}) == 3
    assert QUERY.name.startswith("twisted_novnc_fetch_")
    assert Statement(
        name=QUERY.name,
        plain="SELECT id FROM t WHERE id = ANY(%s::uuid[])",
        prepare=f"PREPARE {QUERY.name}(uuid[]) AS SELECT id FROM t WHERE id = ANY($1)",
        execute=f"EXECUTE {QUERY.name}(%s::uuid[])",
    ) == QUERY


def test_untyped_parameters_are_left_to_the_server() -> None:
    """A parameter with no type is not declared in PREPARE (the server infers it) nor cast."""
    consume = statement(
        "consume", ["uuid", ""], lambda p: f"UPDATE t WHERE a = {p[0]} AND b = {p[1]}"
    )
    assert consume.prepare.startswith(f"PREPARE {consume.name}(uuid) AS ")
    assert consume.execute == f"EXECUTE {consume.name}(%s::uuid, %s)"
    assert consume.plain == "UPDATE t WHERE a = %s::uuid AND b = %s"


def test_off_never_prepares() -> None:
    """off: the plain query, every time."""
    statements, connection = PreparedStatements("off"), direct()
    for _ in range(3):
        assert result_of(run(statements, connection)) == [("row",)]
    assert connection.sent == ["SELECT"] * 3 and not statements.prepared


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_direct_connection_prepares_once(mode: str, events: EventLoggingObserver) -> None:
    """auto and on, directly connected: PREPARE once per connection, then EXECUTE only."""
    statements, a, b = PreparedStatements(mode), direct(), direct()
    for _ in range(3):
        assert result_of(run(statements, a)) == [("row",)]
        assert result_of(run(statements, b)) == [("row",)]
    assert a.sent == b.sent == ["PREPARE", "EXECUTE", "EXECUTE", "EXECUTE"]
    assert statements.prepared and not fallbacks(events)


def test_a_reconnected_connection_prepares_again() -> None:
    """After a reconnect (a new psycopg2 connection, a new server connection) the statement
    is prepared again before it runs."""
    statements = PreparedStatements("auto")
    server = Server()
    connection = FakeConnection(iter(lambda: server, None))
    run(statements, connection)
    connection.reconnect()
    server.prepared.clear()  # the new backend knows nothing
    assert result_of(run(statements, connection)) == [("row",)]
    assert connection.sent == ["PREPARE", "EXECUTE", "PREPARE", "EXECUTE"]
    assert statements.prepared


def test_auto_falls_back_when_execute_meets_another_server(
    events: EventLoggingObserver,
) -> None:
    """auto behind a transaction pooler: PREPARE on one server connection, EXECUTE on another
    (26000): the same query again unprepared at once (the caller sees rows, not an error),
    one database_unprepared line, and unprepared for good."""
    statements, connection = PreparedStatements("auto"), pooled(Server(), Server())
    assert result_of(run(statements, connection)) == [("row",)]
    assert connection.sent == ["PREPARE", "EXECUTE", "SELECT"]
    assert not statements.prepared and statements.mode == "off"
    for _ in range(3):
        assert result_of(run(statements, connection)) == [("row",)]
    assert connection.sent[3:] == ["SELECT"] * 3
    [line] = fallbacks(events)
    assert line["sqlstate"] == NOT_PREPARED and line["log_level"].name == "warn"


def test_auto_falls_back_when_prepare_meets_a_server_that_has_it(
    events: EventLoggingObserver,
) -> None:
    """auto, and a second client connection PREPAREs on the server connection the first one
    prepared on (42P05): the same fallback, once, however many connections meet it."""
    shared = Server()
    statements = PreparedStatements("auto")
    first, second = pooled(shared), pooled(shared)
    assert result_of(run(statements, first)) == [("row",)]
    assert result_of(run(statements, second)) == [("row",)]
    assert second.sent == ["PREPARE", "SELECT"] and not statements.prepared
    assert result_of(run(statements, first)) == [("row",)]
    assert first.sent == ["PREPARE", "EXECUTE", "SELECT"]
    [line] = fallbacks(events)
    assert line["sqlstate"] == ALREADY_PREPARED


def test_fallbacks_in_flight_retry_without_a_second_line(events: EventLoggingObserver) -> None:
    """Two queries meet the pooler at once: both retried unprepared, one line."""
    statements = PreparedStatements("auto")
    waiting: list[Deferred[list[tuple[str]]]] = []

    @attrs.define(eq=False)
    class Slow(FakeConnection):
        def runQuery(self, sql: str, params: tuple[Any, ...] = ()) -> Deferred[Any]:
            if sql.startswith("EXECUTE"):
                self.sent.append("EXECUTE")
                waiting.append(Deferred())
                return waiting[-1]
            return super().runQuery(sql, params)

    a, b = Slow(iter(Server, None)), Slow(iter(Server, None))
    da, db = run(statements, a), run(statements, b)
    for d in waiting:
        d.errback(server_error(NOT_PREPARED))
    assert result_of(da) == result_of(db) == [("row",)]
    assert a.sent == b.sent == ["PREPARE", "EXECUTE", "SELECT"]
    assert len(fallbacks(events)) == 1


def test_on_reports_the_error_and_prepares_again(events: EventLoggingObserver) -> None:
    """on (the operator says: direct): a 26000 is the query's error (the gate retries), the
    connection's account is put right, and the next query prepares again; no fallback."""
    server = Server()
    statements, connection = PreparedStatements("on"), FakeConnection(iter(lambda: server, None))
    run(statements, connection)
    server.prepared.clear()  # e.g. someone ran DEALLOCATE ALL on this backend
    failure = result_of(run(statements, connection))
    assert failure.value.pgcode == NOT_PREPARED
    assert result_of(run(statements, connection)) == [("row",)]
    assert connection.sent == ["PREPARE", "EXECUTE", "EXECUTE", "PREPARE", "EXECUTE"]
    assert statements.prepared and not fallbacks(events)


def test_other_errors_pass_through_and_change_nothing(events: EventLoggingObserver) -> None:
    """A database error that is no pooler's sign (the server went away) is the query's
    error; auto stays prepared."""
    statements, connection = PreparedStatements("auto"), direct()
    connection.fail_with = psycopg2.OperationalError("server closed the connection")
    assert result_of(run(statements, connection)).check(psycopg2.OperationalError)
    connection.fail_with = None
    assert result_of(run(statements, connection)) == [("row",)]
    assert statements.prepared and not fallbacks(events)


def test_pool_runs_on_a_free_connection_and_queues_the_rest() -> None:
    """The pool gives each piece of work a free connection; when none is, the work waits and
    runs, in order, on the first one freed (whatever the outcome of the work before)."""
    pool = Pool(["a", "b"])
    pending: dict[str, Deferred[str]] = {}

    def work(connection: str) -> Deferred[str]:
        pending[connection] = Deferred()
        return pending[connection]

    first = pool.run(work)
    [taken] = pending
    second = pool.run(work)
    order: list[str] = []
    third = pool.run(lambda c: defer.succeed(order.append(c) or c))
    fourth = pool.run(lambda c: defer.succeed(order.append(c) or c))
    assert sorted(pending) == ["a", "b"] and pool.queued == 2 and not order
    on_b, on_a = (first, second) if taken == "b" else (second, first)
    pending["b"].errback(RuntimeError("failed"))
    assert result_of(on_b).check(RuntimeError)
    assert order == ["b", "b"] and pool.queued == 0  # b served both, one after the other
    pending["a"].callback("done")
    assert result_of(on_a) == "done"
    assert result_of(third) == result_of(fourth) == "b"


def test_pool_skips_cancelled_waiters() -> None:
    """Work cancelled while it waited never runs, and its turn goes to the next."""
    pool = Pool(["a"])
    held: Deferred[str] = Deferred()
    pool.run(lambda c: held)
    ran: list[str] = []
    cancelled = pool.run(lambda c: defer.succeed(ran.append("cancelled") or c))
    waiting = pool.run(lambda c: defer.succeed(ran.append("next") or c))
    cancelled.cancel()
    held.callback("x")
    assert ran == ["next"] and result_of(waiting) == "a"
    assert result_of(cancelled).check(defer.CancelledError)


def test_pool_prefers_a_usable_connection() -> None:
    """A connection being re-established is passed over while another is free (the most
    recently freed usable one is taken); while every usable one is busy, work waits for one
    rather than meeting the dead one (after a database restart, a browser's lookup would fail
    and wait for the gate's retry)."""
    dead = {"b"}
    pool = Pool(["a", "b", "c"], usable=lambda c: c not in dead)
    taken: list[str] = []
    pool.run(lambda c: defer.succeed(taken.append(c)))
    assert taken == ["c"]
    held: list[Deferred[None]] = []

    def hold(c: str) -> Deferred[None]:
        taken.append(c)
        held.append(Deferred())
        return held[-1]

    pool.run(hold)
    pool.run(hold)
    assert taken == ["c", "c", "a"]
    waiting = pool.run(lambda c: defer.succeed(taken.append(c) or c))
    assert taken == ["c", "c", "a"] and pool.queued == 1
    held[1].callback(None)  # "a" is free again: the waiting work runs there, not on "b"
    assert result_of(waiting) == "a" and pool.queued == 0


def test_pool_wakes_waiting_work_when_a_connection_comes_back() -> None:
    """Work waiting for a usable connection runs as soon as an idle one is usable again (the
    store calls ``wake`` from each connection's recovery), not only when another is freed."""
    dead = {"b"}
    pool = Pool(["a", "b"], usable=lambda c: c not in dead)
    held: Deferred[None] = Deferred()
    pool.run(lambda c: held)  # on "a"
    waiting = pool.run(lambda c: defer.succeed(c))
    pool.wake()
    assert pool.queued == 1  # "b" is idle but still dead
    dead.clear()
    pool.wake()
    assert result_of(waiting) == "b" and pool.queued == 0


def test_pool_with_no_usable_connection_fails_fast() -> None:
    """In an outage (no connection usable) work takes a dead connection and fails there at
    once, for the readiness gate to retry on its backoff, rather than waiting out the outage;
    work queued behind busy ones does the same once they are freed dead."""
    dead = {"a", "b"}
    pool = Pool(["a", "b"], usable=lambda c: c not in dead)
    ran: list[str] = []
    pool.run(lambda c: defer.succeed(ran.append(c)))
    assert ran == ["b"]
    dead.discard("a")
    held: Deferred[None] = Deferred()
    pool.run(lambda c: held)  # on "a", the usable one
    queued = pool.run(lambda c: defer.succeed(ran.append(c) or c))
    assert pool.queued == 1  # a usable connection is busy: wait for it
    dead.add("a")  # ... which dies under its query
    held.errback(RuntimeError("connection lost"))
    assert result_of(queued) in ("a", "b") and pool.queued == 0


def test_pool_work_that_raises_frees_its_connection() -> None:
    """Work raising instead of returning a Deferred fails its own Deferred, not the pool."""

    def broken(connection: str) -> Deferred[str]:
        raise ValueError(connection)

    pool = Pool(["a"])
    assert result_of(pool.run(broken)).check(ValueError)
    assert result_of(pool.run(lambda c: defer.succeed(c))) == "a"
