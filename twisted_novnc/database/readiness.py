"""The session-readiness gate: one Deferred per waiting browser, fired by committed rows.

A waiter is registered *before* its row is read, and every NOTIFY for its session triggers a
fresh read, so a commit can never fall between the read and the wait.  With LISTEN per shard
(``[database] notify_shards``) the session's shard may not be listened yet when its first read
runs: the gate follows the key at once and reads the row again when the store says its
shard's LISTEN is active (``listening(keys)``).  Reads are batched: all sessions notified since
the last query are read in one ``= ANY(...)`` query, which is what keeps a burst of a thousand
commits to a handful of round trips.
"""

from __future__ import annotations

import enum
import functools
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_novnc.backoff import jittered_backoff
from twisted_novnc.database.interfaces import ISessionSource
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.operations.metrics import ReadinessCounts
from twisted_novnc.session import SessionRow, Target, parse_vm_ip

_log = Logger()

#: Seconds between two ``session lookup failed`` lines: an outage is logged by the store
#: (once), and its failed lookups and their retries once a minute at most.
LOOKUP_LOG_INTERVAL = 60.0


class _Seen(enum.Enum):
    """What the last read said about a session, which decides the code at the deadline."""

    NOTHING = "not read yet"
    ABSENT = "no row"
    NOT_READY = "row not ready"
    DATABASE_ERROR = "database error"


_DEADLINE_REFUSALS = {
    _Seen.NOTHING: Refusal.DATABASE_UNAVAILABLE,
    _Seen.DATABASE_ERROR: Refusal.DATABASE_UNAVAILABLE,
    _Seen.ABSENT: Refusal.NOT_FOUND,
    _Seen.NOT_READY: Refusal.NOT_READY,
}


#: How many recently notified sessions the gate remembers (with when, in its own count of
#: events), for a relay whose watch starts after the read that served it: a NOTIFY in between
#: found no waiter and no watch.  A relay's set-up (its VM's connect, its VNC login) outlasting
#: this many other sessions' NOTIFYs is re-read anyway.
RECENT_NOTIFIED = 4096

#: Shown each row a read finds for a waiter's session (not ended, ready or not); raising
#: fails that waiter alone.
RowCheck = Callable[[SessionRow], None]


@attrs.define(eq=False)
class _Waiter:
    session_id: str
    deferred: Deferred[Target]
    timer: IDelayedCall | None = None
    on_row: RowCheck | None = None


@attrs.define(eq=False)
class Watch:
    """A live relay's interest in its session: revoked when the row says it must end."""

    target: Target
    on_revoked: Callable[[Refused], None]
    expiry: IDelayedCall | None = None


