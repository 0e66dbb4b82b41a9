"""The readiness gate, driven by a Clock and an in-memory session source."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.session import SessionRow, Target
from twisted_novnc.testing import MemorySessionSource

SID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"


def make_gate(source: MemorySessionSource | None = None, timeout: float = 30.0):
    clock = Clock()
    source = source or MemorySessionSource()
    gate = ReadinessGate(source, clock, timeout, frozenset({"ended", "failed"}), 5900)
    return gate, source, clock


def result_of(d):
    results = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def refusal_of(d) -> Refusal:
    failure = result_of(d)
    assert hasattr(failure, "value") and isinstance(failure.value, Refused), failure
    return failure.value.refusal


def test_ready_row_fires_after_first_read():
    """A session whose committed row has a vm_ip fires on the first read, with the default port."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "running")
    d = gate.when_ready(SID)
    assert not d.called, "the read happens on the next reactor turn, after registration"
    clock.advance(0)
    assert result_of(d) == Target(SID, "10.0.0.5", 5900)
    assert gate.waiting == 0


def test_port_column_overrides_default_port():
    """A non-null port in the row overrides target_port."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, "10.0.0.5", 5901, None)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert result_of(d).port == 5901


def test_waits_for_notify_after_absent_row():
    """An absent row keeps the waiter; a NOTIFY re-reads and fires it."""
    gate, source, clock = make_gate()
    d = gate.when_ready(SID)
    clock.advance(0)
    assert not d.called
    source.rows[SID] = SessionRow(SID, "10.0.0.7", None, "running")
    clock.advance(1)
    assert not d.called, "no polling: only a notification causes a re-read"
    gate.notified(SID)
    clock.advance(0)
    assert result_of(d).host == "10.0.0.7"


def test_null_vm_ip_keeps_waiting():
    """A row without vm_ip is not ready; the waiter stays until the row gets one."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, None, None, "starting")
    d = gate.when_ready(SID)
    clock.advance(0)
    gate.notified(SID)
    clock.advance(0)
    assert not d.called
    assert gate.waiting_for(SID) == 1


def test_notify_during_read_causes_another_read():
    """A commit whose NOTIFY arrives while a read is in flight is not lost: it is read again."""
    source = MemorySessionSource(hold=True)
    gate, source, clock = make_gate(source)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert len(source.fetches) == 1
    gate.notified(SID)  # the commit lands while the first read is in flight
    clock.advance(0)
    assert len(source.fetches) == 1, "one read in flight at a time"
    source.release()  # the first read saw the old state: nothing
    source.rows[SID] = SessionRow(SID, "10.0.0.9", None, None)
    clock.advance(0)
    assert len(source.fetches) == 2
    source.release()
    assert result_of(d).host == "10.0.0.9"


def test_the_next_read_leaves_before_the_rows_are_judged():
    """A burst's sessions notified during a read are asked for as soon as its answer arrives,
    before its rows are judged (that query runs while the first relays open); still one
    query in flight, and the answers judged in the order they were asked for."""
    source = MemorySessionSource(hold=True)
    gate, source, clock = make_gate(source)
    seen: list[tuple[str, int]] = []
    waits = {}
    for sid in ("a", "b"):
        source.rows[sid] = SessionRow(sid, "10.0.0.1", None, None)
        waits[sid] = gate.when_ready(sid)
        waits[sid].addCallback(lambda t: seen.append((t.session_id, len(source.fetches))))
        clock.advance(0)  # "a" is read alone; "b" waits for that read to come back
    assert [set(f) for f in source.fetches] == [{"a"}]
    source.hold = False  # the second read, once sent, is answered at once
    source.release()
    assert seen == [("a", 2), ("b", 2)]
    assert gate.waiting == 0 and clock.getDelayedCalls() == []


