"""Canaries for the txpostgres internals fenced in twisted_novnc/_compat/txpostgres.py: the
detector's reconnection steps the store re-implements, and the psycopg2 connection under a
txpostgres Connection."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterator
from typing import Any

import attrs
import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted
from canary import broken
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres

from twisted_novnc._compat.txpostgres import (
    QuietConnection,
    StoppableDetector,
    has_connection,
    is_death,
    is_open,
    server_connection,
)

STORE = "the session store (twisted_novnc._compat.txpostgres, database/store.py)"
#: The store's reconnection has no switch: a broken one is fixed in _compat, or pinned away.
PIN = "pin txpostgres below this release until _compat/txpostgres.py is adapted"


def death() -> Failure:
    return Failure(psycopg2.OperationalError("server closed the connection unexpectedly"))


@attrs.define
class Reconnectable:
    """What a detector reconnects: records close() and connect(), and fails as told."""

    failures: list[Exception] = attrs.field(factory=list)
    closed: int = 0
    connected: list[tuple[tuple[Any, ...], dict[str, Any]]] = attrs.field(factory=list)

    def close(self) -> None:
        self.closed += 1

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[None]:
        self.connected.append((args, kwargs))
        if self.failures:
            return defer.fail(self.failures.pop(0))
        return defer.succeed(None)


@attrs.define
class Health:
    """The store's view of the database, as StoppableDetector reports to it."""

    downs: list[str] = attrs.field(factory=list)
    ups: int = 0
    recovered: int = 0
    on_recovered: Callable[[], None] | None = None

    def __attrs_post_init__(self) -> None:
        self.on_recovered = self._recovered

    def down(self, error: str) -> None:
        self.downs.append(error)

    def up(self) -> None:
        self.ups += 1

    def _recovered(self) -> None:
        self.recovered += 1


def delays() -> Iterator[float]:
    yield 0.0
    while True:
        yield 1.0


def test_detector_has_the_steps_the_store_overrides() -> None:
    """DeadConnectionDetector still has the methods and attributes StoppableDetector
    overrides or calls, with the constructor keywords it passes."""
    cls = reconnection.DeadConnectionDetector
    for name in ("startReconnecting", "reconnect", "connectionRecovered",
                 "checkForDeadConnection", "addRecoveryHandler", "setReconnectable"):
        assert callable(getattr(cls, name, None)), broken(
            "txpostgres", f"DeadConnectionDetector has no {name}", STORE, PIN
        )
    parameters = inspect.signature(cls.__init__).parameters
    assert {"reconnectionIterator", "reactor"} <= set(parameters), broken(
        "txpostgres", f"DeadConnectionDetector() now takes {list(parameters)}", STORE, PIN
    )
    detector = cls(reconnectionIterator=delays, reactor=Clock())
    assert detector.connectionIsDead is False, broken(
        "txpostgres", "a new detector's connectionIsDead is not False", STORE, PIN
    )


def test_a_death_starts_reconnecting_once() -> None:
    """checkForDeadConnection marks the connection dead and calls startReconnecting once,
    however many failures report the death (StoppableDetector hooks in there)."""
    started: list[Failure] = []

    class Recording(reconnection.DeadConnectionDetector):
        def startReconnecting(self, f: Failure) -> None:
            started.append(f)

    detector = Recording(reconnectionIterator=delays, reactor=Clock())
    first = death()
    assert detector.checkForDeadConnection(first) is first
    detector.checkForDeadConnection(death())
    assert started == [first] and detector.connectionIsDead, broken(
        "txpostgres", "checkForDeadConnection no longer calls startReconnecting once", STORE, PIN
    )


def test_reconnect_closes_then_connects_with_the_same_arguments() -> None:
    """reconnect() closes the reconnectable and returns its connect(), with the arguments
    setReconnectable was given (StoppableDetector reports each failed attempt)."""
    detector = reconnection.DeadConnectionDetector(reconnectionIterator=delays, reactor=Clock())
    target = Reconnectable(failures=[psycopg2.OperationalError("still down")])
    detector.setReconnectable(target, "dbname=x", application_name="novnc")
    d = detector.reconnect()
    assert isinstance(d, Deferred), broken(
        "txpostgres", "reconnect() no longer returns the connect() Deferred", STORE, PIN
    )
    failed: list[Failure] = []
    d.addErrback(failed.append)
    expected = [(("dbname=x",), {"application_name": "novnc"})]
    assert target.closed == 1 and target.connected == expected, broken(
        "txpostgres", "reconnect() no longer closes and connects again", STORE, PIN
    )
    assert failed and failed[0].getErrorMessage() == "still down"


