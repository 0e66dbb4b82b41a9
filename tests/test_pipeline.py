"""The request path on its own: match, admit, wait, authorize, connect, with no socket.

A Clock, a readiness gate and a connector the tests fire by hand (or the real gate over
in-memory sessions), and the Deferreds asserted at once with successResultOf/failureResultOf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_novnc.config import AuthSettings, NovncSettings
from twisted_novnc.database.ids import normalise_id
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.front.auth import mint_token, token_digest
from twisted_novnc.front.origins import OriginPolicy
from twisted_novnc.front.pipeline import Attempt, BrowserRequest, Connected, Pipeline
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.session import SessionRow, Target
from twisted_novnc.testing import MemorySessionSource

SID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"
OTHER = "0c7a4b0e-7d1c-4f64-9d2a-7e1f0a6e2b11"
TARGET = Target(SID, "10.0.0.5", 5900)
SECRET = b"0123456789abcdef-test-secret"

# successResultOf and friends, without a TestCase per test.
_case = SynchronousTestCase()
succeeded = _case.successResultOf
failed = _case.failureResultOf
no_result = _case.assertNoResult


@attrs.define
class FakeGate:
    """Readiness the test fires by hand: one Deferred per ``when_ready``, cancellable; ids
    canonical as for a ``uuid`` column; ``row`` shows a row to the waiters' checks."""

    pending: dict[str, list[Deferred[Target]]] = attrs.field(factory=dict)
    cancelled: list[str] = attrs.field(factory=list)
    checks: dict[int, Callable[[SessionRow], None]] = attrs.field(factory=dict)

    @property
    def waiting(self) -> int:
        return sum(len(ds) for ds in self.pending.values())

    def session_key(self, session_id: str) -> str | None:
        return normalise_id(session_id, "uuid")

    def when_ready(
        self, session_id: str, on_row: Callable[[SessionRow], None] | None = None
    ) -> Deferred[Target]:
        key = self.session_key(session_id) or session_id

        def cancel(d: Deferred[Target]) -> None:
            self.pending[key].remove(d)
            self.checks.pop(id(d), None)
            self.cancelled.append(key)

        d: Deferred[Target] = Deferred(cancel)
        self.pending.setdefault(key, []).append(d)
        if on_row is not None:
            self.checks[id(d)] = on_row
        return d

    def row(self, row: SessionRow) -> None:
        """A read found this row: each waiter's check sees it; one that raises fails."""
        for d in list(self.pending.get(row.session_id, [])):
            check = self.checks.get(id(d))
            if check is None:
                continue
            try:
                check(row)
            except Exception as e:
                self.pending[row.session_id].remove(d)
                del self.checks[id(d)]
                d.errback(e)
        if not self.pending.get(row.session_id, True):
            del self.pending[row.session_id]

    def ready(self, target: Target = TARGET) -> None:
        self.row(SessionRow(target.session_id, target.host, target.port,
                            token_digest=target.token_digest))
        for d in self.pending.pop(target.session_id, []):
            self.checks.pop(id(d), None)
            d.callback(target)

    def refuse(self, session_id: str, refusal: Refusal) -> None:
        for d in self.pending.pop(session_id, []):
            self.checks.pop(id(d), None)
            d.errback(Refused(refusal, "test"))


@attrs.define
class FakeUpstream:
    closed: list[tuple[int, str]] = attrs.field(factory=list)

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


@attrs.define
class FakeConnector:
    """Records each connect; the test fires it (or it has no canceller, like a stubborn one)."""

    calls: list[tuple[Target, float, str, str]] = attrs.field(factory=list)
    attempts: list[Deferred[Any]] = attrs.field(factory=list)
    cancelled: int = 0

    def __call__(self, target: Target, timeout: float, suffix: str, query: str) -> Deferred[Any]:
        self.calls.append((target, timeout, suffix, query))

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.attempts.append(d)
        return d