def test_notifications_are_batched():
    """Many notifications in one turn become one query naming all the sessions."""
    gate, source, clock = make_gate()
    ids = [f"s{i}" for i in range(50)]
    waits = [gate.when_ready(i) for i in ids]
    clock.advance(0)
    assert len(source.fetches) == 1 and len(source.fetches[0]) == 50
    for i in ids:
        source.rows[i] = SessionRow(i, "10.1.0.1", None, None)
        gate.notified(i)
    clock.advance(0)
    assert len(source.fetches) == 2 and len(source.fetches[1]) == 50
    assert all(isinstance(result_of(d), Target) for d in waits)


def test_notification_for_unknown_session_reads_nothing():
    """A NOTIFY for a session nobody waits for costs no query."""
    gate, source, clock = make_gate()
    gate.notified("nobody")
    clock.advance(0)
    assert source.fetches == []


@pytest.mark.parametrize("status", ["ended", "failed"])
def test_ended_session_fails_at_once(status):
    """An ended status refuses with 4410 immediately, not at the deadline."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, status)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert refusal_of(d) is Refusal.ENDED
    assert Refusal.ENDED.close_code == 4410


def test_timeout_absent_row_is_not_found():
    """A row still absent at the deadline gives 4404, and leaves nothing behind."""
    gate, source, clock = make_gate(timeout=5)
    d = gate.when_ready(SID)
    clock.advance(0)
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert refusal_of(d) is Refusal.NOT_FOUND
    assert gate.waiting == 0 and clock.getDelayedCalls() == []


def test_timeout_row_without_ip_is_not_ready():
    """A row present but without vm_ip at the deadline gives 4504."""
    gate, source, clock = make_gate(timeout=5)
    source.rows[SID] = SessionRow(SID, None, None, "booting")
    d = gate.when_ready(SID)
    clock.advance(5)
    assert refusal_of(d) is Refusal.NOT_READY


def test_database_errors_retry_then_give_4503():
    """Failed reads are retried with backoff; at the deadline a failing database gives 4503."""
    source = MemorySessionSource(fail_with=RuntimeError("connection refused"))
    gate, source, clock = make_gate(source, timeout=3)
    d = gate.when_ready(SID)
    for _ in range(30):
        clock.advance(0.1)
    assert len(source.fetches) > 2, "reads are retried while the database fails"
    assert refusal_of(d) is Refusal.DATABASE_UNAVAILABLE
    assert clock.getDelayedCalls() == []


class RaisingSource(MemorySessionSource):
    """A source whose fetch raises instead of failing its Deferred."""

    def fetch(self, session_ids):
        self.fetches.append(frozenset(session_ids))
        raise RuntimeError("connection refused")


def test_a_fetch_that_raises_is_a_failed_read():
    """A fetch that raises is a failed read like any other (retried, 4503 at the deadline),
    not a gate that never reads again."""
    gate, source, clock = make_gate(RaisingSource(), timeout=3)
    d = gate.when_ready(SID)
    for _ in range(30):
        clock.advance(0.1)
    assert len(source.fetches) > 2, "reads are retried"
    assert refusal_of(d) is Refusal.DATABASE_UNAVAILABLE
    assert clock.getDelayedCalls() == []


def test_database_recovers_before_deadline():
    """A waiter whose reads failed still connects when the database answers in time."""
    source = MemorySessionSource(fail_with=RuntimeError("down"))
    gate, source, clock = make_gate(source, timeout=10)
    d = gate.when_ready(SID)
    clock.advance(0)
    source.fail_with = None
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, None)
    for _ in range(40):
        clock.advance(0.1)
    assert isinstance(result_of(d), Target)


def test_cancel_removes_waiter_and_timer():
    """A browser that leaves while waiting leaves no waiter and no timer behind."""
    gate, source, clock = make_gate()
    d = gate.when_ready(SID)
    clock.advance(0)
    assert gate.waiting == 1 and len(clock.getDelayedCalls()) == 1
    d.cancel()
    assert result_of(d).check(CancelledError)
    assert gate.waiting == 0 and clock.getDelayedCalls() == []


def test_cancel_before_first_read_cancels_the_read():
    """Cancelling before the first read leaves no scheduled read either."""
    gate, source, clock = make_gate()
    d = gate.when_ready(SID)
    d.cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(0)
    assert source.fetches == []


def test_one_commit_fires_every_waiter_of_a_session():
    """Several browsers on one session are all served by one read."""
    gate, source, clock = make_gate()
    waits = [gate.when_ready(SID) for _ in range(3)]
    clock.advance(0)
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, None)
    gate.notified(SID)
    clock.advance(0)
    assert [result_of(d).host for d in waits] == ["10.0.0.5"] * 3


def test_listening_rereads_every_waiter():
    """After LISTEN is re-established, every waiter is read again (notifications were lost)."""
    gate, source, clock = make_gate()
    d = gate.when_ready(SID)
    clock.advance(0)
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, None)
    gate.not_listening()
    gate.listening()
    clock.advance(0)
    assert isinstance(result_of(d), Target)


def test_bad_vm_address_is_refused():
    """A vm_ip that is not an IP literal is refused with 4502, never resolved."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, "vm.example.com", None, None)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert refusal_of(d) is Refusal.BAD_VM_ADDRESS


