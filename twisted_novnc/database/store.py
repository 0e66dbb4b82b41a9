"""Session lookup on PostgreSQL (txpostgres): the pooled queries, the LISTEN connection, the SQL.

All SQL the daemon runs at request time lives here.  Queries run on a small pool; notifications
arrive on one dedicated LISTEN connection that never runs a query of its own, so a slow lookup
can never delay a NOTIFY.

The pool may go through a pooler in transaction mode (PgBouncer): each query is one statement in
autocommit (txpostgres' connections are asynchronous psycopg2 ones, always in autocommit), with
its parameters bound by psycopg2 on the client, and nothing on a pooled connection sets session
state (no SET, LISTEN, temporary table or advisory lock) -- but for the prepared statements of
``[database] prepared_statements``: the lookup and the token update are prepared once per
server connection (PostgreSQL plans them once), and with ``auto`` the first sign of a
transaction pooler (EXECUTE on a server connection that never prepared the statement, PREPARE
on one that already has it) sends that query again unprepared and every later one too.
LISTEN is session state: its connection is a direct one (``[database] listen_dsn``), and so is
the column-type lookup that runs on it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, Protocol

import attrs
import psycopg2
from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from txpostgres import txpostgres
from txpostgres.reconnection import ConnectionDead
from zope.interface import implementer

from twisted_novnc._compat.txpostgres import (
    QuietConnection,
    StoppableDetector,
    has_connection,
    is_open,
)
from twisted_novnc.backoff import jittered_backoff
from twisted_novnc.config import DatabaseSettings
from twisted_novnc.database.channels import ChannelSet
from twisted_novnc.database.ids import INTEGER_TYPES, normalise_id
from twisted_novnc.database.interfaces import ISessionSource, ITokenStore
from twisted_novnc.database.pool import Pool
from twisted_novnc.database.prepared import PreparedStatements, Statement, statement
from twisted_novnc.database.schema import TRIGGER_NAME, quote_ident
from twisted_novnc.reactors import IStoreReactor
from twisted_novnc.session import SessionRow, VNCCredentials

_log = Logger()

#: (id, vm_ip, port, status, expires_at, token digest, VNC password, VNC user name, record) as
#: the lookup query returns them.
RowTuple = tuple[
    str, str | None, int | None, str | None, float | None, str | None, str | None, str | None,
    bool | None,
]


def _row(r: RowTuple) -> SessionRow:
    credentials = None if r[6] is None and r[7] is None else VNCCredentials(r[6], r[7])
    return SessionRow(
        r[0], vm_ip=r[1], port=r[2], status=r[3], expires_at=r[4], token_digest=r[5],
        credentials=credentials, record=r[8],
    )

#: libpq options for every connection: a name to find it by in pg_stat_activity, a bounded
#: connect, and keepalives so a vanished server is noticed in seconds rather than hours.
CONNECTION_OPTIONS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


class StoreObserver(Protocol):
    """What the store tells the readiness gate."""

    def notified(self, session_id: str) -> None:
        """A transaction touching this session's row has committed."""

    def listening(self, keys: Collection[str] | None = None) -> None:
        """LISTEN is (again) active: anything committed while it was not is unknown.

        None: every channel (after a (re)connect), so every row must be read again; keys: the
        LISTEN of these sessions' shard has just become active (``notify_shards``).
        """

    def not_listening(self) -> None:
        """The LISTEN connection is lost; notifications may be missed until ``listening``."""


@attrs.define
class _Health:
    """Says once per outage that the database is unreachable, and once that it is back: not
    once per connection or per retry, however the reason changes meanwhile."""

    down_reason: str | None = None
    #: Called each time a dead connection is re-established (for the reconnect counter).
    on_recovered: Callable[[], None] | None = None

    def down(self, error: str) -> None:
        error = " ".join(error.split())
        if self.down_reason is None:
            _log.warn("database unreachable: {error}; retrying",
                      event="database_unreachable", error=error)
        self.down_reason = error

    def up(self) -> None:
        if self.down_reason is not None:
            _log.info("database reachable again", event="database_reachable")
            self.down_reason = None