@attrs.define
class HeldTokens:
    """A token store whose answer the test gives, when it likes."""

    answers: list[Deferred[SessionRow | None]] = attrs.field(factory=list)

    def consume_token(self, session_id: str, digest: str) -> Deferred[SessionRow | None]:
        d: Deferred[SessionRow | None] = Deferred()
        self.answers.append(d)
        return d


@attrs.define
class World:
    """A pipeline over fakes, and the clock they share."""

    clock: Clock = attrs.field(factory=Clock)
    gate: Any = attrs.field(factory=FakeGate)
    tokens: Any = attrs.field(factory=MemorySessionSource)
    connect: FakeConnector = attrs.field(factory=FakeConnector)
    pipeline: Pipeline = attrs.field(init=False)
    settings: NovncSettings = attrs.field(factory=NovncSettings)
    auth: AuthSettings = attrs.field(factory=AuthSettings)
    targets: TargetPolicy = attrs.field(factory=lambda: TargetPolicy.from_config("10.0.0.0/8"))

    def __attrs_post_init__(self) -> None:
        self.clock.advance(1000)
        self.pipeline = Pipeline(
            self.settings, self.gate, self.tokens, self.targets, self.connect, self.clock,
            auth=self.auth, secret=SECRET,
        )

    def request(
        self, path: str = f"/websockify/{SID}", query: str = "", peer: str = "192.0.2.7",
        **fields: Any,
    ) -> Attempt:
        params = {}
        if query.startswith("token="):
            params = {"token": [query.split("=", 1)[1].split("&")[0]]}
        request = BrowserRequest(path, query, params, peer=peer, **fields)
        return self.pipeline.start(request)

    @property
    def counts(self) -> tuple[dict[str, int], ...]:
        limits = self.pipeline.limits
        return dict(limits.per_ip), dict(limits.per_session), dict(limits.waiting_per_ip)


def world(auth: AuthSettings | None = None, **novnc: Any) -> World:
    return World(settings=NovncSettings(**novnc), auth=auth or AuthSettings())


def refusal_of(attempt: Attempt) -> Refusal:
    refused = failed(attempt.result, Refused).value
    assert isinstance(refused, Refused)
    return refused.refusal


@pytest.fixture
def logged() -> Iterator[EventLoggingObserver]:
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


NOTHING: tuple[dict[str, int], ...] = ({}, {}, {})


# -- the whole path ------------------------------------------------------------------------------


def test_ready_session_is_connected_with_what_is_left_of_the_deadline(logged):
    """A request waits, its session becomes ready, the connector gets the target, the seconds
    left of readiness_timeout, the path suffix and the query without the token; the result
    is the upstream and the subprotocol to accept."""
    w = world(readiness_timeout=30)
    attempt = w.request(f"/websockify/{SID}/extra", "a=1&token=t&b=2", protocols=["binary"])
    no_result(attempt.result)
    assert w.counts == ({"192.0.2.7": 1}, {SID: 1}, {"192.0.2.7": 1})
    assert w.connect.calls == []
    w.clock.advance(4)
    w.gate.ready()
    assert w.connect.calls == [(TARGET, 26.0, "extra", "a=1&b=2")]
    assert w.counts == ({"192.0.2.7": 1}, {SID: 1}, {})
    upstream = FakeUpstream()
    w.clock.advance(0.5)
    w.connect.attempts[0].callback(upstream)
    assert succeeded(attempt.result) == Connected(TARGET, upstream, "binary")
    assert (attempt.started, attempt.ready_at) == (1000, 1004)
    messages = [e["log_format"].split(" ")[0] for e in logged]
    assert messages == ["request", "session"]
    assert logged[1]["wait_seconds"] == 4 and logged[1]["host"] == "10.0.0.5"
    attempt.leave()
    assert w.counts == NOTHING


def test_no_subprotocol_offered_none_accepted():
    """A browser that offers no subprotocol is accepted with none."""
    w = world()
    attempt = w.request()
    w.gate.ready()
    w.connect.attempts[0].callback(FakeUpstream())
    assert succeeded(attempt.result).subprotocol is None


