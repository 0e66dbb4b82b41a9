"""The shards a daemon LISTENs on (``[database] notify_shards``), driven by a Clock and a fake
LISTEN connection: counts per shard, one statement per turn, the linger, in-flight states."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_novnc.database.channels import LINGER, ChannelSet, shard_of


class Connection:
    """Statements as the store's LISTEN connection would run them, answered by the test."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.pending: list[Deferred[object]] = []

    def execute(self, statement: str) -> Deferred[object]:
        self.statements.append(statement)
        d: Deferred[object] = Deferred()
        self.pending.append(d)
        return d

    def complete(self) -> None:
        d = self.pending.pop(0)
        d.callback(None)


def keys_in(shard: int, shards: int, count: int) -> list[str]:
    """``count`` distinct keys that fall in ``shard``."""
    found = []
    i = 0
    while len(found) < count:
        key = f"session-{i}"
        if shard_of(key, shards) == shard:
            found.append(key)
        i += 1
    return found


def make(shards: int = 16):
    clock, connection, covered = Clock(), Connection(), []
    channels = ChannelSet("tn", shards, clock, connection.execute, covered.append)
    assert channels.connected() is None
    channels.listened_all()
    return channels, clock, connection, covered


@given(st.text(max_size=40), st.integers(1, 70000))
def test_shard_is_the_md5_prefix(key: str, shards: int) -> None:
    """The shard is the first 7 hex digits of the id's md5 (UTF-8), modulo N, as in plpgsql."""
    expected = int(hashlib.md5(key.encode()).hexdigest()[:7], 16) % shards
    assert shard_of(key, shards) == expected


def test_first_key_listens_once_per_turn():
    """The keys followed in one reactor turn make one statement, one LISTEN per shard."""
    channels, clock, connection, covered = make()
    a, b = keys_in(3, 16, 2)
    (c,) = keys_in(5, 16, 1)
    for key in (a, b, c):
        channels.follow(key)
    assert connection.statements == []
    clock.advance(0)
    assert connection.statements == ['LISTEN "tn_3"; LISTEN "tn_5"']
    assert not channels.is_covered(a)
    connection.complete()
    assert channels.is_covered(a) and channels.is_covered(c)
    assert sorted(covered[0]) == sorted([a, b, c])
    assert channels.listened == 2


def test_key_in_a_listened_shard_sends_nothing():
    """A second key of a listened shard is covered at once: no statement, no re-read needed."""
    channels, clock, connection, covered = make()
    a, b = keys_in(3, 16, 2)
    channels.follow(a)
    clock.advance(0)
    connection.complete()
    channels.follow(b)
    clock.advance(0)
    assert len(connection.statements) == 1
    assert channels.is_covered(b)


def test_key_arriving_during_listen_is_covered_when_it_completes():
    """A key whose shard's LISTEN is in flight is named when that LISTEN completes."""
    channels, clock, connection, covered = make()
    a, b = keys_in(3, 16, 2)
    channels.follow(a)
    clock.advance(0)
    channels.follow(b)
    clock.advance(0)
    assert len(connection.statements) == 1
    connection.complete()
    assert sorted(covered[0]) == sorted([a, b])


def test_last_key_gone_unlistens_after_the_linger():
    """A shard left empty stays listened for LINGER seconds, then is UNLISTENed."""
    channels, clock, connection, covered = make()
    (a,) = keys_in(3, 16, 1)
    channels.follow(a)
    clock.advance(0)
    connection.complete()
    channels.unfollow(a)
    clock.advance(LINGER - 1)
    assert len(connection.statements) == 1
    clock.advance(1)
    clock.advance(0)
    assert connection.statements[-1] == 'UNLISTEN "tn_3"'
    assert channels.listened == 1, "counted until the UNLISTEN completes"
    connection.complete()
    assert channels.listened == 0
    assert clock.getDelayedCalls() == []


def test_churn_within_the_linger_sends_nothing():
    """A key leaving and another coming within the linger keeps the LISTEN: no statement."""
    channels, clock, connection, covered = make()
    a, b = keys_in(3, 16, 2)
    channels.follow(a)
    clock.advance(0)
    connection.complete()
    for _ in range(5):
        channels.unfollow(a)
        clock.advance(LINGER / 2)
        channels.follow(b)
        channels.unfollow(b)
        clock.advance(LINGER / 2 - 0.1)
        channels.follow(a)
        clock.advance(0)
    assert len(connection.statements) == 1
    assert channels.is_covered(a)


