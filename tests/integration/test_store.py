"""The PostgreSQL session store and the in-process service against the real cluster."""

from __future__ import annotations

import random
import uuid

import attrs
import psycopg2
import pytest
import pytest_twisted
from db_fixtures import create_sessions_table
from psycopg2.extensions import connection, make_dsn
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from twisted_novnc.config import parse_config
from twisted_novnc.database.ids import normalise_id
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.database.store import DatabaseNotReady, PostgresSessionStore
from twisted_novnc.processes.service import make_service
from twisted_novnc.session import SessionRow
from twisted_novnc.testing import every_service, recording_client_factory

pytestmark = pytest.mark.integration

LIMIT = 30.0


@attrs.define
class RecordingObserver:
    notified_ids: list[str] = attrs.field(factory=list)
    listening_count: int = 0
    when_listening: defer.Deferred[None] = attrs.field(factory=defer.Deferred)
    _waiting: list = attrs.field(factory=list)

    def notified(self, session_id: str) -> None:
        self.notified_ids.append(session_id)
        for sid, d in list(self._waiting):
            if sid == session_id:
                self._waiting.remove((sid, d))
                d.callback(sid)

    def when_notified(self, session_id: str) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self._waiting.append((session_id, d))
        return d.addTimeout(LIMIT, reactor)

    def listening(self) -> None:
        self.listening_count += 1
        if not self.when_listening.called:
            self.when_listening.callback(None)

    def not_listening(self) -> None:
        pass


@pytest.fixture
def store(postgres_dsn, sessions_table):
    observer = RecordingObserver()
    store = PostgresSessionStore(sessions_table, lambda: postgres_dsn, reactor, observer)
    store.start()
    pytest_twisted.blockon(observer.when_listening.addTimeout(LIMIT, reactor))
    yield store
    store.stop()


def insert(pg, table, sid, vm_ip=None, port=None, status="pending"):
    with pg.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{table}" (session_id, vm_ip, vnc_port, status) VALUES (%s,%s,%s,%s)',
            (sid, vm_ip, port, status),
        )


@pytest_twisted.inlineCallbacks
def test_fetch_reads_committed_rows(store, pg, sessions_table):
    """fetch returns the committed rows of the named sessions in one query, absent ids absent."""
    a, b, missing = (str(uuid.uuid4()) for _ in range(3))
    insert(pg, sessions_table.table, a, "10.0.0.5", 5901, "running")
    insert(pg, sessions_table.table, b, None, None, "pending")
    rows = yield store.fetch([a, b, missing])
    assert rows == {
        a: SessionRow(a, "10.0.0.5", 5901, "running"),
        b: SessionRow(b, None, None, "pending"),
    }
    assert store.id_type == "uuid"


def candidate_ids(count: int = 400) -> list[str]:
    """Ids to try: edge cases, UUIDs in every spelling, integers around every range's ends,
    and seeded random strings of URL characters (with a few that test the edges)."""
    rng = random.Random(15)
    ids = ["", "-", "-0", "007", "--5", "+7", " 7", "0x1F", "1_000", "\u00b2", "\u0663", "a\x00b"]
    for _ in range(20):
        u = uuid.UUID(int=rng.getrandbits(128))
        ids += [str(u), str(u).upper(), u.hex, "{" + str(u) + "}", f"urn:uuid:{u}"]
    for bits in (15, 31, 63):
        for edge in (2**bits, -(2**bits)):
            ids += [str(edge + d) for d in (-1, 0, 1)] + [f"00{edge}"]
    alphabet = "0123456789abcdefABCDEFxX-._~{}+ "
    while len(ids) < count:
        ids.append("".join(rng.choices(alphabet, k=rng.randrange(1, 40))))
    return ids