def test_the_wait_and_connect_times_are_observed():
    """The readiness wait and the connect time go to their histograms."""
    w = world()
    attempt = w.request()
    w.clock.advance(2)
    w.gate.ready()
    w.clock.advance(0.25)
    w.connect.attempts[0].callback(FakeUpstream())
    succeeded(attempt.result)
    metrics = w.pipeline.metrics
    assert metrics.registry.get_sample_value("twisted_novnc_readiness_wait_seconds_sum") == 2
    assert metrics.registry.get_sample_value("twisted_novnc_upstream_connect_seconds_sum") == 0.25


# -- each refusal, and where it is decided ---------------------------------------------------------

ADMISSION = [
    ("bad path", {"path": "/nothing/here"}, {}, Refusal.BAD_PATH),
    ("no binary", {"protocols": ["base64"]}, {}, Refusal.BAD_SUBPROTOCOL),
    ("origin", {"origin": "https://evil.test"},
     {"allowed_origins": OriginPolicy.from_text("https://*.example.com")},
     Refusal.ORIGIN_FORBIDDEN),
    ("no origin", {}, {"allowed_origins": OriginPolicy.from_text("https://a.example.com")},
     Refusal.ORIGIN_FORBIDDEN),
]


@pytest.mark.parametrize(
    "fields, novnc, refusal", [c[1:] for c in ADMISSION], ids=[c[0] for c in ADMISSION]
)
def test_refused_before_counting_or_waiting(fields, novnc, refusal, logged):
    """Path, subprotocol and Origin are refused at once: nothing counted, nothing waited for,
    one 'refused' line with the code."""
    w = world(**novnc)
    attempt = w.request(**fields)
    assert refusal_of(attempt) is refusal
    assert w.counts == NOTHING and w.gate.pending == {}
    (line,) = logged
    assert line["event"] == "refused" and line["code"] == refusal.close_code


def test_a_refused_connection_gives_its_session_back_at_once():
    """Over max_per_session: 4429; the refused connection's session count is given back at the
    refusal, though its socket is still open (its close handshake runs); its address count
    lasts until it leaves."""
    w = world(max_per_session=1)
    first = w.request()
    over = w.request(peer="192.0.2.8")
    assert refusal_of(over) is Refusal.TOO_MANY
    assert w.counts[:2] == ({"192.0.2.7": 1, "192.0.2.8": 1}, {SID: 1})
    over.leave()
    assert w.counts[:2] == ({"192.0.2.7": 1}, {SID: 1})
    first.leave()
    assert w.counts == NOTHING


@pytest.mark.parametrize(
    "novnc, second",
    [
        ({"max_per_ip": 1}, {"path": f"/websockify/{OTHER}"}),
        ({"max_per_session": 1}, {"peer": "192.0.2.8"}),
        ({"max_waiting": 1}, {"path": f"/websockify/{OTHER}", "peer": "192.0.2.8"}),
        ({"max_waiting_per_ip": 1}, {"path": f"/websockify/{OTHER}"}),
    ],
    ids=["max_per_ip", "max_per_session", "max_waiting", "max_waiting_per_ip"],
)
def test_each_limit_is_4429(novnc, second):
    """One connection waiting; a second one over the limit gets 4429, and never waits."""
    w = world(**novnc)
    w.request()
    assert refusal_of(w.request(**second)) is Refusal.TOO_MANY
    assert w.gate.waiting == 1


def test_waiting_per_ip_is_4429():
    """More browsers of one address waiting than max_waiting_per_ip: 4429."""
    w = world(max_waiting_per_ip=1)
    w.request()
    assert refusal_of(w.request(f"/websockify/{OTHER}")) is Refusal.TOO_MANY


