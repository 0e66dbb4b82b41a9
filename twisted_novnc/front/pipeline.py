"""The request path, from a browser's upgrade request to a connected upstream.

In order, for each request (an :class:`Attempt`):

1. **match** the path against ``[novnc] path``: which session, and what follows it;
2. **admit**: the subprotocol, the Origin, ``max_per_ip``, then the token (an HMAC token is
   checked in full here, a column token must at least be there), and only then the waiting
   limits and ``max_per_session`` — all before any waiting;
3. **wait** for the session's readiness (the gate's ``when_ready``); in ``column`` mode the
   token is checked against the row's digest as soon as the row exists, ready or not, and only
   a matching token is counted under ``max_per_session``;
4. **authorize**: the target against ``[upstream] allowed_networks/ports/allow_self``, a
   column token against the ready row's digest (a one-time token is spent);
5. **connect** the upstream, within what is left of the readiness deadline.

A client that is refused gives back its session and waiting counts at once, whatever its
connection does next; its address count lasts as long as its socket (the protocol cuts a
refused socket off after a short close timeout).  Sessions are counted under their canonical
id (the gate's ``session_key``: every spelling of one UUID is one session); the HMAC is
checked over the id as the request spelled it, which is the id the token was minted for.

The :class:`Pipeline` holds what every request shares: the settings, the readiness gate, the
token store, the target policy, the connector, the clock, the metrics and the :class:`Limits`.
It knows no sockets and no WebSocket: the protocol hands it a :class:`BrowserRequest` and gets
back a Deferred of :class:`Connected`, or a failure with :class:`Refused` for the close code.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_novnc.config import AuthSettings, NovncSettings
from twisted_novnc.database.interfaces import ITokenStore
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.front.auth import (
    TokenRequired,
    extract_token,
    strip_token,
    token_digest,
    verify_digest,
    verify_token,
)
from twisted_novnc.front.forwarded import Network, client_address, parse_networks
from twisted_novnc.front.paths import PathTemplate
from twisted_novnc.operations.metrics import Metrics
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.session import SessionRow, Target

#: The one WebSocket subprotocol spoken (noVNC offers it).
SUBPROTOCOL = "binary"

_log = Logger()

#: (target, seconds left, path suffix, query without token) -> the connected upstream peer.
Connector = Callable[[Target, float, str, str], Deferred[Any]]


class Readiness(Protocol):
    """What the pipeline needs of the readiness gate (database.readiness.ReadinessGate)."""

    @property
    def waiting(self) -> int:
        """How many browsers are held waiting right now."""

    def session_key(self, session_id: str) -> str | None:
        """The canonical id of a raw one, or None when no row can have it."""

    def when_ready(
        self, session_id: str, on_row: Callable[[SessionRow], None] | None = None
    ) -> Deferred[Target]:
        """Fire with the session's target once it is ready; fail with Refused; cancellable.
        ``on_row`` sees each row read before then; raising fails this wait alone."""


@attrs.frozen
class BrowserRequest:
    """What the pipeline reads of a browser's upgrade request."""

    #: The raw (percent-encoded) path, without the query.
    path: str
    #: The raw query string.
    query: str = ""
    #: The query, parsed (``parse_qs``).
    params: Mapping[str, Sequence[str]] = attrs.field(factory=dict)
    #: Header names in lower case.
    headers: Mapping[str, str] = attrs.field(factory=dict)
    origin: str = ""
    #: The subprotocols the browser offered.
    protocols: Sequence[str] = ()
    #: The socket's peer address (``unix`` for a unix socket).
    peer: str = "-"


#: What an open relay's attempt keeps of its request: nothing (see :meth:`Attempt.opened`).
_FORGOTTEN = BrowserRequest(path="")


@attrs.frozen
class Connected:
    """The end of a request's path: what the protocol opens the relay with."""

    target: Target
    #: The connected upstream peer (``attach(relay)`` starts its bytes flowing).
    upstream: Any
    #: The subprotocol to accept the handshake with.
    subprotocol: str | None