@pytest.mark.parametrize("vm_ip", ["fd00::2%lo", "fe80::1%eth0", "fe80::1%1/128"])
def test_scoped_ipv6_vm_address_is_refused(vm_ip):
    """An IPv6 vm_ip with a zone is a bad VM address (4403): the allowlist cannot judge the
    interface it names, and the connect would fail on it."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, vm_ip, None, None)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert refusal_of(d) is Refusal.BAD_VM_ADDRESS


def test_unscoped_ipv6_vm_address_is_ready():
    """The same addresses without a zone are ready as usual."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, "fd00::2", None, None)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert result_of(d).host == "fd00::2"


def test_fail_all_refuses_every_waiter():
    """Shutting down fails every waiter with the given refusal and leaves no timers."""
    gate, source, clock = make_gate()
    waits = [gate.when_ready(f"s{i}") for i in range(3)]
    gate.fail_all(Refusal.SHUTTING_DOWN)
    assert [refusal_of(d) for d in waits] == [Refusal.SHUTTING_DOWN] * 3
    assert clock.getDelayedCalls() == []


def live(gate, clock, source, sid=SID, expires_at=None):
    """A watched live relay on ``sid``; returns the list its revocations land in."""
    revoked: list[Refused] = []
    source.rows[sid] = SessionRow(sid, "10.0.0.5", None, "running", expires_at)
    d = gate.when_ready(sid)
    clock.advance(0)
    gate.watch(result_of(d), revoked.append)
    return revoked


@pytest.mark.parametrize(
    "change, refusal",
    [
        (lambda rows: rows.pop(SID), Refusal.ENDED),
        (lambda rows: rows.update({SID: SessionRow(SID, "10.0.0.5", None, "ended")}),
         Refusal.ENDED),
        (lambda rows: rows.update({SID: SessionRow(SID, "10.0.0.6", None, "running")}),
         Refusal.MOVED),
        (lambda rows: rows.update({SID: SessionRow(SID, "10.0.0.5", 5901, "running")}),
         Refusal.MOVED),
    ],
    ids=["deleted", "ended", "new-ip", "new-port"],
)
def test_live_session_is_revoked_on_notify(change, refusal):
    """A deleted, ended or moved row revokes its live relays on the NOTIFY, once."""
    gate, source, clock = make_gate()
    revoked = live(gate, clock, source)
    change(source.rows)
    gate.notified(SID)
    clock.advance(0)
    assert [r.refusal for r in revoked] == [refusal]
    gate.notified(SID)
    clock.advance(0)
    assert len(revoked) == 1 and gate.watched == 0