@pytest.mark.parametrize(
    "query, refusal",
    [
        ("", Refusal.TOKEN_REQUIRED),
        ("token=" + mint_token(SECRET, SID, 999), Refusal.TOKEN_EXPIRED),
        ("token=" + mint_token(b"another-secret-of-16+", SID, 5000), Refusal.FORBIDDEN),
        ("token=" + mint_token(SECRET, OTHER, 5000), Refusal.FORBIDDEN),
    ],
    ids=["missing", "expired", "forged", "other-session"],
)
def test_hmac_tokens_are_checked_before_any_waiting(query, refusal):
    """mode = hmac: a missing, expired or forged token is refused before any wait."""
    w = world(AuthSettings(mode="hmac", secret_file="x"))
    assert refusal_of(w.request(query=query)) is refusal
    assert w.gate.pending == {}


def test_a_valid_hmac_token_waits():
    """mode = hmac: a valid token goes on to wait."""
    w = world(AuthSettings(mode="hmac", secret_file="x"))
    attempt = w.request(query="token=" + mint_token(SECRET, SID, 5000))
    assert w.gate.waiting == 1
    no_result(attempt.result)


def test_column_token_required_before_waiting_and_matched_after():
    """mode = column: no token at all is 4401 at once; a wrong one is 4403 once the row (and
    its digest) is read; the right one connects."""
    auth = AuthSettings(mode="column", token_column="token_sha256")
    w = world(auth)
    assert refusal_of(w.request()) is Refusal.TOKEN_REQUIRED
    ready = Target(SID, "10.0.0.5", 5900, token_digest=token_digest("right"))
    wrong, right = w.request(query="token=wrong"), w.request(query="token=right")
    w.gate.ready(ready)
    assert refusal_of(wrong) is Refusal.FORBIDDEN
    assert len(w.connect.calls) == 1
    w.connect.attempts[0].callback(FakeUpstream())
    assert succeeded(right.result).target == ready


def test_one_time_token_is_spent_once():
    """one_time = on: the token store spends it; a second use, or a row without a token, is
    4403 token already used and never connected."""
    auth = AuthSettings(mode="column", token_column="token_sha256", one_time=True)
    w = world(auth)
    digest = token_digest("once")
    w.tokens.rows[SID] = SessionRow(SID, "10.0.0.5", 5900, token_digest=digest)
    first, second = w.request(query="token=once"), w.request(query="token=once")
    w.gate.ready(Target(SID, "10.0.0.5", 5900, token_digest=digest))
    assert len(w.connect.calls) == 1 and w.tokens.rows[SID].token_digest is None
    assert refusal_of(second) is Refusal.TOKEN_USED
    third = w.request(query="token=once")
    w.gate.ready(Target(SID, "10.0.0.5", 5900, token_digest=None))
    assert refusal_of(third) is Refusal.TOKEN_USED
    no_result(first.result)


def test_target_outside_the_policy_is_refused_before_any_token_is_spent():
    """A vm_ip outside allowed_networks is 4403 VM address not allowed: the one-time token is
    not spent and nothing is connected."""
    auth = AuthSettings(mode="column", token_column="token_sha256", one_time=True)
    w = world(auth)
    digest = token_digest("once")
    w.tokens.rows[SID] = SessionRow(SID, "192.168.1.5", 5900, token_digest=digest)
    attempt = w.request(query="token=once")
    w.gate.ready(Target(SID, "192.168.1.5", 5900, token_digest=digest))
    assert refusal_of(attempt) is Refusal.TARGET_FORBIDDEN
    assert w.tokens.rows[SID].token_digest == digest and w.connect.calls == []


@pytest.mark.parametrize("refusal", [Refusal.ENDED, Refusal.NOT_FOUND, Refusal.SHUTTING_DOWN])
def test_the_gates_refusals_pass_through(refusal, logged):
    """What the gate refuses with is the request's refusal, logged once."""
    w = world()
    attempt = w.request()
    w.gate.refuse(SID, refusal)
    assert refusal_of(attempt) is refusal
    assert [e["event"] for e in logged if e.get("event") in ("refused", "revoked")] == ["refused"]
    attempt.leave()
    assert w.counts == NOTHING


