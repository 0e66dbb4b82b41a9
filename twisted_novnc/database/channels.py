"""Which NOTIFY channels the daemon LISTENs on when sessions are spread over shards.

With ``[database] notify_shards = N`` the trigger NOTIFYs ``<notify_channel>_<shard>``, the shard
a function of the id alone (:func:`shard_of`, computed the same way in plpgsql by the trigger),
so a daemon need LISTEN only on the shards of the sessions it holds (a waiting browser or a
live relay) instead of receiving every commit of every daemon.

:class:`ChannelSet` is that bookkeeping, without I/O: keys counted per shard, LISTEN when a
shard gains its first key, UNLISTEN a while after it lost its last one (so connection churn
does not LISTEN and UNLISTEN each time), every change of one reactor turn sent as one statement,
one statement in flight at a time.  Race-freedom is the point: a key is *covered* only once its
shard's LISTEN has completed, and ``on_covered`` then names it so its row is read again; a
commit before that is seen by that read, one after it is NOTIFYed.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Collection

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_novnc.database.schema import quote_ident

_log = Logger()

#: Seconds a shard stays LISTENed after its last key left.
LINGER = 10.0


def shard_of(key: str, shards: int) -> int:
    """The shard of a canonical id: the trigger's ``('x' || substr(md5(id), 1, 7))::bit(28)::int
    % shards``, so both sides agree for every id."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:7], 16) % shards


def channel_name(channel: str, shard: int) -> str:
    return f"{channel}_{shard}"


class _State(enum.Enum):
    IDLE = "not listened"
    LISTENING = "LISTEN in flight"
    LISTENED = "listened"
    UNLISTENING = "UNLISTEN in flight"


@attrs.define(eq=False)
class _Shard:
    keys: set[str] = attrs.field(factory=set)
    state: _State = _State.IDLE
    linger: IDelayedCall | None = None


#: Runs one statement on the LISTEN connection; fires when it has completed.
Execute = Callable[[str], Deferred[object]]