@implementer(ISessionSource, ITokenStore)
@attrs.define(eq=False)
class PostgresSessionStore:
    """Reads sessions through a txpostgres pool and relays NOTIFYs to one observer."""

    settings: DatabaseSettings
    dsn: Callable[[], str]
    reactor: IStoreReactor
    observer: StoreObserver | None = None
    #: ``[auth] token_column``, read with the row when set.
    token_column: str = ""
    #: ``[vnc] password_column`` and ``username_column``, read with the row when set.
    password_column: str = ""
    username_column: str = ""
    #: ``[record] record_column``, read with the row when set.
    record_column: str = ""
    id_type: str | None = None
    _pool: Pool[txpostgres.Connection] | None = None
    _listener: txpostgres.Connection | None = None
    _listening: bool = False
    _stopped: bool = False
    _select: Statement | None = None
    #: The same for one id, the usual lookup: ``= $1`` gets PostgreSQL's generic plan once
    #: prepared (planned once), ``= ANY($1)`` a custom plan at every EXECUTE (planned each
    #: time: its generic plan's estimate, for an array of unknown length, is never cheaper).
    _select_one: Statement | None = None
    _consume: Statement | None = None
    _columns: str = ""
    _listen_retry: Any = None
    _health: _Health = attrs.field(factory=_Health)
    _all_pool_connections: list[Any] = attrs.field(factory=list)
    _first_connects: list[Deferred[bool]] = attrs.field(factory=list)
    _listen_delays: Iterator[float] = attrs.field(factory=lambda: jittered_backoff(1.0, 30.0))
    #: LISTEN's own DSN (``[database] listen_dsn``: direct, when ``dsn`` is a pooler's); None =
    #: the same as ``dsn``.
    listen_dsn: Callable[[], str] | None = None
    #: With ``notify_shards``: the shards LISTENed on, by the sessions followed.
    _channels: ChannelSet | None = None
    _trigger_checked: bool = False

    def __attrs_post_init__(self) -> None:
        if self.settings.notify_shards:
            self._channels = ChannelSet(
                self.settings.notify_channel, self.settings.notify_shards, self.reactor,
                self._execute_on_listener, self._covered,
            )

    def _execute_on_listener(self, statement: str) -> Deferred[object]:
        if self._listener is None:
            return defer.fail(DatabaseNotReady("no LISTEN connection"))
        d: Deferred[object] = self._listener.runOperation(statement)
        return d

    def _covered(self, keys: Collection[str]) -> None:
        if self.observer is not None and not self._stopped:
            self.observer.listening(keys)

    def follow(self, key: str) -> None:
        """With ``notify_shards``: LISTEN on this session's shard (the observer hears
        ``listening([key, ...])`` once it is active).  Without: nothing, the one channel is
        always listened."""
        if self._channels is not None:
            self._channels.follow(key)

    def unfollow(self, key: str) -> None:
        if self._channels is not None:
            self._channels.unfollow(key)

    @property
    def listened_channels(self) -> int:
        """How many channels the LISTEN connection listens on now."""
        if not self._listening:
            return 0
        return 1 if self._channels is None else self._channels.listened
    _statements: PreparedStatements = attrs.field(
        default=attrs.Factory(
            lambda self: PreparedStatements(self.settings.prepared_statements), takes_self=True
        )
    )

    @property
    def prepared(self) -> bool:
        """Lookups run as prepared statements (``prepared_statements`` on, or auto and no
        transaction pooler seen)."""
        return self._statements.prepared

    @property
    def is_listening(self) -> bool:
        return self._listening

    @property
    def database_reachable(self) -> bool:
        """At least one query connection is up, and none has just reported the database gone."""
        alive = [
            c for c in self._all_pool_connections
            if is_open(c) and not c.detector.connectionIsDead
        ]
        return bool(alive) and self._health.down_reason is None

    @staticmethod
    def _usable(connection: txpostgres.Connection) -> bool:
        """Connected, or connecting for the first time: not dead and waiting to reconnect."""
        return is_open(connection) and not connection.detector.connectionIsDead

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._health.on_recovered = callback

    def _make_connection(self) -> txpostgres.Connection:
        detector = StoppableDetector(
            self._health, reconnectionIterator=jittered_backoff, reactor=self.reactor
        )
        return QuietConnection(reactor=self.reactor, detector=detector)

    def start(self) -> None:
        """Connect the pool and the LISTEN connection; each retries on its own until it is up."""
        self._stopped = False
        dsn = self.dsn()
        self._all_pool_connections = [
            self._make_connection() for _ in range(self.settings.pool_size)
        ]
        self._pool = pool = Pool(list(self._all_pool_connections), usable=self._usable)
        for connection in self._all_pool_connections:  # work may wait for a usable one
            connection.detector.addRecoveryHandler(pool.wake)
        self._statements.forget()
        self._first_connects = [
            self._connect(connection, dsn, "twisted_novnc-pool")
            for connection in self._all_pool_connections
        ]
        self._listener = self._make_connection()
        self._listener.detector.on_death = self._listen_lost
        self._listener.detector.addRecoveryHandler(self._listen)
        self._listener.addNotifyObserver(self._notify_received)
        listen_dsn = self.listen_dsn() if self.listen_dsn is not None else dsn
        self._connect(self._listener, listen_dsn, "twisted_novnc-listen").addCallback(
            lambda connected: self._listen() if connected else None
        )

    def when_pool_connected(self) -> Deferred[bool]:
        """Fires once every pool connection's first attempt is over: True if all of them
        connected.  (A query before then may meet a connection still connecting and fail as a
        database error, which the readiness gate retries; a test waits here instead.)"""
        return gatherResults(list(self._first_connects)).addCallback(all)

    def _connect(self, connection: txpostgres.Connection, dsn: str, name: str) -> Deferred[bool]:
        """Connect once; a failure hands the connection to its detector, which keeps trying."""
        d = connection.connect(dsn, application_name=name, **CONNECTION_OPTIONS)

        def failed(f: Any) -> bool:
            self._health.down(f.getErrorMessage())
            connection.detector.checkForDeadConnection(f)
            return False

        return d.addCallbacks(lambda _: True, failed)

    def _listen(self) -> Deferred[None]:
        """Issue LISTEN, learn the id column's type, then tell the observer to re-read.

        With ``notify_shards``, the LISTEN is of every shard with a followed session (none at
        first), and the shards follow the sessions from then on.
        """
        assert self._listener is not None
        if self._channels is None:
            statement: str | None = f"LISTEN {quote_ident(self.settings.notify_channel)}"
        else:
            statement = self._channels.connected()
        d: Deferred[Any] = (
            self._listener.runOperation(statement) if statement else defer.succeed(None)
        )
        d.addCallback(lambda _: self._introspect())
        d.addCallback(lambda _: self._check_trigger())

        def listening(_: object) -> None:
            if self._stopped:
                return
            self._listening = True
            self._listen_delays = jittered_backoff(1.0, 30.0)
            shards = self.settings.notify_shards
            _log.info(
                "listening for session changes on channel {channel}"
                + (" (shards {channel}_0 to {channel}_{last}, as sessions need them)"
                   if shards else ""),
                event="listening_for_changes",
                channel=self.settings.notify_channel, last=shards - 1,
            )
            if self._channels is not None:
                self._channels.listened_all()
            if self.observer is not None:
                self.observer.listening()

        d.addCallback(listening)
        d.addErrback(self._listen_failed)
        return d

    def _listen_failed(self, f: Any) -> None:
        if self._stopped:
            return
        _log.error("cannot listen for session changes: {error}",
                   event="listen_failed", error=f.getErrorMessage())
        if f.check(psycopg2.InterfaceError, psycopg2.OperationalError):
            return  # the connection's detector reconnects, then calls _listen again
        # The connection is fine but the table is not (yet): look again later.
        delay = next(self._listen_delays)
        self._listen_retry = self.reactor.callLater(delay, self._retry_listen)

    def _retry_listen(self) -> None:
        self._listen_retry = None
        listener = self._listener
        if self._stopped or self._listening or listener is None:
            return
        if not listener.detector.connectionIsDead:
            self._listen()

    def _listen_lost(self) -> None:
        self._listening = False
        if self._channels is not None:
            self._channels.connection_lost()
        if self.observer is not None and not self._stopped:
            self.observer.not_listening()

    def _notify_received(self, notify: Any) -> None:
        if self.observer is None:
            return
        channel = self.settings.notify_channel
        if self._channels is None:
            if notify.channel == channel:
                self.observer.notified(notify.payload)
        elif notify.channel.startswith(channel) and notify.channel[len(channel):][:1] == "_":
            self.observer.notified(notify.payload)

    def _check_trigger(self) -> Deferred[None]:
        """Warn (once) when the table's trigger NOTIFYs other channels than the config says:
        a daemon LISTENing on shards while the trigger NOTIFYs the one channel (or the other way
        round) would hold every browser whose row is not ready at once to its deadline."""
        if self._trigger_checked:
            return defer.succeed(None)
        assert self._listener is not None
        s = self.settings
        d = self._listener.runQuery(
            "SELECT t.tgargs FROM pg_trigger t WHERE t.tgrelid = %s::regclass AND t.tgname = %s",
            (quote_ident(s.table), TRIGGER_NAME),
        )

        def check(rows: Sequence[tuple[Any]]) -> None:
            self._trigger_checked = True
            expected = (
                f"channel {s.notify_channel}, id column {s.id_column},"
                f" shards {s.notify_shards}"
            )
            if not rows:
                _log.warn(
                    "the table {table} has no trigger {trigger}: no NOTIFY will come (expected"
                    " {expected}; run python -m twisted_novnc install-schema)",
                    event="notify_trigger_mismatch", table=s.table, trigger=TRIGGER_NAME,
                    expected=expected,
                )
                return
            args = bytes(rows[0][0]).decode("utf-8", "replace").split("\x00")[:-1]
            channel = args[0] if args else ""
            column = args[1] if len(args) > 1 else ""
            shards = args[2] if len(args) > 2 else "0"
            actual = f"channel {channel}, id column {column}, shards {shards}"
            if actual != expected:
                _log.warn(
                    "the trigger {trigger} on {table} NOTIFYs with {actual}, but the config"
                    " says {expected}: browsers may wait to their deadline; run python -m"
                    " twisted_novnc install-schema with this config",
                    event="notify_trigger_mismatch", table=s.table, trigger=TRIGGER_NAME,
                    expected=expected, actual=actual,
                )

        return d.addCallback(check)

    def _introspect(self) -> Deferred[None]:
        """Check the configured table and columns exist, and build the lookup query."""
        assert self._listener is not None
        d = self._listener.runQuery(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            (quote_ident(self.settings.table),),
        )

        def check(rows: Sequence[tuple[str, str]]) -> None:
            types = dict(rows)
            s = self.settings
            wanted = [
                s.id_column, s.ip_column, s.port_column, s.status_column, s.expires_column,
                self.token_column, self.password_column, self.username_column,
                self.record_column,
            ]
            missing = [c for c in wanted if c and c not in types]
            if missing:
                raise SchemaMismatch(
                    f"table {s.table} has no column {', '.join(missing)}"
                    " (see [database], [auth] token_column, [vnc] and [record] record_column"
                    " in the config)"
                )
            self.id_type = types[s.id_column]
            self._build_statements()

        return d.addCallback(check)

    def _build_statements(self) -> None:
        """The lookups (one id, several) and, with a token column, the token update."""
        s = self.settings
        port = f"{quote_ident(s.port_column)}::integer" if s.port_column else "NULL::integer"
        status = f"{quote_ident(s.status_column)}::text" if s.status_column else "NULL::text"
        expires = (
            f"EXTRACT(EPOCH FROM {quote_ident(s.expires_column)})::float8"
            if s.expires_column
            else "NULL::float8"
        )
        token = f"{quote_ident(self.token_column)}::text" if self.token_column else "NULL::text"
        secrets = ", ".join(
            f"{quote_ident(column)}::text" if column else "NULL::text"
            for column in (self.password_column, self.username_column)
        )
        record = (
            f"{quote_ident(self.record_column)}::boolean" if self.record_column
            else "NULL::boolean"
        )
        ident = quote_ident(s.id_column)
        self._columns = (
            f"{ident}::text, {quote_ident(s.ip_column)}::text, {port}, {status}, {expires},"
            f" {token}, {secrets}, {record}"
        )
        table = quote_ident(s.table)
        if self.token_column:
            token = quote_ident(self.token_column)
            self._consume = statement(
                "consume", [self._cast, ""],
                lambda p: (
                    f"UPDATE {table} SET {token} = NULL WHERE {ident} = {p[0]}"
                    f" AND {token} = {p[1]} RETURNING {self._columns}"
                ),
            )
        self._select_one = statement(
            "fetch_one", [self._cast],
            lambda p: f"SELECT {self._columns} FROM {table} WHERE {ident} = {p[0]}",
        )
        self._select = statement(
            "fetch", [f"{self._cast}[]"],
            lambda p: f"SELECT {self._columns} FROM {table} WHERE {ident} = ANY({p[0]})",
        )

    @property
    def _cast(self) -> str:
        return self.id_type if self.id_type in ("uuid", *INTEGER_TYPES) else "text"

    def consume_token(self, session_id: str, digest: str) -> Deferred[SessionRow | None]:
        """Resolve the session and clear its token in one statement; None if it did not match.

        Two browsers racing with one token: the row lock lets exactly one UPDATE match.
        """
        if self._pool is None or self._consume is None:
            return defer.fail(DatabaseNotReady("not connected to the database yet"))
        d = self._run(self._consume, (session_id, digest))
        return d.addCallback(lambda rows: _row(rows[0]) if rows else None)

    def normalise_id(self, raw: str) -> str | None:
        return normalise_id(raw, self.id_type)

    def fetch(self, session_ids: Iterable[str]) -> Deferred[dict[str, SessionRow]]:
        """Read the committed rows of these sessions in one query; absent ids are absent."""
        if self._pool is None or self._select is None or self._select_one is None:
            return defer.fail(DatabaseNotReady("not connected to the database yet"))
        ids = [i for i in (self.normalise_id(s) for s in session_ids) if i is not None]
        if not ids:
            return defer.succeed({})
        if len(ids) == 1:
            d = self._run(self._select_one, (ids[0],))
        else:
            d = self._run(self._select, (ids,))

        def rows(result: Sequence[RowTuple]) -> dict[str, SessionRow]:
            return {r[0]: _row(r) for r in result}

        return d.addCallback(rows)

    def _run(self, query: Statement, params: tuple[Any, ...]) -> Deferred[Any]:
        """The query's rows, from the first free pool connection."""
        assert self._pool is not None
        run = self._statements.run
        d = self._pool.run(lambda connection: run(connection, query, params))
        return d.addErrback(_not_ready_while_reconnecting)

    def stop(self) -> None:
        """Close every connection and stop every reconnection attempt."""
        self._stopped = True
        self._listening = False
        if self._channels is not None:
            self._channels.stop()
        if self._listen_retry is not None:
            self._listen_retry.cancel()
            self._listen_retry = None
        connections = [self._listener, *self._all_pool_connections]
        for connection in connections:
            if connection is None:
                continue
            connection.detector.stop()
            if has_connection(connection):
                connection.close()


class DatabaseNotReady(Exception):
    """The store has no working connection (yet)."""


def _not_ready_while_reconnecting(f: Any) -> Any:
    """txpostgres fails work on a connection it is re-establishing with a bare
    ``ConnectionDead`` (no message: the log said "session lookup failed: ; retrying"); the
    pool sends work there only when no connection is up."""
    f.trap(ConnectionDead)
    raise DatabaseNotReady("no database connection is up; reconnecting")


class SchemaMismatch(Exception):
    """The configured table or columns do not exist."""