def test_connect_failures_are_4502_and_unexpected_errors_are_logged(logged):
    """A connector's Refused passes through; any other error is 4502 and logged as a failure
    (Autobahn would swallow it)."""
    w = world()
    refused, broken = w.request(), w.request(peer="192.0.2.8")
    w.gate.ready()
    w.connect.attempts[0].errback(Refused(Refusal.AT_CAPACITY, "no descriptor"))
    w.connect.attempts[1].errback(ZeroDivisionError("bug"))
    assert refusal_of(refused) is Refusal.AT_CAPACITY
    assert refusal_of(broken) is Refusal.VM_UNREACHABLE
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(ZeroDivisionError)


def test_order_of_the_checks():
    """Path before subprotocol before Origin before the token before the session's limit: the
    first check that fails names the refusal."""
    w = world(
        AuthSettings(mode="hmac", secret_file="x"),
        allowed_origins=OriginPolicy.from_text("https://a.example.com"), max_per_session=1,
    )
    bad = {"protocols": ["base64"], "origin": "https://evil.test"}
    assert refusal_of(w.request("/nope", **bad)) is Refusal.BAD_PATH
    assert refusal_of(w.request(**bad)) is Refusal.BAD_SUBPROTOCOL
    assert refusal_of(w.request(origin="https://evil.test")) is Refusal.ORIGIN_FORBIDDEN
    good = "token=" + mint_token(SECRET, SID, 5000)
    w.request(query=good, origin="https://a.example.com")
    over = w.request(origin="https://a.example.com")  # over the limit and without a token
    assert refusal_of(over) is Refusal.TOKEN_REQUIRED
    assert refusal_of(w.request(query=good, origin="https://a.example.com")) is Refusal.TOO_MANY


# -- the deadline ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, refusal",
    [(None, Refusal.NOT_FOUND), (SessionRow(SID, None), Refusal.NOT_READY)],
    ids=["no-row", "no-vm-ip"],
)
def test_deadline_with_the_real_gate(row, refusal):
    """With the real gate over in-memory rows: at readiness_timeout a missing row is 4404 and
    a row without vm_ip 4504, and the waiting count is given back."""
    clock = Clock()
    source = MemorySessionSource()
    if row is not None:
        source.rows[SID] = row
    gate = ReadinessGate(source, clock, 30, frozenset({"ended"}), 5900)
    w = World(clock=clock, gate=gate, tokens=source, settings=NovncSettings(readiness_timeout=30))
    attempt = w.request()
    clock.advance(0)
    no_result(attempt.result)
    clock.advance(29.9)
    no_result(attempt.result)
    clock.advance(0.1)
    assert refusal_of(attempt) is refusal
    assert w.counts == ({"192.0.2.7": 1}, {}, {})
    attempt.leave()
    assert w.counts == NOTHING


def test_what_is_left_of_the_deadline_after_a_slow_token_check():
    """The connector gets the deadline less everything before it, token spending included."""
    auth = AuthSettings(mode="column", token_column="token_sha256", one_time=True)
    w = World(tokens=HeldTokens(), auth=auth, settings=NovncSettings(readiness_timeout=10))
    digest = token_digest("once")
    w.request(query="token=once")
    w.clock.advance(3)
    w.gate.ready(Target(SID, "10.0.0.5", 5900, token_digest=digest))
    w.clock.advance(2)
    w.tokens.answers[0].callback(SessionRow(SID, "10.0.0.5"))
    assert w.connect.calls[0][1] == 5


# -- the browser leaving ---------------------------------------------------------------------------


def test_leaving_while_waiting_cancels_the_wait():
    """A browser that leaves while waiting: its wait is cancelled, the result is
    CancelledError (not a refusal, nothing logged), every count is given back."""
    w = world()
    attempt = w.request()
    attempt.leave()
    failed(attempt.result, CancelledError)
    assert w.gate.cancelled == [SID] and w.gate.waiting == 0
    assert w.counts == NOTHING