def test_connection_recovered_clears_the_death_and_runs_handlers() -> None:
    """connectionRecovered() marks the connection alive and calls the recovery handlers
    (the store re-issues LISTEN from one)."""
    detector = reconnection.DeadConnectionDetector(reconnectionIterator=delays, reactor=Clock())
    ran: list[str] = []
    detector.addRecoveryHandler(lambda: ran.append("listen"))
    detector.connectionIsDead = True
    detector.connectionRecovered()
    assert ran == ["listen"] and detector.connectionIsDead is False, broken(
        "txpostgres", "connectionRecovered() no longer clears the death and runs handlers",
        STORE, PIN,
    )


def test_retrying_call_waits_on_its_reactor_and_cancels() -> None:
    """RetryingCall(f) retries on its `reactor` with the given delays until f succeeds, and
    cancelling its Deferred stops it (StoppableDetector.stop)."""
    clock = Clock()
    target = Reconnectable(failures=[psycopg2.OperationalError("down")] * 5)
    call = retrying.RetryingCall(target.connect)
    call.reactor = clock
    d = call.start(delays())
    assert len(target.connected) == 1  # a zero delay calls at once
    clock.advance(1.0)
    assert len(target.connected) == 2, broken(
        "txpostgres", "RetryingCall no longer waits on its `reactor`", STORE, PIN
    )
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    clock.advance(10.0)
    assert len(target.connected) == 2, broken(
        "txpostgres", "cancelling RetryingCall.start's Deferred no longer stops it", STORE, PIN
    )


def test_stoppable_detector_reports_retries_recovers_and_stops() -> None:
    """StoppableDetector on txpostgres' machinery: the death and each failed attempt are
    reported, recovery runs the hooks, and once stopped no attempt follows."""
    clock = Clock()
    health = Health()
    detector = StoppableDetector(health, reconnectionIterator=delays, reactor=clock)
    deaths: list[None] = []
    detector.on_death = lambda: deaths.append(None)
    target = Reconnectable(failures=[psycopg2.OperationalError("refused")])
    detector.setReconnectable(target, "dbname=x")
    detector.checkForDeadConnection(death())
    assert deaths == [None] and health.downs[0].startswith("server closed")
    assert health.downs[1:] == ["refused"] and len(target.connected) == 1
    clock.advance(1.0)
    assert len(target.connected) == 2
    assert (health.ups, health.recovered, detector.connectionIsDead) == (1, 1, False)

    target.failures = [psycopg2.OperationalError("refused")] * 10
    detector.checkForDeadConnection(death())
    detector.stop()
    clock.advance(60.0)
    assert len(target.connected) == 3 and detector.connectionIsDead
    detector.checkForDeadConnection(death())  # still dead: nothing starts again
    clock.advance(60.0)
    assert len(target.connected) == 3


def test_an_unknown_prepared_statement_is_no_death() -> None:
    """psycopg2 raises SQLSTATE 26000 (EXECUTE of a name the server connection does not know)
    as an OperationalError, which txpostgres' death checker takes for a dead connection; the
    store's detectors (is_death) do not, and take every other such error as txpostgres does."""

    class NotPrepared(psycopg2.OperationalError):
        pgcode = "26000"

    not_prepared = Failure(NotPrepared("prepared statement does not exist"))
    assert reconnection.defaultDeathChecker(not_prepared), (
        "txpostgres no longer takes 26000 for a death: is_death can go"
    )
    assert not is_death(not_prepared)
    assert StoppableDetector(Health(), delays, Clock()).deathChecker is is_death
    for error in (death(), Failure(psycopg2.InterfaceError("connection already closed"))):
        assert is_death(error) and reconnection.defaultDeathChecker(error)
    assert not is_death(Failure(psycopg2.ProgrammingError("syntax error")))