def test_unrelated_update_keeps_live_session():
    """An update that keeps the VM address (e.g. a status change) does not revoke."""
    gate, source, clock = make_gate()
    revoked = live(gate, clock, source)
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "in_use")
    gate.notified(SID)
    clock.advance(0)
    assert revoked == [] and gate.watched == 1


def test_live_session_expires_on_time():
    """With an expiry, the relay is revoked (4410 expired) when that time comes."""
    gate, source, clock = make_gate()
    clock.advance(1000)
    revoked = live(gate, clock, source, expires_at=1060.0)
    clock.advance(59)
    assert revoked == []
    clock.advance(1)
    assert [r.refusal for r in revoked] == [Refusal.EXPIRED]
    assert clock.getDelayedCalls() == []


def test_expiry_moved_by_update():
    """An UPDATE of the expiry moves the revocation time."""
    gate, source, clock = make_gate()
    revoked = live(gate, clock, source, expires_at=60.0)
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "running", 120.0)
    gate.notified(SID)
    clock.advance(0)
    clock.advance(60)
    assert revoked == []
    clock.advance(60)
    assert [r.refusal for r in revoked] == [Refusal.EXPIRED]


def test_expired_session_is_refused():
    """A session whose expiry has passed is refused with 4410 before any connection."""
    gate, source, clock = make_gate()
    clock.advance(100)
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "running", 50.0)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert refusal_of(d) is Refusal.EXPIRED


def test_unwatch_leaves_nothing():
    """Unwatching (the relay ended) cancels the expiry timer and forgets the session."""
    gate, source, clock = make_gate()
    revoked: list[Refused] = []
    watch = gate.watch(Target(SID, "10.0.0.5", 5900, 500.0), revoked.append)
    assert len(clock.getDelayedCalls()) == 1
    gate.unwatch(watch)
    assert gate.watched == 0 and clock.getDelayedCalls() == []
    gate.notified(SID)
    clock.advance(0)
    assert source.fetches == []


def test_database_outage_does_not_revoke():
    """Failed reads never revoke a live relay."""
    gate, source, clock = make_gate()
    revoked = live(gate, clock, source)
    source.fail_with = RuntimeError("down")
    gate.notified(SID)
    for _ in range(20):
        clock.advance(0.5)
    assert revoked == [] and gate.watched == 1


def test_stuck_query_does_not_hold_later_reads():
    """A lookup that never answers is given up after query_timeout; reads go on."""
    source = MemorySessionSource(hold=True)
    gate, source, clock = make_gate(source, timeout=30)
    d = gate.when_ready(SID)
    clock.advance(0)
    assert len(source.fetches) == 1
    source.hold = False
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, None)
    clock.advance(gate.query_timeout - 0.1)
    assert not d.called, "while the first read is stuck, no other read is started"
    clock.advance(0.1)  # the first read is abandoned, and read again at once
    assert len(source.fetches) == 2
    assert isinstance(result_of(d), Target)
    source.release()  # the stuck answer arriving late changes nothing
    assert gate.waiting == 0


def test_stuck_database_gives_4503_at_deadline():
    """Lookups that never answer end, at the deadline, in 4503."""
    source = MemorySessionSource(hold=True)
    gate, source, clock = make_gate(source, timeout=12)
    d = gate.when_ready(SID)
    for _ in range(130):
        clock.advance(0.1)
    assert refusal_of(d) is Refusal.DATABASE_UNAVAILABLE


@given(st.lists(st.tuples(st.sampled_from(["wait", "cancel", "ready", "end", "tick"]),
                          st.integers(0, 4)), max_size=40))