def test_leaving_with_the_real_gate_leaves_no_waiter():
    """Through the real gate: no waiter and no timer are left."""
    clock = Clock()
    source = MemorySessionSource()
    gate = ReadinessGate(source, clock, 30, frozenset({"ended"}), 5900)
    w = World(clock=clock, gate=gate, tokens=source)
    attempt = w.request()
    attempt.leave()
    assert gate.waiting == 0 and clock.getDelayedCalls() == []
    failed(attempt.result, CancelledError)


def test_leaving_while_connecting_cancels_the_connect():
    """A browser that leaves while the VM is being connected cancels the attempt."""
    w = world()
    attempt = w.request()
    w.gate.ready()
    attempt.leave()
    assert w.connect.cancelled == 1
    failed(attempt.result, CancelledError)
    assert w.counts == NOTHING


def test_leaving_while_a_token_is_spent():
    """Leaving while the token store answers: the result is a cancellation, nothing is
    connected afterwards."""
    auth = AuthSettings(mode="column", token_column="token_sha256", one_time=True)
    w = World(tokens=HeldTokens(), auth=auth)
    attempt = w.request(query="token=once")
    w.gate.ready(Target(SID, "10.0.0.5", 5900, token_digest=token_digest("once")))
    attempt.leave()
    failed(attempt.result, CancelledError)
    assert w.connect.calls == [] and w.counts == NOTHING