def test_a_new_connection_has_no_psycopg2_connection() -> None:
    """Before connect(), a txpostgres Connection's pollable() is None: not open, nothing to
    close (the store's health and stop())."""
    connection = txpostgres.Connection(reactor=Clock())
    assert connection.pollable() is None, broken(
        "txpostgres", "Connection.pollable() is not None before connect()", STORE, PIN
    )
    assert not is_open(connection) and not has_connection(connection)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_pollable_is_the_psycopg2_connection(postgres_dsn: str) -> Generator[Any, Any, None]:
    """Connected, pollable() is the psycopg2 connection (the private _connection), open;
    closed, it stays, closed (is_open, has_connection)."""
    connection = txpostgres.Connection(reactor=reactor)
    yield connection.connect(postgres_dsn)
    raw = connection.pollable()
    message = broken(
        "txpostgres", "Connection.pollable() is no longer the psycopg2 connection", STORE, PIN
    )
    assert isinstance(raw, psycopg2.extensions.connection), message
    assert raw is connection._connection, message
    assert is_open(connection) and has_connection(connection)
    connection.close()
    assert raw.closed and not is_open(connection) and has_connection(connection), message


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_a_reconnect_brings_a_new_psycopg2_connection(
    postgres_dsn: str,
) -> Generator[Any, Any, None]:
    """Connected again (as the detector's reconnect does: close, then connect), a Connection
    has a new psycopg2 connection (server_connection): the prepared statements are gone, and
    the store, which keys them on it, prepares again."""
    connection = txpostgres.Connection(reactor=reactor)
    yield connection.connect(postgres_dsn)
    first = server_connection(connection)
    assert first is connection.pollable()
    connection.close()
    yield connection.connect(postgres_dsn)
    try:
        assert server_connection(connection) is not first, broken(
            "txpostgres", "Connection.connect() again keeps the old psycopg2 connection",
            "prepared statements (database/prepared.py)", PIN,
        )
    finally:
        connection.close()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_an_idle_connection_the_server_ends_is_lost_quietly(
    postgres_dsn: str,
) -> Generator[Any, Any, None]:
    """txpostgres lets an idle connection's death escape ``doRead`` (the reactor logs an
    Unhandled Error for it); QuietConnection hands it to the reactor as the loss's reason:
    connectionLost with the psycopg2 error, nothing logged as an error."""
    lost: Deferred[list[Failure]] = Deferred()

    class Watched(QuietConnection):
        def connectionLost(self, reason: Failure) -> None:
            super().connectionLost(reason)
            if not lost.called:
                lost.callback([reason])  # (a Failure itself would errback)

    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("isError") or "log_failure" in event:
            errors.append(event)

    message = broken(
        "txpostgres", "an idle Connection's death no longer reaches the reactor as QuietConnection"
        " expects", STORE, PIN,
    )
    globalLogPublisher.addObserver(observe)
    try:
        connection = Watched(reactor=reactor)
        yield connection.connect(postgres_dsn)
        pid = connection.pollable().get_backend_pid()
        killer = txpostgres.Connection(reactor=reactor)
        yield killer.connect(postgres_dsn)
        yield killer.runQuery("SELECT pg_terminate_backend(%s)", (pid,))
        killer.close()
        (reason,) = yield lost.addTimeout(10, reactor)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert reason.check(psycopg2.Error), (message, reason)
    assert errors == [], (message, errors)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_notifies_reach_observers_at_once_in_order(postgres_dsn: str) -> Generator[Any, Any, None]:
    """txpostgres calls ``checkForNotifies`` once psycopg2 has read NOTIFYs, which
    QuietConnection hands to every observer at once, in order (not through a Cooperator); an
    observer that raises is logged, and the others and later notifications go on."""
    message = broken(
        "txpostgres", "Connection no longer calls checkForNotifies when NOTIFYs arrive", STORE,
        PIN,
    )
    got: list[str] = []
    three: Deferred[None] = Deferred()
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("event") == "notify_observer_failed":
            failures.append(event)

    def failing(notify: Any) -> None:
        raise RuntimeError("observer bug")

    def collect(notify: Any) -> None:
        got.append(notify.payload)
        if len(got) == 3 and not three.called:
            # (Resumed after this delivery: the other observer may come after this one.)
            reactor.callLater(0, three.callback, None)

    listener = QuietConnection(reactor=reactor)
    sender = txpostgres.Connection(reactor=reactor)
    globalLogPublisher.addObserver(observe)
    try:
        yield listener.connect(postgres_dsn)
        yield sender.connect(postgres_dsn)
        listener.addNotifyObserver(failing)
        listener.addNotifyObserver(collect)
        yield listener.runOperation("LISTEN canary_notifies")
        yield sender.runOperation(
            "SELECT pg_notify('canary_notifies', 'a'), pg_notify('canary_notifies', 'b'),"
            " pg_notify('canary_notifies', 'c')"
        )
        yield three.addTimeout(10, reactor)
    finally:
        globalLogPublisher.removeObserver(observe)
        listener.close()
        sender.close()
    assert got == ["a", "b", "c"], message
    assert len(failures) == 3