def test_waiting_counts_exactly_the_held_browsers(steps):
    """``waiting`` (asked on every connection, so kept as a count) always equals the number
    of Deferreds not yet fired, whatever mix of waits, cancels, commits, ends and deadlines."""
    gate, source, clock = make_gate(timeout=3.0)
    held: list = []
    for action, n in steps:
        sid = f"s{n}"
        if action == "wait":
            held.append(gate.when_ready(sid))
        elif action == "cancel" and held:
            held[n % len(held)].cancel()
        elif action in ("ready", "end"):
            source.rows[sid] = SessionRow(sid, "10.0.0.5", None,
                                          "running" if action == "ready" else "ended")
            gate.notified(sid)
        else:
            clock.advance(1.0)
        clock.advance(0)
        assert gate.waiting == sum(1 for d in held if not d.called)
    for d in held:
        d.addErrback(lambda f: None)


# -- a waiter's look at the row before it is ready (column tokens, issue 16) -----------------------


def test_on_row_sees_the_row_as_soon_as_it_exists_and_fails_that_waiter_alone():
    """``on_row`` is shown a row without vm_ip; a waiter whose check raises fails with that
    alone (no timer, no waiting count left), the others keep waiting and then fire."""
    gate, source, clock = make_gate()
    seen: list[SessionRow] = []

    def refuse(row: SessionRow) -> None:
        raise Refused(Refusal.FORBIDDEN, "wrong token")

    bad = gate.when_ready(SID, refuse)
    good = gate.when_ready(SID, seen.append)
    plain = gate.when_ready(SID)
    clock.advance(0)
    assert not bad.called and seen == [], "no row yet: nothing to show"
    source.rows[SID] = SessionRow(SID, None, token_digest="d")
    gate.notified(SID)
    clock.advance(0)
    assert refusal_of(bad) is Refusal.FORBIDDEN
    assert seen == [SessionRow(SID, None, token_digest="d")]
    assert gate.waiting == 2 and not good.called and not plain.called
    assert len(clock.getDelayedCalls()) == 2
    source.rows[SID] = SessionRow(SID, "10.0.0.5", token_digest="d")
    gate.notified(SID)
    clock.advance(0)
    assert len(seen) == 2, "the ready row is shown too, before the waiter fires"
    assert result_of(good).host == result_of(plain).host == "10.0.0.5"


def test_on_row_failing_every_waiter_leaves_nothing_behind():
    """When every waiter's check fails, nothing of the session stays tracked."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, None)

    def refuse(row: SessionRow) -> None:
        raise Refused(Refusal.FORBIDDEN, "no")

    d = gate.when_ready(SID, refuse)
    clock.advance(0)
    assert refusal_of(d) is Refusal.FORBIDDEN
    assert gate.waiting == 0 and gate._seen == {} and clock.getDelayedCalls() == []


def test_on_row_is_asked_in_arrival_order():
    """Waiters are judged in the order they came, so the earliest gets a limited slot."""
    gate, source, clock = make_gate()
    order: list[int] = []
    for i in range(5):
        gate.when_ready(SID, lambda row, i=i: order.append(i))
    source.rows[SID] = SessionRow(SID, None)
    clock.advance(0)
    assert order == [0, 1, 2, 3, 4]


def test_session_key_is_the_canonical_id():
    """Every spelling of one UUID has one key; an id no row can have has none."""
    gate, _, _ = make_gate(MemorySessionSource(id_type="uuid"))
    spellings = [SID.upper(), "{" + SID + "}", SID.replace("-", ""), SID]
    assert {gate.session_key(s) for s in spellings} == {SID}
    assert gate.session_key("not-a-uuid") is None


def test_notifications_are_counted_needed_or_discarded():
    """Each NOTIFY adds one to needed (a waiter or live relay has the session) or discarded."""
    gate, source, clock = make_gate()
    gate.when_ready(SID)
    clock.advance(0)
    gate.notified(SID)
    gate.notified("nobody")
    gate.notified("nobody else")
    assert (gate.counts.needed, gate.counts.discarded) == (1, 2)
    revoked = live(gate, clock, source, sid="4a2d7b63-9b5f-4b66-a064-1f7b1d4d3b21")
    gate.notified("4a2d7b63-9b5f-4b66-a064-1f7b1d4d3b21")
    assert (gate.counts.needed, gate.counts.discarded) == (2, 2) and revoked == []


def test_counts_are_the_injected_metrics():
    """The gate counts into the daemon's metrics, which the scrape shows with the gauges."""
    from twisted_novnc.operations.metrics import Metrics

    metrics = Metrics()
    clock = Clock()
    gate = ReadinessGate(MemorySessionSource(), clock, 30.0, frozenset(), 5900,
                         counts=metrics.readiness)
    metrics.readiness.watched = lambda: gate.watched
    metrics.readiness.delayed_calls = lambda: len(clock.getDelayedCalls())
    d = gate.when_ready(SID)
    gate.notified(SID)
    gate.notified("nobody")
    registry = metrics.registry
    assert registry.get_sample_value("twisted_novnc_notifications_total",
                                     {"result": "needed"}) == 1
    assert registry.get_sample_value("twisted_novnc_notifications_total",
                                     {"result": "discarded"}) == 1
    # The waiter's deadline and the read scheduled for the next turn.
    assert registry.get_sample_value("twisted_novnc_delayed_calls") == 2
    d.cancel()
    d.addErrback(lambda f: f.trap(CancelledError))
    assert registry.get_sample_value("twisted_novnc_delayed_calls") == 0
    assert registry.get_sample_value("twisted_novnc_watched_relays") == 0


