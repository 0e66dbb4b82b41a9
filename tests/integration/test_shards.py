"""LISTEN per shard ([database] notify_shards) against the real cluster: the trigger's shard is
the daemon's, and a commit racing the shard's LISTEN is still seen."""

from __future__ import annotations

import uuid

import attrs
import pytest
import pytest_twisted
from test_store import LIMIT, candidate_ids, insert
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher

from twisted_novnc.database.channels import shard_of
from twisted_novnc.database.embedded import apply_sql
from twisted_novnc.database.ids import normalise_id
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.database.schema import trigger_sql
from twisted_novnc.database.store import PostgresSessionStore

pytestmark = pytest.mark.integration

SHARDS = 97


@pytest.mark.parametrize("column_type", ["uuid", "integer", "bigint", "text"])
def test_trigger_shard_is_shard_of(pg, sessions_table, column_type: str) -> None:
    """For every id the column holds, the trigger NOTIFYs <channel>_<shard_of(id)>, with the id
    as normalise_id prints it."""
    db = attrs.evolve(
        sessions_table, table=f"shard_probe_{uuid.uuid4().hex[:8]}", notify_shards=SHARDS
    )
    with pg.cursor() as cur:
        cur.execute(f'CREATE TABLE "{db.table}" (session_id {column_type} PRIMARY KEY)')
        cur.execute(trigger_sql(db))
        for shard in range(SHARDS):
            cur.execute(f'LISTEN "{db.notify_channel}_{shard}"')
        raws = candidate_ids(600) + [str(uuid.UUID(int=i * 7919)) for i in range(300)]
        raws += [str(n * 104729) for n in range(-150, 150)] + ["é" * n + "ß€" for n in range(5)]
        ids = {normalise_id(raw, column_type) for raw in raws} - {None}
        for i in sorted(ids):
            cur.execute(f'INSERT INTO "{db.table}" VALUES (%s)', (i,))
        pg.poll()
        got = [(n.channel, n.payload) for n in pg.notifies]
        cur.execute(f'DROP TABLE "{db.table}"')
    assert len(got) == len(ids) > 250
    assert {p for _, p in got} == ids
    for channel, payload in got:
        assert channel == f"{db.notify_channel}_{shard_of(payload, SHARDS)}", payload


def test_two_argument_trigger_notifies_the_one_channel(pg, sessions_table) -> None:
    """A trigger installed by an older version (two arguments) goes on NOTIFYing the channel."""
    with pg.cursor() as cur:
        cur.execute(f'DROP TRIGGER twisted_novnc_notify ON "{sessions_table.table}"')
        cur.execute(
            f'CREATE TRIGGER twisted_novnc_notify AFTER INSERT ON "{sessions_table.table}"'
            f" FOR EACH ROW EXECUTE FUNCTION twisted_novnc_notify"
            f"('{sessions_table.notify_channel}', 'session_id')"
        )
        cur.execute(f'LISTEN "{sessions_table.notify_channel}"')
        sid = str(uuid.uuid4())
        insert(pg, sessions_table.table, sid)
        pg.poll()
        assert [(n.channel, n.payload) for n in pg.notifies] == [
            (sessions_table.notify_channel, sid)
        ]


@pytest.fixture
def sharded(postgres_dsn, sessions_table):
    """The test table's trigger installed for SHARDS shards; its DatabaseSettings."""
    db = attrs.evolve(sessions_table, notify_shards=SHARDS)
    apply_sql(postgres_dsn, trigger_sql(db))
    return db


def start_store(postgres_dsn, db) -> tuple[PostgresSessionStore, ReadinessGate]:
    store = PostgresSessionStore(db, lambda: postgres_dsn, reactor)
    gate = ReadinessGate(store, reactor, LIMIT, frozenset({"ended"}), 5900)
    store.observer = gate
    store.start()
    return store, gate


@pytest_twisted.inlineCallbacks
def wait_listening(store: PostgresSessionStore):
    for _ in range(int(LIMIT * 100)):
        if store.is_listening:
            return
        yield deferLater(0.01)
    raise AssertionError("the store never listened")