def as_postgres_prints(pg: connection, raw: str, column_type: str) -> str | None:
    """``raw`` read as a value of ``column_type`` and printed back, or None if refused."""
    try:
        with pg.cursor() as cur:
            cur.execute(f"SELECT %s::{column_type}::text", (raw,))
            return cur.fetchone()[0]
    except (psycopg2.DataError, ValueError):  # ValueError: psycopg2 refuses a NUL itself
        return None


@pytest.mark.parametrize("column_type", ["uuid", "smallint", "integer", "bigint", "text"])
def test_normalise_id_agrees_with_postgresql(pg: connection, column_type: str) -> None:
    """normalise_id never disagrees with PostgreSQL on which row an id names.

    What it accepts, PostgreSQL reads as the same row and prints unchanged; what PostgreSQL
    prints, it keeps as is.  It may refuse spellings PostgreSQL would read (a plus sign, hex).
    """
    for raw in candidate_ids():
        ours = normalise_id(raw, column_type)
        theirs = as_postgres_prints(pg, raw, column_type)
        if ours is not None:
            assert as_postgres_prints(pg, ours, column_type) == ours, raw
            if theirs is not None:
                assert ours == theirs, raw
        if theirs is not None:
            assert normalise_id(theirs, column_type) == theirs, raw


@pytest_twisted.inlineCallbacks
def test_notify_arrives_only_at_commit(store, pg_factory, sessions_table):
    """The trigger's NOTIFY reaches the LISTEN connection when the transaction commits."""
    sid = str(uuid.uuid4())
    backend = pg_factory(autocommit=False)
    with backend.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{sessions_table.table}" (session_id) VALUES (%s)', (sid,)
        )
    # A second, committed change proves notifications flow while the first is still open.
    witness = str(uuid.uuid4())
    insert(pg_factory(), sessions_table.table, witness)
    yield store.observer.when_notified(witness)
    assert sid not in store.observer.notified_ids
    backend.commit()
    yield store.observer.when_notified(sid)


@pytest.mark.parametrize("column", ["ip_column", "record_column"])
@pytest_twisted.inlineCallbacks
def test_missing_column_keeps_store_unready(postgres_dsn, sessions_table, column):
    """A config naming a column the table lacks ([database] ip_column, or [record]
    record_column) never listens, and says why in the log."""
    from twisted.logger import globalLogPublisher

    broken, extra = sessions_table, {}
    if column == "ip_column":
        broken = attrs.evolve(sessions_table, ip_column="no_such_column")
    else:
        extra = {"record_column": "no_such_column"}
    seen: defer.Deferred[dict] = defer.Deferred()

    def observe(event):
        text = event.get("log_format", "")
        if "cannot listen" in text and not seen.called:
            seen.callback(event)

    globalLogPublisher.addObserver(observe)
    observer = RecordingObserver()
    store = PostgresSessionStore(broken, lambda: postgres_dsn, reactor, observer, **extra)
    try:
        store.start()
        event = yield seen.addTimeout(LIMIT, reactor)
        assert "no_such_column" in event["error"]
        assert not store.is_listening and observer.listening_count == 0
    finally:
        globalLogPublisher.removeObserver(observe)
        store.stop()


@pytest_twisted.inlineCallbacks
def test_client_leaving_while_waiting_leaves_nothing(postgres_dsn, sessions_table):
    """In the real service, a browser that leaves while waiting leaves no waiter or timer."""
    settings = parse_config(
        "[novnc]\nlisten = tcp:0:interface=127.0.0.1\nreadiness_timeout = 60\n"
        f"[database]\ndsn = {postgres_dsn}\ntable = {sessions_table.table}\n"
        f"port_column = vnc_port\nnotify_channel = {sessions_table.notify_channel}\n",
        "<test>",
    )
    service = make_service(settings, reactor)
    service.privilegedStartService()
    service.startService()
    try:
        listener = next(s for s in every_service(service) if hasattr(s, "_waitingForPort"))
        port = (yield listener._waitingForPort).getHost().port
        gate = next(s for s in every_service(service) if hasattr(s, "gate")).gate
        assert isinstance(gate, ReadinessGate)
        before = set(reactor.getDelayedCalls())
        factory = recording_client_factory(f"ws://127.0.0.1:{port}/websockify/{uuid.uuid4()}")
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), factory.buildProtocol(None)
        )
        while gate.waiting == 0:
            yield deferLater0()
        timers = set(reactor.getDelayedCalls()) - before
        assert any(abs(t.getTime() - reactor.seconds() - 60) < 5 for t in timers)
        client.transport.loseConnection()
        yield client.closed
        while gate.waiting:
            yield deferLater0()
        leftover = [t for t in reactor.getDelayedCalls() if t.getTime() - reactor.seconds() > 50]
        assert leftover == []
    finally:
        yield service.stopService()