@attrs.define(eq=False)
class Limits:
    """Connections counted by client address and by session, and waiting ones by address.

    ``per_session`` is keyed by canonical id and counts only clients whose token was accepted
    (all of them in ``[auth] mode = none``).
    """

    per_ip: collections.Counter[str] = attrs.field(factory=collections.Counter)
    per_session: collections.Counter[str] = attrs.field(factory=collections.Counter)
    waiting_per_ip: collections.Counter[str] = attrs.field(factory=collections.Counter)

    @staticmethod
    def add(counter: collections.Counter[str], key: str, delta: int) -> None:
        """Count ``key`` up or down; a key counted down to nothing is forgotten."""
        counter[key] += delta
        if counter[key] <= 0:
            del counter[key]


def log_refusal(event: str, refused: Refused, session_id: str | None, client: str) -> None:
    """One line for a refused request or a revoked relay: its code, reason and detail."""
    _log.info(
        "{event} {session_id} from {client}: {code} {reason} ({detail})",
        event=event,
        session_id=session_id,
        client=client,
        code=refused.refusal.close_code,
        reason=refused.refusal.reason,
        detail=refused.detail,
    )


@attrs.define(eq=False)
class Pipeline:
    """The request path's collaborators and limits, shared by every request."""

    settings: NovncSettings
    gate: Readiness
    tokens: ITokenStore
    targets: TargetPolicy
    connect: Connector
    clock: IReactorTime
    metrics: Metrics = attrs.field(factory=Metrics)
    auth: AuthSettings = attrs.field(factory=AuthSettings)
    secret: bytes = b""
    limits: Limits = attrs.field(factory=Limits)
    paths: PathTemplate = attrs.field(init=False)
    trusted_proxies: tuple[Network, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.paths = PathTemplate(self.settings.path)
        self.trusted_proxies = parse_networks(self.settings.trusted_proxies)

    def start(self, request: BrowserRequest) -> Attempt:
        """Take one request down the path; its ``result`` says how it ended."""
        return Attempt(self, request).start()

    def adopted(
        self, session_key: str, client: str, started: float, ready_at: float,
        session_counted: bool,
    ) -> Attempt:
        """The way of a relay that another process opened and handed here: counted under its
        address and session as it was there, already at its end."""
        attempt = Attempt(self, _FORGOTTEN, client=client, session_id=session_key,
                          started=started, ready_at=ready_at, session_key=session_key)
        attempt.result = Deferred()
        attempt._count(+1)
        if session_counted:
            attempt.session_counted = True
            self.limits.add(self.limits.per_session, session_key, +1)
        return attempt


@attrs.define(eq=False)
class Attempt:
    """One request on its way: the steps in order, and what it holds while it goes.

    ``result`` fires with :class:`Connected`, or fails with :class:`Refused` (already logged),
    or with ``CancelledError`` once the browser has left.  A refusal gives back the session
    and waiting counts at once; the address count is given back by :meth:`leave`, which the
    protocol calls once, when the browser's connection is gone.
    """

    pipeline: Pipeline
    request: BrowserRequest
    result: Deferred[Connected] = attrs.field(init=False)
    client: str = "-"
    session_id: str | None = None
    started: float = 0.0
    ready_at: float | None = None
    #: The session's upstream, once it is ready and allowed.
    target: Target | None = None
    #: The canonical id it is counted under in ``per_session`` (the gate's key).
    session_key: str | None = None
    #: When the connection is counted under its address (from admission until it leaves).
    counted: bool = False
    #: When it is counted under its session (its token accepted, until refused or gone).
    session_counted: bool = False
    waiting: bool = False
    gone: bool = False
    _token: str | None = None
    _suffix: str = ""
    _query: str = ""
    _deadline: float = 0.0
    _pending: Deferred[Any] | None = None

    def start(self) -> Attempt:
        pipeline = self.pipeline
        self.started = pipeline.clock.seconds()
        self.client = client_address(
            self.request.peer, self.request.headers, pipeline.trusted_proxies,
            pipeline.settings.forwarded_header,
        )
        try:
            self._admit()
        except Refused as refused:
            refusal: Deferred[Connected] = Deferred()
            refusal.addErrback(self._refused)
            refusal.errback(refused)
            self.result = refusal
            return self
        self._deadline = self.started + pipeline.settings.readiness_timeout
        _log.info(
            "request {session_id} from {client}: waiting for readiness", event="request_waiting",
            session_id=self.session_id,
            client=self.client,
        )
        assert self.session_id is not None
        self._count_waiting(+1)
        column = pipeline.auth.mode == "column"
        d: Deferred[Any] = pipeline.gate.when_ready(
            self.session_id, self._row_seen if column else None
        )
        d.addBoth(self._done_waiting)
        d.addCallback(self._authorize)
        d.addCallback(self._connected)
        d.addErrback(self._refused)
        self.result = self._pending = d
        return self

    # -- 1 and 2: match and admit, before any waiting ---------------------------------------

    def _admit(self) -> None:
        pipeline, request = self.pipeline, self.request
        settings, limits = pipeline.settings, pipeline.limits
        match = pipeline.paths.match(request.path)
        if match is None:
            raise Refused(Refusal.BAD_PATH, request.path[:200])
        self.session_id = match.session_id
        # What a websocket upstream is asked for: the path after the session, the query
        # without the token (which is for this proxy alone).
        self._suffix = match.suffix
        self._query = strip_token(request.query)
        if request.protocols and SUBPROTOCOL not in request.protocols:
            raise Refused(Refusal.BAD_SUBPROTOCOL, f"offered {list(request.protocols)!r}")
        if not settings.allowed_origins.allows(request.origin or None):
            raise Refused(Refusal.ORIGIN_FORBIDDEN, f"origin {request.origin[:200]!r}")
        # Per address from here on, whatever the token: it bounds the sockets an address
        # holds, and a refused client's socket is cut off after a short close timeout.
        self._count(+1)
        if limits.per_ip[self.client] > settings.max_per_ip:
            raise Refused(Refusal.TOO_MANY, f"{self.client} has {settings.max_per_ip} open")
        self.session_key = pipeline.gate.session_key(self.session_id)
        if self.session_key is None:
            raise Refused(Refusal.BAD_PATH, "not a valid session id")
        # The token before anything a client without one could take from the session's owner.
        auth = pipeline.auth
        if auth.mode != "none":
            self._token = extract_token(request.params, request.headers, auth.cookie or None)
            if auth.mode == "hmac":
                # Over the id as spelled in the request: the one the token was minted for.
                verify_token(
                    pipeline.secret, self.session_id, self._token, pipeline.clock.seconds(),
                    auth.max_token_age,
                )
            elif self._token is None:
                raise TokenRequired()
        if pipeline.gate.waiting >= settings.max_waiting:
            raise Refused(Refusal.TOO_MANY, f"{settings.max_waiting} browsers waiting")
        if limits.waiting_per_ip[self.client] >= settings.max_waiting_per_ip:
            raise Refused(Refusal.TOO_MANY, f"{self.client} has browsers waiting")
        if auth.mode != "column":
            self._count_session()
        # (column: counted once the row's digest has accepted the token, in _row_seen.)

    # -- 3: the wait (the gate's), then 4: authorize ------------------------------------------

    def _done_waiting(self, result: Any) -> Any:
        if self.waiting:
            self._count_waiting(-1)
        return result

    def _authorize(self, target: Target) -> Deferred[Any]:
        pipeline = self.pipeline
        self.ready_at = pipeline.clock.seconds()
        if not pipeline.targets.allows(target.host, target.port):
            raise Refused(
                Refusal.TARGET_FORBIDDEN,
                f"{target.host}:{target.port} is outside [upstream] allowed_networks/ports"
                " or is this host's own address (allow_self = off)",
            )
        auth = pipeline.auth
        if auth.mode == "column" and auth.one_time:
            if target.token_digest is None:
                raise Refused(Refusal.TOKEN_USED, "the session has no unused token")
            verify_digest(target.token_digest, self._token)  # a wrong token: 4403 forbidden
            self._count_session()
            digest = token_digest(self._token or "")
            spent = pipeline.tokens.consume_token(target.session_id, digest)
            return spent.addCallback(self._token_spent, target)
        if auth.mode == "column":
            verify_digest(target.token_digest, self._token)
            self._count_session()
        return self._connect(target)

    def _row_seen(self, row: SessionRow) -> None:
        """column: the row exists (ready or not), so the token can be judged now rather than
        at readiness; only then is the client counted under its session.  A row without a
        digest (not written yet, or a one-time token already spent) cannot judge it: the
        client keeps waiting, counted only as waiting, and the ready row decides."""
        if row.token_digest is None:
            return
        verify_digest(row.token_digest, self._token)
        self._count_session()

    def _token_spent(self, row: SessionRow | None, target: Target) -> Deferred[Any]:
        if row is None:
            raise Refused(Refusal.TOKEN_USED, "no unused token matched")
        return self._connect(target)

    # -- 5: connect ----------------------------------------------------------------------------

    def _connect(self, target: Target) -> Deferred[Any]:
        pipeline = self.pipeline
        now = pipeline.clock.seconds()
        pipeline.metrics.readiness_wait.observe(now - self.started)
        _log.info(
            "session {session_id} ready after {wait_seconds:.3f}s: connecting to {host}:{port}",
            event="session_ready",
            session_id=target.session_id,
            client=self.client,
            wait_seconds=now - self.started,
            host=target.host,
            port=target.port,
        )
        self.target = target
        return pipeline.connect(target, self._deadline - now, self._suffix, self._query)

    def _connected(self, upstream: Any) -> Connected:
        # (A browser that left cancelled the connect: the connector closes what it opened.)
        self._pending = None
        assert self.ready_at is not None
        pipeline = self.pipeline
        pipeline.metrics.upstream_connect.observe(pipeline.clock.seconds() - self.ready_at)
        assert self.target is not None
        protocols = self.request.protocols
        return Connected(self.target, upstream, SUBPROTOCOL if SUBPROTOCOL in protocols else None)

    # -- every other end -----------------------------------------------------------------------

    def _refused(self, failure: Failure) -> Failure:
        self._pending = None
        # The session's slot is given back now, not when the refused socket closes.
        self._uncount_session()
        if failure.check(CancelledError) or self.gone:
            return Failure(CancelledError())
        if isinstance(failure.value, Refused):
            log_refusal("refused", failure.value, self.session_id, self.client)
            return failure
        _log.failure("unexpected error serving {path}", failure,
                     event="request_error", path=self.request.path)
        refused = Refused(Refusal.VM_UNREACHABLE, failure.getErrorMessage())
        log_refusal("refused", refused, self.session_id, self.client)
        return Failure(refused)

    def opened(self) -> None:
        """The relay is open: let go of what only the path to it needed.  The request's headers
        and query (with Autobahn's own copies, which the fast path drops) are about 1.5 KB of
        every relay's memory (bench/README.md, "Memory per idle connection")."""
        self.request = _FORGOTTEN
        self.target = None
        self._token = None
        self._suffix = self._query = ""

    def leave(self) -> None:
        """The browser's connection is gone: stop whatever is under way, give back the counts."""
        if self.gone:
            return
        self.gone = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self.waiting:
            self._count_waiting(-1)
        self._uncount_session()
        self._count(-1)

    def _count(self, delta: int) -> None:
        """Count the connection under its address: once in, once out."""
        if (delta > 0) == self.counted:
            return
        self.counted = delta > 0
        limits = self.pipeline.limits
        limits.add(limits.per_ip, self.client, delta)

    def _count_session(self) -> None:
        """Count the connection under its session (once), refused if that is one too many."""
        if self.session_counted:
            return
        assert self.session_key is not None
        self.session_counted = True
        limits, most = self.pipeline.limits, self.pipeline.settings.max_per_session
        limits.add(limits.per_session, self.session_key, +1)
        if limits.per_session[self.session_key] > most:
            raise Refused(Refusal.TOO_MANY, f"session has {most} open")

    def _uncount_session(self) -> None:
        if self.session_counted:
            self.session_counted = False
            limits = self.pipeline.limits
            assert self.session_key is not None
            limits.add(limits.per_session, self.session_key, -1)

    def _count_waiting(self, delta: int) -> None:
        self.waiting = delta > 0
        limits = self.pipeline.limits
        limits.add(limits.waiting_per_ip, self.client, delta)