@attrs.define(eq=False)
class ChannelSet:
    """The shards one daemon LISTENs on, driven by the keys it follows.

    ``execute`` runs on the dedicated LISTEN connection; ``on_covered`` is told the keys whose
    shard's LISTEN has just become active (their rows must be read again).  While the connection
    is down (``connection_lost`` until ``connected``) nothing is sent; ``connected`` answers the
    statement that LISTENs every shard with a key, which the store runs before re-reading all.
    """

    channel: str
    shards: int
    clock: IReactorTime
    execute: Execute
    on_covered: Callable[[Collection[str]], None]
    linger: float = LINGER
    _by_shard: dict[int, _Shard] = attrs.field(factory=dict)
    #: Shards that may need a LISTEN or UNLISTEN: only these are looked at per turn.
    _dirty: set[int] = attrs.field(factory=set)
    _connected: bool = False
    _in_flight: bool = False
    _flush_call: IDelayedCall | None = None
    #: Bumped on every reconnect: a statement's late answer from a lost connection is ignored.
    _generation: int = 0

    @property
    def listened(self) -> int:
        """How many channels are LISTENed now (a LISTEN or UNLISTEN in flight counts as before)."""
        return sum(
            s.state in (_State.LISTENED, _State.UNLISTENING) for s in self._by_shard.values()
        )

    def channel_of(self, key: str) -> str:
        return channel_name(self.channel, shard_of(key, self.shards))

    def is_covered(self, key: str) -> bool:
        """Whether a NOTIFY for this key would reach us now."""
        shard = self._by_shard.get(shard_of(key, self.shards))
        return shard is not None and shard.state is _State.LISTENED and key in shard.keys

    def follow(self, key: str) -> None:
        """A key gained interest (its first waiter or watch): LISTEN on its shard soon."""
        number = shard_of(key, self.shards)
        shard = self._by_shard.setdefault(number, _Shard())
        shard.keys.add(key)
        if shard.linger is not None:
            if shard.linger.active():
                shard.linger.cancel()
            shard.linger = None
        if shard.state is not _State.LISTENED:
            self._schedule(number)

    def unfollow(self, key: str) -> None:
        """A key lost its last waiter and watch: its shard lingers, then is UNLISTENed."""
        number = shard_of(key, self.shards)
        shard = self._by_shard.get(number)
        if shard is None:
            return
        shard.keys.discard(key)
        if shard.keys:
            return
        if shard.state is _State.LISTENED:
            self._start_linger(number, shard)
        elif shard.state is _State.IDLE:
            del self._by_shard[number]

    def connected(self) -> str | None:
        """The LISTEN connection is (back) up, and the server listens on nothing: the statement
        that LISTENs every shard with a key (None if none has), to run before re-reading all.

        The caller runs it and then calls :meth:`listened_all`; meanwhile nothing else is sent.
        """
        self._generation += 1
        self._in_flight = True
        wanted = []
        for number, shard in list(self._by_shard.items()):
            self._cancel_linger(shard)
            if shard.keys:
                shard.state = _State.LISTENING
                wanted.append(number)
            else:
                del self._by_shard[number]
        if not wanted:
            return None
        return self._statement(sorted(wanted), [])

    def listened_all(self) -> None:
        """The statement :meth:`connected` answered has completed: every shard is listened."""
        self._connected = True
        self._in_flight = False
        for number, shard in self._by_shard.items():
            if shard.state is _State.LISTENING:
                shard.state = _State.LISTENED
                if not shard.keys:
                    self._start_linger(number, shard)
            elif shard.state is _State.IDLE:
                self._dirty.add(number)
        self._schedule()

    def connection_lost(self) -> None:
        """The server forgot every LISTEN: nothing is covered until ``connected``."""
        self._connected = False
        self._in_flight = False
        self._generation += 1
        for number, shard in list(self._by_shard.items()):
            self._cancel_linger(shard)
            shard.state = _State.IDLE
            if not shard.keys:
                del self._by_shard[number]
        self._dirty.clear()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def stop(self) -> None:
        self.connection_lost()

    # -- sending ------------------------------------------------------------------------------

    def _schedule(self, number: int | None = None) -> None:
        """One statement per reactor turn at most: the changes of this turn go together."""
        if number is not None:
            self._dirty.add(number)
        if self._dirty and self._connected and not self._in_flight and self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if not self._connected or self._in_flight:
            return
        listen, unlisten = [], []
        for n in self._dirty:
            shard = self._by_shard.get(n)
            if shard is None:
                continue
            if shard.state is _State.IDLE and shard.keys:
                listen.append(n)
            elif shard.state is _State.LISTENED and not shard.keys and shard.linger is None:
                unlisten.append(n)
        self._dirty.clear()
        if not listen and not unlisten:
            return
        for n in listen:
            self._by_shard[n].state = _State.LISTENING
        for n in unlisten:
            self._by_shard[n].state = _State.UNLISTENING
        self._in_flight = True
        generation = self._generation
        d = self.execute(self._statement(sorted(listen), sorted(unlisten)))
        d.addCallbacks(self._done, self._failed, callbackArgs=(generation, listen, unlisten),
                       errbackArgs=(generation, listen, unlisten))

    def _statement(self, listen: list[int], unlisten: list[int]) -> str:
        return "; ".join(
            [f"LISTEN {quote_ident(channel_name(self.channel, n))}" for n in listen]
            + [f"UNLISTEN {quote_ident(channel_name(self.channel, n))}" for n in unlisten]
        )

    def _done(self, _: object, generation: int, listen: list[int], unlisten: list[int]) -> None:
        if generation != self._generation:
            return  # that connection is gone; connected() started over
        self._in_flight = False
        covered: list[str] = []
        for n in listen:
            shard = self._by_shard[n]
            shard.state = _State.LISTENED
            covered.extend(shard.keys)
            if not shard.keys:
                self._start_linger(n, shard)
        for n in unlisten:
            shard = self._by_shard[n]
            shard.state = _State.IDLE
            if shard.keys:
                self._dirty.add(n)  # a key came while UNLISTEN was in flight: LISTEN again
            else:
                del self._by_shard[n]
        self._schedule()
        if covered:
            self.on_covered(covered)

    def _failed(
        self, failure: Failure, generation: int, listen: list[int], unlisten: list[int]
    ) -> None:
        if generation != self._generation:
            return
        # A failed statement on a live connection rolls back whole: nothing changed.  (A lost
        # connection is the detector's to report, through connection_lost.)
        _log.warn("cannot change the channels listened on: {error}",
                  event="listen_failed", error=failure.getErrorMessage())
        self._in_flight = False
        for n in listen:
            self._by_shard[n].state = _State.IDLE
            self._dirty.add(n)
        for n in unlisten:
            shard = self._by_shard[n]
            shard.state = _State.LISTENED
            if not shard.keys:
                self._start_linger(n, shard)
        if self._flush_call is None and self._connected:
            self._flush_call = self.clock.callLater(1.0, self._flush)

    # -- lingering ----------------------------------------------------------------------------

    def _start_linger(self, number: int, shard: _Shard) -> None:
        self._cancel_linger(shard)
        shard.linger = self.clock.callLater(self.linger, self._lingered, number)

    def _cancel_linger(self, shard: _Shard) -> None:
        if shard.linger is not None and shard.linger.active():
            shard.linger.cancel()
        shard.linger = None

    def _lingered(self, number: int) -> None:
        shard = self._by_shard.get(number)
        if shard is None:
            return
        shard.linger = None
        if not shard.keys and shard.state is _State.LISTENED:
            self._schedule(number)