# --- interest per key, for LISTEN per shard ([database] notify_shards) ----------------------


def test_follows_a_key_while_it_has_a_waiter_or_a_watch():
    """The source hears follow at a key's first waiter or watch and unfollow when the last of
    them is gone, not per waiter."""
    gate, source, clock = make_gate()
    first, second = gate.when_ready(SID), gate.when_ready(SID)
    assert source.followed == {SID}
    first.cancel()
    assert source.followed == {SID}
    watch = gate.watch(Target(SID, "10.0.0.5", 5900), lambda error: None)
    second.cancel()
    assert source.followed == {SID}, "the watch keeps it"
    gate.unwatch(watch)
    assert source.followed == set()


def test_served_waiter_unfollows():
    """A waiter served from the first read leaves nothing followed."""
    gate, source, clock = make_gate()
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "running")
    d = gate.when_ready(SID)
    clock.advance(0)
    assert result_of(d).host == "10.0.0.5"
    assert source.followed == set()


def test_listening_for_keys_rereads_them():
    """A commit between the first read and the shard's LISTEN is found by the read that
    listening(keys) starts; keys nobody waits for are not read."""
    gate, source, clock = make_gate()
    d = gate.when_ready(SID)
    clock.advance(0)
    assert not d.called
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "running")  # committed, no NOTIFY
    gate.listening([SID, "someone-else"])
    clock.advance(0)
    assert result_of(d).host == "10.0.0.5"
    assert source.fetches[-1] == frozenset({SID})


# -- a relay whose watch starts after the read that served it --------------------------------


def served(gate, source, clock, sid=SID):
    """A waiter served from a read; its relay not yet watched (its VM still connecting)."""
    source.rows[sid] = SessionRow(sid, "10.0.0.5", None, "running")
    d = gate.when_ready(sid)
    clock.advance(0)
    return result_of(d)


def test_session_ended_before_its_relay_is_watched_is_revoked():
    """The session ends while its relay is being set up (a VNC login takes seconds): that NOTIFY
    found no waiter and no watch.  Watching then reads the row again and revokes."""
    gate, source, clock = make_gate()
    target = served(gate, source, clock)
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "ended")
    gate.notified(SID)
    revoked = []
    gate.watch(target, revoked.append)
    clock.advance(0)
    assert [r.refusal for r in revoked] == [Refusal.ENDED]
    assert gate.watched == 0


def test_no_notify_since_the_read_means_no_second_read():
    """The usual case costs nothing: no NOTIFY for the session since its read, no read."""
    gate, source, clock = make_gate()
    target = served(gate, source, clock)
    gate.notified("another-session")
    reads = len(source.fetches)
    gate.watch(target, lambda r: None)
    clock.advance(0)
    assert len(source.fetches) == reads and gate.watched == 1