def deferLater0() -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, 0, lambda: None)


@pytest.fixture
def own_database(postgres_dsn):
    """A database of its own (its connections can be refused without touching the others'):
    (dsn, name); dropped after, with whatever is still connected."""
    name = "tn_pool_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(postgres_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_dsn(postgres_dsn, dbname=name), name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


def logged(event_name: str) -> defer.Deferred[dict]:
    """Fires with the next log event called ``event_name``."""
    from twisted.logger import globalLogPublisher

    seen: defer.Deferred[dict] = defer.Deferred()

    def observe(event: dict) -> None:
        if event.get("event") == event_name and not seen.called:
            globalLogPublisher.removeObserver(observe)
            seen.callback(event)

    globalLogPublisher.addObserver(observe)
    return seen.addTimeout(LIMIT, reactor)


@pytest_twisted.inlineCallbacks
def test_lookups_wait_for_a_live_connection_while_another_reconnects(own_database):
    """One pool connection dies and cannot come back yet (the database refuses new
    connections): lookups queue on the live one rather than meet the dead one (each would fail
    and wait for the gate's retry, as after every database restart); with none live, a lookup
    fails at once and says why; once connections are accepted again, lookups are served."""
    dsn, name = own_database
    settings = attrs.evolve(create_sessions_table(dsn), pool_size=2)
    sid = str(uuid.uuid4())
    pg = psycopg2.connect(dsn)
    pg.autocommit = True
    insert(pg, settings.table, sid, "127.0.0.1", 5900, "running")
    admin = psycopg2.connect(make_dsn(dsn, dbname="postgres"))
    admin.autocommit = True

    def sql(statement: str) -> list[tuple]:
        with admin.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []

    observer = RecordingObserver()
    store = PostgresSessionStore(settings, lambda: dsn, reactor, observer)
    store.start()
    try:
        yield observer.when_listening.addTimeout(LIMIT, reactor)
        assert (yield store.when_pool_connected())
        sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        pids = [pid for (pid,) in sql(
            "SELECT pid FROM pg_stat_activity"
            f" WHERE datname = '{name}' AND application_name = 'twisted_novnc-pool'"
        )]
        assert len(pids) == 2
        unreachable = logged("database_unreachable")
        sql(f"SELECT pg_terminate_backend({pids[0]})")
        yield unreachable
        found = yield defer.gatherResults([store.fetch([sid]) for _ in range(6)])
        assert [sorted(rows) for rows in found] == [[sid]] * 6
        sql(f"SELECT pg_terminate_backend({pids[1]})")
        errors = []
        for _ in range(3):  # a lookup meeting the second death first fails with psycopg2's error
            try:
                yield store.fetch([sid])
            except Exception as e:
                errors.append(e)
                if isinstance(e, DatabaseNotReady):
                    break
        assert isinstance(errors[-1], DatabaseNotReady), errors
        assert str(errors[-1]) == "no database connection is up; reconnecting"
        reachable = logged("database_reachable")
        sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        yield reachable
        assert sorted((yield store.fetch([sid]))) == [sid]
    finally:
        store.stop()
        pg.close()
        admin.close()