@attrs.define(eq=False)
class ReadinessGate:
    """Hands out ``when_ready`` Deferreds and fires them from the rows the store reads.

    The same reads watch live sessions: a row deleted, ended, expired or pointing at another VM
    revokes the session's relays (4410).
    """

    source: ISessionSource
    clock: IReactorTime
    timeout: float
    ended_statuses: Collection[str]
    default_port: int
    query_timeout: float = 5.0
    #: Where each NOTIFY is counted, needed or discarded (the daemon's metrics).
    counts: ReadinessCounts = attrs.field(factory=ReadinessCounts)
    #: Each session's waiters in arrival order (a dict as an ordered set): the first to come
    #: is the first judged, so the earliest verified clients get the session's slots.
    _waiters: dict[str, dict[_Waiter, None]] = attrs.field(factory=dict)
    _watches: dict[str, set[Watch]] = attrs.field(factory=dict)
    _seen: dict[str, _Seen] = attrs.field(factory=dict)
    _pending: set[str] = attrs.field(factory=set)
    _flush_call: IDelayedCall | None = None
    _retry_call: IDelayedCall | None = None
    _retry_ids: set[str] = attrs.field(factory=set)
    _retry_delays: Any = attrs.field(factory=lambda: jittered_backoff(0.05, 2.0))
    #: When a failed lookup was last logged (its retries, and the failures of the other pool
    #: connections while they reconnect, are not logged again within LOOKUP_LOG_INTERVAL).
    _lookup_logged_at: float | None = None
    _in_flight: bool = False
    #: The store is closing (the daemon stops): nothing more is read.
    _closed: bool = False
    #: How many waiters there are (``waiting`` is asked on every new connection).
    _waiting: int = 0
    #: The gate's count of events (NOTIFYs, LISTEN regained): a read sent at count N reflects
    #: every commit announced up to N.
    _events: int = 0
    #: The sessions notified lately, with the count at their last NOTIFY (oldest first).
    _recent: OrderedDict[str, int] = attrs.field(factory=OrderedDict)
    #: The count when LISTEN was last regained (everything may have been missed before).
    _relistened_at: int = -1
    #: The count of the newest NOTIFY no longer remembered.
    _forgotten_at: int = -1

    # -- the public side -----------------------------------------------------------------

    def session_key(self, session_id: str) -> str | None:
        """The canonical id this gate waits on for a raw ``session_id`` (every spelling of one
        UUID is one key), or None when no row can have it."""
        return self.source.normalise_id(session_id)

    def when_ready(self, session_id: str, on_row: RowCheck | None = None) -> Deferred[Target]:
        """Fire with the session's target once its committed row is ready.

        Fails with :class:`Refused`: ENDED at once for an ended session, and at the deadline
        NOT_FOUND, NOT_READY or DATABASE_UNAVAILABLE by what the last read saw.  Cancelling
        the Deferred (the browser left) removes the waiter and its timer.

        ``on_row`` sees the row each time a read finds it, before it is ready (a column token
        is checked as soon as the row exists): if it raises, this waiter fails with that.
        """
        key = self.source.normalise_id(session_id)
        if key is None:
            return _failed(Refused(Refusal.BAD_PATH, f"not a valid session id: {session_id!r}"))
        # The canceller finds its waiter by key: closing over the waiter would make a
        # reference cycle (waiter -> Deferred -> canceller -> waiter) per connection.
        waiter = _Waiter(key, Deferred(functools.partial(self._cancelled, key)), on_row=on_row)
        self._waiting += 1
        waiter.timer = self.clock.callLater(self.timeout, self._deadline, waiter)
        if key not in self._waiters and key not in self._watches:
            self.source.follow(key)
        self._waiters.setdefault(key, {})[waiter] = None
        self._seen.setdefault(key, _Seen.NOTHING)
        self._schedule_read([key])
        return waiter.deferred

    @property
    def waiting(self) -> int:
        """How many browsers are held waiting right now."""
        return self._waiting

    def waiting_for(self, session_id: str) -> int:
        return len(self._waiters.get(session_id, ()))

    @property
    def watched(self) -> int:
        """How many live relays are watched for revocation."""
        return sum(len(w) for w in self._watches.values())

    def watch(self, target: Target, on_revoked: Callable[[Refused], None]) -> Watch:
        """Call ``on_revoked`` once if the session ends, expires or moves while it is relayed."""
        watch = Watch(target, on_revoked)
        key = target.session_id
        if key not in self._waiters and key not in self._watches:
            self.source.follow(key)
        self._watches.setdefault(key, set()).add(watch)
        self._schedule_expiry(watch, target.expires_at)
        if self._missed_since(key, target.read_at):
            self._schedule_read([key])
        return watch

    def _missed_since(self, key: str, read_at: int | None) -> bool:
        """Whether a commit to this session may have been announced after the read that made
        ``read_at`` was sent (that NOTIFY found no waiter and no watch to re-read for)."""
        if read_at is None:
            return False
        if self._relistened_at > read_at or self._forgotten_at > read_at:
            return True  # LISTEN was lost, or a NOTIFY since was forgotten: read again
        last = self._recent.get(key)
        return last is not None and last > read_at

    def recheck(self, key: str) -> None:
        """Read the session's row again soon and judge every watch of it: a relay taken over
        from another process may have missed the NOTIFY that ended its session."""
        self._schedule_read([key])

    def unwatch(self, watch: Watch) -> None:
        if watch.expiry is not None and watch.expiry.active():
            watch.expiry.cancel()
        watch.expiry = None
        watches = self._watches.get(watch.target.session_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                key = watch.target.session_id
                del self._watches[key]
                if key not in self._waiters:
                    self.source.unfollow(key)
        self._maybe_idle()

    def fail_all(self, refusal: Refusal, detail: str = "") -> None:
        """Fail every waiter now (the daemon is shutting down)."""
        for key in list(self._waiters):
            self._fail(key, Refused(refusal, detail))
        self._stop_calls()

    def close(self) -> None:
        """The store is about to close: every waiter fails (shutting down), and nothing is
        read any more; a read the closing store fails is no outage (no line, no retry)."""
        self._closed = True
        self.fail_all(Refusal.SHUTTING_DOWN)

    # -- the store's side (StoreObserver) ----------------------------------------------

    def notified(self, session_id: str) -> None:
        self._events += 1
        recent = self._recent
        recent[session_id] = self._events
        recent.move_to_end(session_id)
        if len(recent) > RECENT_NOTIFIED:
            self._forgotten_at = recent.popitem(last=False)[1]
        if session_id in self._waiters or session_id in self._watches:
            self.counts.needed += 1
            self._schedule_read([session_id])
        else:
            self.counts.discarded += 1

    def listening(self, keys: Collection[str] | None = None) -> None:
        """Notifications sent while LISTEN was down are lost: re-read every session we track
        (None), or these, whose shard's LISTEN has just become active."""
        if keys is None:
            self._events += 1
            self._relistened_at = self._events
            self._schedule_read([*self._waiters, *self._watches])
        else:
            self._schedule_read(k for k in keys if k in self._waiters or k in self._watches)

    def not_listening(self) -> None:
        _log.warn("not listening for session changes; {n} waiters keep their deadline",
                  event="listen_lost", n=self.waiting)

    # -- reading -------------------------------------------------------------------------

    def _schedule_read(self, keys: Iterable[str]) -> None:
        if self._closed:
            return
        self._pending.update(keys)
        if self._flush_call is None and not self._in_flight and self._pending:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        read = self._send()
        if read is not None:
            read[0].addBoth(self._arrived, *read[1:])

    def _send(self) -> tuple[Deferred[dict[str, SessionRow]], set[str], int] | None:
        """Send one query for every pending session still waited on or watched."""
        batch = {k for k in self._pending if k in self._waiters or k in self._watches}
        self._pending.clear()
        if not batch or self._closed:
            return None
        self._in_flight = True
        # (A source that raised rather than failing its Deferred would leave the gate
        # reading nothing ever again, and lose the answer being judged.)
        return self._bounded(maybeDeferred(self.source.fetch, batch)), batch, self._events

    def _arrived(
        self, result: dict[str, SessionRow] | Failure, batch: set[str], read_at: int
    ) -> None:
        """A read's answer.  The sessions notified meanwhile are sent for *before* these rows
        are judged: in a burst the first read is small (the NOTIFYs read in its turn), and
        the rest's query then runs while this one's relays are being opened.  Still one query
        at a time, and answers judged in the order they were asked for: the next answer's
        callbacks are added only once these rows are judged."""
        self._in_flight = False
        following = self._send()
        try:
            if isinstance(result, Failure):
                self._read_failed(result, batch)
            else:
                self._apply(result, batch, read_at)
        finally:
            if following is None:
                self._schedule_read(())
            else:
                following[0].addBoth(self._arrived, *following[1:])

    def _bounded(self, fetch: Deferred[dict[str, SessionRow]]) -> Deferred[dict[str, SessionRow]]:
        """The fetch's result, or a failure after ``query_timeout``: a query stuck on a dead
        connection must not hold every later read (and so every deadline's code) behind it.
        The late result, if any, is dropped."""
        bounded: Deferred[dict[str, SessionRow]] = Deferred()

        def expire() -> None:
            if not bounded.called:
                bounded.errback(QueryTimeout(f"no answer in {self.query_timeout:g}s"))

        timer = self.clock.callLater(self.query_timeout, expire)

        def arrived(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if bounded.called:
                return
            if isinstance(result, Failure):
                bounded.errback(result)
            else:
                bounded.callback(result)

        fetch.addBoth(arrived)
        return bounded

    def _apply(self, rows: dict[str, SessionRow], batch: set[str], read_at: int) -> None:
        self._retry_delays = jittered_backoff(0.05, 2.0)
        for key in batch:
            # Watched before this row was judged: a relay that opens from it (its upstream
            # connected at once, on loopback) was set up with this row and needs no look.
            watched = key in self._watches
            if key in self._waiters:
                self._judge(key, rows.get(key), read_at)
            if watched:
                self._judge_live(key, rows.get(key))

    def _ended(self, row: SessionRow) -> Refused | None:
        """Why this row's session is over, if it is."""
        if row.status is not None and row.status in self.ended_statuses:
            return Refused(Refusal.ENDED, f"status is {row.status!r}")
        if row.expires_at is not None and row.expires_at <= self.clock.seconds():
            return Refused(Refusal.EXPIRED, "expired")
        return None

    def _judge_live(self, key: str, row: SessionRow | None) -> None:
        if row is None:
            self._revoke(key, Refused(Refusal.ENDED, "row deleted"))
            return
        ended = self._ended(row)
        if ended is not None:
            self._revoke(key, ended)
            return
        host = parse_vm_ip(row.vm_ip) if row.vm_ip else None
        for watch in list(self._watches.get(key, ())):
            target = watch.target
            if host != target.host or (row.port or self.default_port) != target.port:
                self._revoke_one(watch, Refused(Refusal.MOVED, f"now {row.vm_ip}:{row.port}"))
            else:
                self._schedule_expiry(watch, row.expires_at)

    def _schedule_expiry(self, watch: Watch, expires_at: float | None) -> None:
        if watch.expiry is not None and watch.expiry.active():
            watch.expiry.cancel()
        watch.expiry = None
        if expires_at is not None:
            delay = max(0.0, expires_at - self.clock.seconds())
            watch.expiry = self.clock.callLater(
                delay, self._revoke_one, watch, Refused(Refusal.EXPIRED, "expired")
            )

    def _revoke(self, key: str, error: Refused) -> None:
        for watch in list(self._watches.get(key, ())):
            self._revoke_one(watch, error)

    def _revoke_one(self, watch: Watch, error: Refused) -> None:
        self.unwatch(watch)
        watch.on_revoked(error)

    def _judge(self, key: str, row: SessionRow | None, read_at: int) -> None:
        ended = self._ended(row) if row is not None else None
        if row is None:
            self._seen[key] = _Seen.ABSENT
            return
        if ended is not None:
            self._fail(key, ended)
            return
        self._show_row(key, row)
        if key not in self._waiters:
            return  # every waiter's check failed
        if not row.vm_ip:
            self._seen[key] = _Seen.NOT_READY
        else:
            host = parse_vm_ip(row.vm_ip)
            if host is None:
                self._fail(key, Refused(Refusal.BAD_VM_ADDRESS, f"vm_ip {row.vm_ip!r}"))
            else:
                port = row.port or self.default_port
                self._succeed(key, Target(
                    key, host, port, row.expires_at, row.token_digest, row.credentials,
                    row.record, read_at,
                ))

    def _show_row(self, key: str, row: SessionRow) -> None:
        """Each waiter's ``on_row`` sees the row; a waiter whose check raises fails alone."""
        for waiter in list(self._waiters.get(key, ())):
            if waiter.on_row is None:
                continue
            try:
                waiter.on_row(row)
            except Exception:
                failure = Failure()
                self._remove(waiter)
                waiter.deferred.errback(failure)

    def _read_failed(self, failure: Any, batch: set[str]) -> None:
        if self._closed or not any(k in self._waiters or k in self._watches for k in batch):
            return  # the daemon stops, or every browser it was for has gone: nothing to redo
        now = self.clock.seconds()
        last = self._lookup_logged_at
        if last is None or now - last >= LOOKUP_LOG_INTERVAL:  # not once per retry
            self._lookup_logged_at = now
            _log.warn("session lookup failed: {error}; retrying",
                      event="session_lookup_failed", error=failure.getErrorMessage())
        for key in batch:
            if key in self._waiters:
                self._seen[key] = _Seen.DATABASE_ERROR
        # Live relays go on through an outage; their rows are read again so that a revocation
        # committed meanwhile is not missed.
        self._retry_ids.update(batch)
        if self._retry_call is None:
            self._retry_call = self.clock.callLater(next(self._retry_delays), self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        ids, self._retry_ids = self._retry_ids, set()
        self._schedule_read(ids)

    # -- ending a wait ---------------------------------------------------------------------

    def _deadline(self, waiter: _Waiter) -> None:
        waiter.timer = None
        seen = self._seen.get(waiter.session_id, _Seen.NOTHING)
        self._remove(waiter)
        waiter.deferred.errback(
            Refused(_DEADLINE_REFUSALS[seen], f"{seen.value} after {self.timeout:g}s")
        )

    def _succeed(self, key: str, target: Target) -> None:
        for waiter in self._take(key):
            waiter.deferred.callback(target)

    def _fail(self, key: str, error: Refused) -> None:
        for waiter in self._take(key):
            waiter.deferred.errback(error)

    def _take(self, key: str) -> list[_Waiter]:
        waiters = list(self._waiters.get(key, ()))
        for waiter in waiters:
            self._remove(waiter)
        return waiters

    def _cancelled(self, key: str, deferred: Deferred[Target]) -> None:
        """The canceller: the browser left while waiting."""
        for waiter in list(self._waiters.get(key, ())):
            if waiter.deferred is deferred:
                self._remove(waiter)

    def _remove(self, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        waiters = self._waiters.get(waiter.session_id)
        if waiters is not None and waiter in waiters:
            del waiters[waiter]
            self._waiting -= 1
            if not waiters:
                del self._waiters[waiter.session_id]
                self._seen.pop(waiter.session_id, None)
                self._pending.discard(waiter.session_id)
                self._retry_ids.discard(waiter.session_id)
                if waiter.session_id not in self._watches:
                    self.source.unfollow(waiter.session_id)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._waiters and not self._watches:
            self._stop_calls()

    def _stop_calls(self) -> None:
        for name in ("_flush_call", "_retry_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)


class QueryTimeout(Exception):
    """A session lookup got no answer in time."""


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


__all__ = ["CancelledError", "ReadinessGate"]