def test_a_notify_sent_during_the_read_is_not_lost():
    """A NOTIFY that arrives while the read is in flight: the row read may predate it, and the
    waiter it would have re-read for is gone once served."""
    gate, source, clock = make_gate()
    source.hold = True
    source.rows[SID] = SessionRow(SID, "10.0.0.5", None, "running")
    d = gate.when_ready(SID)
    clock.advance(0)
    gate.notified(SID)  # its commit reached the server after the read's snapshot
    source.hold = False
    source.release()
    target = result_of(d)
    assert target.host == "10.0.0.5"
    source.rows[SID] = SessionRow(SID, "10.0.0.9", None, "running")
    revoked = []
    gate.watch(target, revoked.append)
    clock.advance(0)
    assert [r.refusal for r in revoked] == [Refusal.MOVED]


def test_listen_regained_or_notify_forgotten_reads_again():
    """LISTEN lost and regained since the read, or so many NOTIFYs since that this one may have
    been forgotten: read again rather than trust the old row."""
    from twisted_novnc.database.readiness import RECENT_NOTIFIED

    gate, source, clock = make_gate()
    target = served(gate, source, clock)
    gate.listening()
    reads = len(source.fetches)
    gate.watch(target, lambda r: None)
    clock.advance(0)
    assert len(source.fetches) == reads + 1

    other = "5b0f3c2a-8a4e-4a55-9f53-0f6a0f3c2a10"
    target = served(gate, source, clock, other)
    for i in range(RECENT_NOTIFIED + 1):
        gate.notified(f"s{i}")
    reads = len(source.fetches)
    gate.watch(target, lambda r: None)
    clock.advance(0)
    assert source.fetches[reads:] == [frozenset({other})]


def test_a_moved_relay_is_not_judged_by_event_counts():
    """A relay taken over from another process has no read of ours (read_at None): the
    upgrade path asks for its recheck itself."""
    gate, source, clock = make_gate()
    for i in range(10):
        gate.notified(SID if i % 2 else "x")
    reads = len(source.fetches)
    gate.watch(Target(SID, "10.0.0.5", 5900), lambda r: None)
    clock.advance(0)
    assert len(source.fetches) == reads


def test_a_read_the_closing_store_fails_is_no_outage(logged):
    """At shutdown the gate is closed before the store: a read still in flight (a live relay's
    row) that the closing store fails logs no "session lookup failed", schedules no retry,
    and nothing is read after."""
    gate, source, clock = make_gate()
    revoked = live(gate, clock, source)
    source.hold = True
    gate.notified(SID)
    clock.advance(0)
    assert len(source.fetches) == 2  # the NOTIFY's read, in flight
    gate.close()
    source.fail_with = RuntimeError("Connection was closed cleanly")
    source.release()
    gate.notified(SID)
    gate.listening()
    clock.advance(0)
    assert len(source.fetches) == 2 and revoked == []
    assert not [text for _, text in logged if "lookup failed" in text]
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_a_failed_read_nobody_waits_for_is_dropped(logged):
    """A read whose browsers all left while it was in flight fails quietly: no line, no
    retry (a retry would read for nobody)."""
    gate, source, clock = make_gate()
    source.hold = True
    d = gate.when_ready(SID)
    clock.advance(0)
    d.cancel()
    source.fail_with = RuntimeError("server closed the connection")
    source.release()
    assert not [text for _, text in logged if "lookup failed" in text]
    assert clock.getDelayedCalls() == [] and len(source.fetches) == 1
    d = gate.when_ready(SID)  # a browser still waiting: the failure is logged and retried
    clock.advance(0)
    source.release()
    assert [text for _, text in logged if "lookup failed" in text]
    assert gate.waiting == 1 and len(clock.getDelayedCalls()) == 2  # its deadline, the retry
    d.cancel()