def deferLater(delay: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, delay, lambda: None)


class _Spy:
    """The store, with its fetch replaced (its own attributes are slots)."""

    def __init__(self, store, fetch) -> None:
        self._store, self.fetch = store, fetch

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest_twisted.inlineCallbacks
def test_commit_between_read_and_listen_is_seen(postgres_dsn, pg, sharded):
    """The row committed after the waiter's first read but before its shard's LISTEN is active
    (so no NOTIFY can reach us) is found by the read the LISTEN's completion starts."""
    store, gate = start_store(postgres_dsn, sharded)
    try:
        yield wait_listening(store)
        sid = str(uuid.uuid4())
        insert(pg, sharded.table, sid)  # not ready yet
        first_read: defer.Deferred[None] = defer.Deferred()
        real_fetch, real_execute = store.fetch, store._execute_on_listener

        def fetch(ids):
            d = real_fetch(ids)
            if not first_read.called:
                d.addBoth(lambda r: (first_read.callback(None), r)[1])
            return d

        def execute(statement):
            # Hold the LISTEN until the first read has answered "not ready", then commit.
            def commit(_):
                with pg.cursor() as cur:
                    cur.execute(
                        f'UPDATE "{sharded.table}" SET vm_ip = %s, vnc_port = 5901'
                        " WHERE session_id = %s", ("10.0.0.7", sid),
                    )
                return real_execute(statement)

            return first_read.addCallback(commit)

        gate.source = _Spy(store, fetch)
        store._channels.execute = execute
        started = reactor.seconds()
        target = yield gate.when_ready(sid).addTimeout(LIMIT, reactor)
        assert (target.host, target.port) == ("10.0.0.7", 5901)
        assert reactor.seconds() - started < LIMIT / 2
        assert store.listened_channels == 1
        assert gate.counts.needed == 0, "no NOTIFY came: the re-read found it"
    finally:
        store.stop()


@pytest_twisted.inlineCallbacks
def test_late_commit_notifies_the_shard(postgres_dsn, pg, sharded):
    """A waiter's shard is LISTENed, and a later commit's NOTIFY serves it."""
    store, gate = start_store(postgres_dsn, sharded)
    try:
        yield wait_listening(store)
        sid = str(uuid.uuid4())
        d = gate.when_ready(sid)
        while store.listened_channels == 0:
            yield deferLater(0.01)
        insert(pg, sharded.table, sid, "10.0.0.8", 5902, "running")
        target = yield d.addTimeout(LIMIT, reactor)
        assert target.host == "10.0.0.8"
        assert gate.counts.needed >= 1
    finally:
        store.stop()


@pytest.mark.parametrize("shards", [0, SHARDS])
@pytest_twisted.inlineCallbacks
def test_trigger_mismatch_is_logged(postgres_dsn, sessions_table, shards):
    """A daemon configured for other shards than the installed trigger says so at start-up."""
    installed = attrs.evolve(sessions_table, notify_shards=SHARDS - shards)
    apply_sql(postgres_dsn, trigger_sql(installed))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    store, gate = start_store(postgres_dsn, attrs.evolve(sessions_table, notify_shards=shards))
    try:
        yield wait_listening(store)
        mismatch = [e for e in events if e.get("event") == "notify_trigger_mismatch"]
        assert len(mismatch) == 1
        assert f"shards {SHARDS - shards}" in mismatch[0]["actual"]
        assert f"shards {shards}" in mismatch[0]["expected"]
    finally:
        globalLogPublisher.removeObserver(events.append)
        store.stop()


@pytest_twisted.inlineCallbacks
def test_matching_trigger_is_not_logged(postgres_dsn, sharded):
    """No warning when the trigger is the config's."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    store, gate = start_store(postgres_dsn, sharded)
    try:
        yield wait_listening(store)
        assert not [e for e in events if e.get("event") == "notify_trigger_mismatch"]
    finally:
        globalLogPublisher.removeObserver(events.append)
        store.stop()