PATHS = {
    "connected": lambda w, a: (w.gate.ready(), w.connect.attempts[0].callback(FakeUpstream())),
    "refused at admission": None,
    "refused while waiting": lambda w, a: w.gate.refuse(SID, Refusal.ENDED),
    "refused after ready": lambda w, a: w.gate.ready(Target(SID, "127.0.0.1", 5900)),
    "connect failed": lambda w, a: (
        w.gate.ready(), w.connect.attempts[0].errback(Refused(Refusal.VM_UNREACHABLE))
    ),
    "left while waiting": lambda w, a: a.leave(),
    "left while connecting": lambda w, a: (w.gate.ready(), a.leave()),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_counts_are_given_back_on_every_path(path):
    """Whatever happens to a request, once its connection leaves (twice, even) nothing stays
    counted against its address or its session."""
    w = world()
    attempt = w.request("/bad" if PATHS[path] is None else f"/websockify/{SID}")
    step = PATHS[path]
    if step is not None:
        step(w, attempt)
    attempt.result.addErrback(lambda f: None)
    attempt.leave()
    attempt.leave()
    assert w.counts == NOTHING
    assert w.gate.waiting == 0


def test_client_address_from_trusted_proxies():
    """Behind a trusted proxy the request is counted under the address it forwards for."""
    w = world(trusted_proxies=("192.0.2.0/24",))
    attempt = w.request(headers={"x-forwarded-for": "198.51.100.4"})
    assert attempt.client == "198.51.100.4"
    assert w.counts[0] == {"198.51.100.4": 1}


def test_fail_helper_is_the_connectors_failure():
    """A connector that fails at once (fail()) is handled like one that fails later."""
    w = world()
    w.connect = lambda *args: fail(Refused(Refusal.VM_UNREACHABLE, "x"))  # type: ignore[assignment]
    w.pipeline.connect = w.connect
    attempt = w.request()
    w.gate.ready()
    assert refusal_of(attempt) is Refusal.VM_UNREACHABLE


# -- no slot without a valid token (issue 16) -----------------------------------------------

BAD_HMAC = [
    ("missing", ""),
    ("expired", "token=" + mint_token(SECRET, SID, 999)),
    ("forged", "token=" + mint_token(b"another-secret-of-16+", SID, 5000)),
    ("other-session", "token=" + mint_token(SECRET, OTHER, 5000)),
    ("too-far-ahead", "token=" + mint_token(SECRET, SID, 1000 + 86400 + 1)),
]


@pytest.mark.parametrize("query", [c[1] for c in BAD_HMAC], ids=[c[0] for c in BAD_HMAC])
def test_a_bad_hmac_token_never_counts_under_the_session_or_as_waiting(query):
    """mode = hmac: a refused token takes no per-session and no waiting count, even while its
    connection lingers (leave not called); only its address is counted, until it leaves."""
    w = world(AuthSettings(mode="hmac", secret_file="x"), max_per_session=1)
    attempt = w.request(query=query)
    refusal_of(attempt)
    assert w.counts == ({"192.0.2.7": 1}, {}, {}) and w.gate.waiting == 0
    attempt.leave()
    assert w.counts == NOTHING


def test_hmac_squatters_do_not_lock_the_owner_out():
    """max_per_session = 1: any number of bad-token clients that never leave; the owner's
    valid token is still counted and waits, then a second valid one is 4429."""
    w = world(AuthSettings(mode="hmac", secret_file="x"), max_per_session=1)
    for i, (_, query) in enumerate(BAD_HMAC * 3):
        refusal_of(w.request(query=query, peer=f"198.51.100.{i}"))
    good = "token=" + mint_token(SECRET, SID, 5000)
    owner = w.request(query=good)
    no_result(owner.result)
    assert w.counts[1:] == ({SID: 1}, {"192.0.2.7": 1})
    assert refusal_of(w.request(query=good, peer="192.0.2.8")) is Refusal.TOO_MANY
    assert w.counts[1] == {SID: 1}


def test_the_token_age_limit_is_the_configured_one():
    """[auth] max_token_age: a token expiring further ahead than now + max_token_age is 4403;
    one within it waits."""
    w = world(AuthSettings(mode="hmac", secret_file="x", max_token_age=60))
    assert refusal_of(w.request(query="token=" + mint_token(SECRET, SID, 1061))) is (
        Refusal.FORBIDDEN
    )
    no_result(w.request(query="token=" + mint_token(SECRET, SID, 1060)).result)


def test_spellings_of_one_uuid_count_as_one_session():
    """max_per_session counts the canonical id: upper case, braces and no dashes are the
    session the lower-case id names."""
    w = world(max_per_session=2)
    w.request(f"/websockify/{SID.upper()}")
    w.request(f"/websockify/{SID.replace('-', '')}", peer="192.0.2.8")
    assert w.counts[1] == {SID: 2}
    over = w.request(f"/websockify/{SID.upper().replace('-', '')}", peer="192.0.2.9")
    assert refusal_of(over) is Refusal.TOO_MANY
    assert w.counts[1] == {SID: 2}


def test_the_hmac_is_over_the_id_as_spelled_but_counted_canonically():
    """A token minted over the upper-case spelling opens that spelling (and is counted under
    the canonical id); the same token for the lower-case spelling is forged."""
    w = world(AuthSettings(mode="hmac", secret_file="x"))
    token = "token=" + mint_token(SECRET, SID.upper(), 5000)
    no_result(w.request(f"/websockify/{SID.upper()}", token).result)
    assert w.counts[1] == {SID: 1}
    assert refusal_of(w.request(query=token)) is Refusal.FORBIDDEN
    assert w.counts[1] == {SID: 1}


def column_world(one_time: bool = False, **novnc: Any) -> tuple[World, MemorySessionSource]:
    """A pipeline in column mode over the real gate and in-memory rows of a uuid column."""
    clock = Clock()
    source = MemorySessionSource(id_type="uuid")
    gate = ReadinessGate(source, clock, 30, frozenset({"ended"}), 5900)
    auth = AuthSettings(mode="column", token_column="token_sha256", one_time=one_time)
    w = World(clock=clock, gate=gate, tokens=source, auth=auth,
              settings=NovncSettings(readiness_timeout=30, **novnc))
    return w, source


def test_column_token_is_checked_when_the_row_exists_before_it_is_ready():
    """mode = column: the row exists without vm_ip: a wrong token is 4403 at the first read,
    having never counted under the session; the right one is counted and waits, and connects
    once vm_ip is committed."""
    w, source = column_world(max_per_session=1)
    source.rows[SID] = SessionRow(SID, None, token_digest=token_digest("right"))
    wrong = w.request(query="token=wrong", peer="198.51.100.1")
    assert w.counts[1:] == ({}, {"198.51.100.1": 1})
    w.clock.advance(0)
    assert refusal_of(wrong) is Refusal.FORBIDDEN
    assert w.counts == ({"198.51.100.1": 1}, {}, {})
    owner = w.request(query="token=right")
    w.clock.advance(0)
    assert w.counts[1:] == ({SID: 1}, {"192.0.2.7": 1})
    source.rows[SID] = SessionRow(SID, "10.0.0.5", 5900, token_digest=token_digest("right"))
    w.gate.notified(SID)
    w.clock.advance(0)
    w.connect.attempts[0].callback(FakeUpstream())
    assert succeeded(owner.result).target.host == "10.0.0.5"
    assert w.counts[1] == {SID: 1}


def test_column_waiters_before_the_row_exists_are_not_counted_under_the_session():
    """While the row is absent nobody's token can be judged: every client waits, counted only
    as waiting; when the row appears the wrong tokens are 4403 and the owner is counted."""
    w, source = column_world(max_per_session=1, max_waiting_per_ip=10)
    squatters = [w.request(query=f"token=guess{i}", peer="198.51.100.1") for i in range(5)]
    owner = w.request(query="token=right")
    w.clock.advance(0)
    assert w.counts[1:] == ({}, {"198.51.100.1": 5, "192.0.2.7": 1})
    source.rows[SID] = SessionRow(SID, None, token_digest=token_digest("right"))
    w.gate.notified(SID)
    w.clock.advance(0)
    assert all(refusal_of(a) is Refusal.FORBIDDEN for a in squatters)
    assert w.counts == ({"198.51.100.1": 5, "192.0.2.7": 1}, {SID: 1}, {"192.0.2.7": 1})
    no_result(owner.result)
    for a in squatters:
        a.leave()
    assert w.counts[0] == {"192.0.2.7": 1}


def test_column_row_without_a_digest_yet_keeps_waiting():
    """A row that exists but has no digest yet cannot judge the token: the client keeps waiting
    uncounted under the session; the digest, once written, judges it."""
    w, source = column_world()
    source.rows[SID] = SessionRow(SID, None)
    attempt = w.request(query="token=right")
    w.clock.advance(0)
    no_result(attempt.result)
    assert w.counts[1] == {}
    source.rows[SID] = SessionRow(SID, None, token_digest=token_digest("right"))
    w.gate.notified(SID)
    w.clock.advance(0)
    assert w.counts[1] == {SID: 1}


def test_column_one_time_replay_is_still_4403_after_the_early_check():
    """one_time = on with the early check: the owner's token is spent by the UPDATE at
    readiness; a replay waiting on the same row gets 4403 token already used."""
    w, source = column_world(one_time=True)
    digest = token_digest("once")
    source.rows[SID] = SessionRow(SID, None, token_digest=digest)
    first, replay = w.request(query="token=once"), w.request(query="token=once")
    w.clock.advance(0)
    assert w.counts[1] == {SID: 2}
    source.rows[SID] = SessionRow(SID, "10.0.0.5", 5900, token_digest=digest)
    w.gate.notified(SID)
    w.clock.advance(0)
    assert len(w.connect.calls) == 1 and source.rows[SID].token_digest is None
    assert refusal_of(replay) is Refusal.TOKEN_USED
    assert w.counts[1] == {SID: 1}
    no_result(first.result)
    later = w.request(query="token=once")
    w.clock.advance(0)
    assert refusal_of(later) is Refusal.TOKEN_USED


def test_column_session_limit_is_decided_by_the_verified():
    """max_per_session in column mode counts only clients whose token matched: a second
    matching client is 4429 when the row is read."""
    w, source = column_world(max_per_session=1)
    source.rows[SID] = SessionRow(SID, None, token_digest=token_digest("right"))
    w.request(query="token=right")
    second = w.request(query="token=right", peer="192.0.2.8")
    w.clock.advance(0)
    assert refusal_of(second) is Refusal.TOO_MANY
    assert w.counts[1] == {SID: 1} and w.counts[2] == {"192.0.2.7": 1}