def test_key_arriving_during_unlisten_listens_again_after():
    """A key whose shard's UNLISTEN is in flight: LISTEN again once it completes, then covered."""
    channels, clock, connection, covered = make()
    a, b = keys_in(3, 16, 2)
    channels.follow(a)
    clock.advance(0)
    connection.complete()
    channels.unfollow(a)
    clock.advance(LINGER)
    clock.advance(0)
    assert connection.statements[-1] == 'UNLISTEN "tn_3"'
    channels.follow(b)
    clock.advance(0)
    assert len(connection.statements) == 2, "one statement in flight at a time"
    assert not channels.is_covered(b)
    connection.complete()
    clock.advance(0)
    assert connection.statements[-1] == 'LISTEN "tn_3"'
    connection.complete()
    assert channels.is_covered(b)
    assert covered[-1] == [b]


def test_listen_and_unlisten_go_together():
    """One turn's LISTENs and UNLISTENs make one statement."""
    channels, clock, connection, covered = make()
    channels.linger = 0
    (a,) = keys_in(3, 16, 1)
    (b,) = keys_in(4, 16, 1)
    channels.follow(a)
    clock.advance(0)
    connection.complete()
    channels.unfollow(a)
    channels.follow(b)
    clock.advance(0)
    assert connection.statements[-1] == 'LISTEN "tn_4"; UNLISTEN "tn_3"'


def test_connection_lost_then_reconnect_listens_every_shard_with_a_key():
    """After a lost connection nothing is covered or sent; the reconnect LISTENs every shard
    with a key in one statement, and a late answer from the dead connection is ignored."""
    channels, clock, connection, covered = make()
    (a,) = keys_in(3, 16, 1)
    (b,) = keys_in(4, 16, 1)
    (c,) = keys_in(7, 16, 1)
    channels.follow(a)
    channels.follow(c)
    clock.advance(0)
    connection.complete()
    channels.follow(b)
    clock.advance(0)  # LISTEN tn_4 in flight
    channels.unfollow(c)  # tn_7 lingers
    channels.connection_lost()
    assert channels.listened == 0 and not channels.is_covered(a)
    channels.follow(keys_in(9, 16, 1)[0])
    clock.advance(LINGER * 2)
    assert len(connection.statements) == 2
    assert channels.connected() == 'LISTEN "tn_3"; LISTEN "tn_4"; LISTEN "tn_9"'
    connection.complete()  # the dead connection's late answer
    assert not channels.is_covered(b)
    channels.listened_all()
    assert channels.is_covered(a) and channels.is_covered(b)
    assert channels.listened == 3
    clock.advance(0)
    assert len(connection.statements) == 2


def test_failed_statement_is_retried():
    """A statement the server refused changed nothing: its LISTENs are tried again."""
    channels, clock, connection, covered = make()
    (a,) = keys_in(3, 16, 1)
    channels.follow(a)
    clock.advance(0)
    connection.pending.pop(0).errback(RuntimeError("boom"))
    assert not channels.is_covered(a)
    clock.advance(1)
    assert connection.statements == ['LISTEN "tn_3"'] * 2
    connection.complete()
    assert channels.is_covered(a)


def test_nothing_sent_before_connected():
    """Keys followed before the first connect are LISTENed by the connect's statement."""
    clock, connection, covered = Clock(), Connection(), []
    channels = ChannelSet("tn", 16, clock, connection.execute, covered.append)
    (a,) = keys_in(3, 16, 1)
    channels.follow(a)
    clock.advance(0)
    assert connection.statements == []
    assert channels.connected() == 'LISTEN "tn_3"'
    channels.listened_all()
    assert channels.is_covered(a)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=60))
def test_covered_is_exactly_the_followed_keys_once_quiet(ops: list[tuple[bool, int]]) -> None:
    """Whatever the order of follows and unfollows, once every statement has completed every
    followed key is covered, and after the linger only their shards are listened."""
    channels, clock, connection, covered = make(shards=8)
    followed: dict[str, int] = {}
    for add, i in ops:
        key = f"k{i}"
        if add:
            followed[key] = followed.get(key, 0) + 1
            if followed[key] == 1:
                channels.follow(key)
        elif followed.get(key):
            followed[key] -= 1
            if followed[key] == 0:
                channels.unfollow(key)
                del followed[key]
        clock.advance(0)
        if connection.pending and i % 3 == 0:
            connection.complete()
    for _ in range(100):
        clock.advance(LINGER)
        if not connection.pending:
            break
        connection.complete()
    assert all(channels.is_covered(k) for k in followed)
    assert channels.listened == len({shard_of(k, 8) for k in followed})
