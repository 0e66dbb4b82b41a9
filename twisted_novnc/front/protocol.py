"""The browser side: Autobahn's server protocol running the request pipeline.

match the path -> wait for readiness -> connect upstream -> accept the handshake -> relay.
``onConnect`` returns a Deferred for that whole pipeline, so the HTTP 101 is sent only once the
VM is connected.  A refusal is turned into a close code after a completed handshake (browsers
cannot read an HTTP status) or, with ``reject = http``, into the HTTP status itself.

Each connection logs one event per step of its life (request and waiting, ready, upstream
connected and relay open, closed) with the same keys: ``session_id``, ``client``, and at the
end ``outcome``, ``wait_seconds``, ``relay_seconds``, ``up_bytes``, ``down_bytes``.
"""

from __future__ import annotations

import collections
import gc
import types
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_novnc._compat.lazydebug import lazy_pformat
from twisted_novnc.config import AuthSettings, NovncSettings
from twisted_novnc.database.interfaces import ITokenStore
from twisted_novnc.database.readiness import ReadinessGate, Watch
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.front import web
from twisted_novnc.front.auth import (
    TokenRequired,
    extract_token,
    strip_token,
    token_digest,
    verify_digest,
    verify_token,
)
from twisted_novnc.front.forwarded import client_address, parse_networks
from twisted_novnc.front.frames import (
    OPCODE_BINARY,
    OPCODE_CONTINUATION,
    ClientFrameHeader,
    Unmasker,
    minimal_length,
    parse_client_header,
    server_frame_header,
)
from twisted_novnc.front.paths import PathTemplate
from twisted_novnc.front.requesthead import MAX_HEAD, BadHead, check_head, head_end
from twisted_novnc.operations.metrics import Metrics
from twisted_novnc.relay.relay import Relay, TransportPeer
from twisted_novnc.relay.sending import close_now, send_now, tune_relay_transport
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.relay.upstream import TCPUpstream
from twisted_novnc.session import Target

SUBPROTOCOL = "binary"

#: Seconds a peer has to take our last bytes (a close frame) before its socket is aborted.
ABORT_GRACE = 2.0

_log = Logger()

#: (target, seconds left, path suffix, query without token) -> the connected upstream peer.
Connector = Callable[[Target, float, str, str], Deferred[Any]]


def close_frame(protocol: WebSocketServerProtocol, code: int, reason: str) -> None:
    """Send a close frame with any code (``sendClose`` refuses e.g. 1001 and 1003)."""
    if protocol.state == protocol.STATE_OPEN:
        protocol.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)


def _is_upgrade(head: bytes) -> bool:
    """Whether a (checked) request head asks for a WebSocket."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class _NoSendQueue:
    """Stands in for Autobahn's per-connection send queue (a deque), which only chopped or
    synchronous sends use; nothing here sends either way."""

    def __len__(self) -> int:
        return 0

    def append(self, item: object) -> None:
        raise RuntimeError("twisted_novnc never sends chopped or synchronous frames")


_NO_SEND_QUEUE = _NoSendQueue()


# Autobahn's own bases disagree on two attribute types; mypy compares them once a class
# has two bases.
class NoVNCServerProtocol(TransportPeer, WebSocketServerProtocol):  # type: ignore[misc]
    """One browser connection; Autobahn owns ``self.log``, so our logger is ``_log``."""

    _log = Logger()
    factory: NoVNCServerFactory
    session_id: str | None = None
    client: str = "-"
    relay: Relay | None = None
    _target: Target | None = None
    _watch: Watch | None = None
    _upstream: TCPUpstream | None = None
    _pending: Deferred[Any] | None = None
    _refused: Refused | None = None
    _http_status: int | None = None
    _gone: bool = False
    _started: float = 0.0
    _ready_at: float | None = None
    _opened_at: float | None = None
    _token: str | None = None
    _counted: bool = False
    _waiting_counted: bool = False
    _request_timer: Any = None
    _idle_timer: Any = None
    _idle_seen: int = -1
    _suffix: str = ""
    _query: str = ""
    _head: bytes | None = b""
    _head_refused: bool = False
    _early_bytes: int = 0
    _abort_timer: Any = None
    #: The browser frame being relayed on the fast path (see processData).
    _frame_left: int = 0
    _frame_fin: bool = False
    _unmasker: Unmasker | None = None
    _message_size: int = 0
    _fast_message: bool = False
    # Autobahn's, set per connection (annotated only: a class value would change its copying).
    _isMessageCompressed: bool
    maxMessagePayloadSize: int

    # -- the handshake ---------------------------------------------------------------------

    # Autobahn documents a Deferred result for onConnect; its annotation omits it.
    def onConnect(self, request: ConnectionRequest) -> Deferred[Any]:  # type: ignore[override]
        clock = self.factory.clock
        self._started = clock.seconds()
        self._cancel_request_timer()
        peer = getattr(self.transport.getPeer(), "host", "unix")  # type: ignore[union-attr]
        self.client = client_address(peer, request.headers, self.factory.trusted_proxies)
        try:
            self._admit(request)
        except Refused as refused:
            d: Deferred[Any] = Deferred()
            d.addErrback(self._refuse, request)
            d.errback(refused)
            return d
        assert self.session_id is not None
        deadline = self._started + self.factory.settings.readiness_timeout
        self._log.info(
            "request {session_id} from {client}: waiting for readiness",
            session_id=self.session_id,
            client=self.client,
        )
        self._count_waiting(+1)
        d = self.factory.gate.when_ready(self.session_id)
        d.addBoth(self._done_waiting)
        d.addCallback(self._ready, deadline)  # type: ignore[arg-type]
        d.addCallback(self._accept, request)  # type: ignore[call-overload]
        d.addErrback(self._refuse, request)
        self._pending = d
        return d

    def _admit(self, request: ConnectionRequest) -> None:
        """Everything decided before any waiting: path, origin, limits, the token's form."""
        factory, settings = self.factory, self.factory.settings
        match = factory.paths.match(request.path)
        if match is None:
            raise Refused(Refusal.BAD_PATH, request.path[:200])
        self.session_id = match.session_id
        # What a websocket upstream is asked for: the path after the session, the query
        # without the token (which is for this proxy alone).
        self._suffix = match.suffix
        self._query = strip_token(urlsplit(self.http_request_uri).query)
        if request.protocols and SUBPROTOCOL not in request.protocols:
            raise Refused(Refusal.BAD_SUBPROTOCOL, f"offered {request.protocols!r}")
        if not settings.allowed_origins.allows(request.origin or None):
            raise Refused(Refusal.ORIGIN_FORBIDDEN, f"origin {request.origin[:200]!r}")
        factory.count(self, +1)
        if factory.per_ip[self.client] > settings.max_per_ip:
            raise Refused(Refusal.TOO_MANY, f"{self.client} has {settings.max_per_ip} open")
        if factory.per_session[self.session_id] > settings.max_per_session:
            raise Refused(Refusal.TOO_MANY, f"session has {settings.max_per_session} open")
        if factory.gate.waiting >= settings.max_waiting:
            raise Refused(Refusal.TOO_MANY, f"{settings.max_waiting} browsers waiting")
        if factory.waiting_per_ip[self.client] >= settings.max_waiting_per_ip:
            raise Refused(Refusal.TOO_MANY, f"{self.client} has browsers waiting")
        auth = factory.auth
        if auth.mode == "none":
            return
        self._token = extract_token(request.params, request.headers, auth.cookie or None)
        if auth.mode == "hmac":
            verify_token(factory.secret, self.session_id, self._token, factory.clock.seconds())
        elif self._token is None:
            raise TokenRequired()

    def _count_waiting(self, delta: int) -> None:
        self._waiting_counted = delta > 0
        self.factory.waiting_per_ip[self.client] += delta
        if self.factory.waiting_per_ip[self.client] <= 0:
            del self.factory.waiting_per_ip[self.client]

    def _done_waiting(self, result: Any) -> Any:
        if self._waiting_counted:
            self._count_waiting(-1)
        return result

    def _ready(self, target: Target, deadline: float) -> Any:
        now = self.factory.clock.seconds()
        self._ready_at = now
        if not self.factory.targets.allows(target.host, target.port):
            raise Refused(
                Refusal.TARGET_FORBIDDEN,
                f"{target.host}:{target.port} is outside [upstream] allowed_networks/ports",
            )
        auth = self.factory.auth
        if auth.mode == "column" and auth.one_time:
            if target.token_digest is None:
                raise Refused(Refusal.TOKEN_USED, "the session has no unused token")
            verify_digest(target.token_digest, self._token)  # a wrong token: 4403 forbidden
            digest = token_digest(self._token or "")
            # The gate's source is also the token store (both the store and the fake are).
            d = ITokenStore(self.factory.gate.source).consume_token(target.session_id, digest)
            d.addCallback(self._token_consumed, target, deadline)
            return d
        if auth.mode == "column":
            verify_digest(target.token_digest, self._token)
        return self._connect(target, deadline)

    def _token_consumed(self, row: Any, target: Target, deadline: float) -> Any:
        if row is None:
            raise Refused(Refusal.TOKEN_USED, "no unused token matched")
        return self._connect(target, deadline)

    def _connect(self, target: Target, deadline: float) -> Deferred[TCPUpstream]:
        now = self.factory.clock.seconds()
        self._target = target
        self.factory.metrics.readiness_wait.observe(now - self._started)
        self._log.info(
            "session {session_id} ready after {wait_seconds:.3f}s: connecting to {host}:{port}",
            session_id=target.session_id,
            client=self.client,
            wait_seconds=now - self._started,
            host=target.host,
            port=target.port,
        )
        return self.factory.connect(target, deadline - now, self._suffix, self._query)

    def _accept(self, upstream: TCPUpstream, request: ConnectionRequest) -> str | None:
        self._pending = None
        self._upstream = upstream
        if self._gone:
            upstream.close(1000, "browser left")
            raise CancelledError()
        assert self._ready_at is not None and self._target is not None
        self.factory.metrics.upstream_connect.observe(self.factory.clock.seconds() - self._ready_at)
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    def _refuse(self, failure: Failure, request: ConnectionRequest) -> str | None:
        self._pending = None
        if failure.check(CancelledError) or self._gone:
            raise ConnectionDeny(499, "client closed request")
        if not failure.check(Refused):
            self._log.failure("unexpected error serving {path}", failure, path=request.path)
            refused = Refused(Refusal.VM_UNREACHABLE, failure.getErrorMessage())
        else:
            refused = failure.value
        self._log_refusal("refused", refused)
        if self.factory.settings.reject == "http" or refused.refusal is Refusal.BAD_SUBPROTOCOL:
            # A browser that offered subprotocols fails a handshake that selects none of them
            # before it can read any close code, so this one is always an HTTP refusal.
            self._http_status = refused.refusal.http_status
            raise ConnectionDeny(refused.refusal.http_status, refused.refusal.reason)
        self._refused = refused
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    # -- the open connection -------------------------------------------------------------

    def onOpen(self) -> None:
        if self._refused is not None:
            refusal = self._refused.refusal
            self.sendClose(refusal.close_code, refusal.reason)
            return
        assert self._upstream is not None and self._target is not None
        self._opened_at = self.factory.clock.seconds()
        tune_relay_transport(self.transport)
        self.relay = Relay(self._target.session_id, browser=self, vm=self._upstream)
        self.relay.start()
        self._upstream.attach(self.relay)
        self._watch = self.factory.gate.watch(self._target, self._revoked)
        self.factory.live.add(self)
        if self.factory.settings.idle_timeout:
            self._idle_timer = self.factory.clock.callLater(
                self.factory.settings.idle_timeout, self._idle_check
            )
        # The request is parsed and answered; what Autobahn kept of it is ~1.5 KB a relay.
        self.http_request_data = b""
        self.http_response_data = ""
        self.http_headers = {}
        self.http_status_line = self.http_request_uri = self.http_request_path = ""
        self.http_request_host = self._wskey = ""
        self.http_request_params = {}
        self.websocket_protocols = self.websocket_extensions = []
        # One line for two steps that are microseconds apart (the 101 is sent when the
        # upstream connects): a line costs a connection as much as its whole relay set-up.
        assert self._ready_at is not None
        self._log.info(
            "upstream connected {session_id} {host}:{port} in {connect_seconds:.3f}s:"
            " relay open from {client} after {wait_seconds:.3f}s",
            session_id=self.session_id,
            client=self.client,
            host=self._target.host,
            port=self._target.port,
            connect_seconds=self._opened_at - self._ready_at,
            wait_seconds=self._opened_at - self._started,
        )

    def _idle_check(self) -> None:
        """Close a relay that moved nothing since the last look, one idle_timeout ago."""
        self._idle_timer = None
        if self.relay is None or self.relay.ended_by is not None:
            return
        if self.relay.activity == self._idle_seen:
            self._log.info("idle {session_id} from {client}: closing",
                           session_id=self.session_id, client=self.client)
            self.end_relay(Refusal.IDLE.close_code, Refusal.IDLE.reason, "idle")
            return
        self._idle_seen = self.relay.activity
        self._idle_timer = self.factory.clock.callLater(
            self.factory.settings.idle_timeout, self._idle_check
        )

    def _request_too_slow(self) -> None:
        self._request_timer = None
        self._log.info("dropping {peer}: no complete request in {timeout:g}s",
                       peer=self.peer, timeout=self.factory.settings.request_timeout)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None and self._request_timer.active():
            self._request_timer.cancel()
        self._request_timer = None

    def _revoked(self, refused: Refused) -> None:
        """The session ended, expired or moved while relayed."""
        self._watch = None
        self._log_refusal("revoked", refused)
        self.end_relay(refused.refusal.close_code, refused.refusal.reason, "revoked")

    def _log_refusal(self, event: str, refused: Refused) -> None:
        """One line for a refused request or a revoked relay: its code, reason and detail."""
        self._log.info(
            "{event} {session_id} from {client}: {code} {reason} ({detail})",
            event=event,
            session_id=self.session_id,
            client=self.client,
            code=refused.refusal.close_code,
            reason=refused.refusal.reason,
            detail=refused.detail,
        )

    def end_relay(self, code: int, reason: str, by: str) -> None:
        """Close both sides of a live relay with this code (revocation, shutdown)."""
        if self.relay is not None:
            self.relay.end(by, code, reason)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay is None:
            return
        if not isBinary:
            self.relay.browser_gone()
            close_frame(self, 1003, "binary messages only")
            return
        self.relay.from_browser(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._browser_left()

    # -- browser frames, relayed as they arrive ------------------------------------------

    def processData(self) -> bool:
        """Relay binary frames chunk by chunk; Autobahn takes every other frame.

        Autobahn would buffer each message whole and copy it several times before
        ``onMessage``; noVNC's messages are a byte stream to the VM, so each part of a binary
        frame is unmasked (one copy) and written to the VM as soon as it is read.  Control
        frames, text, and anything Autobahn must refuse go to Autobahn's own parser, which
        holds the same state (``inside_message``, size limits, ping timeouts) as before.
        """
        if self.current_frame is not None or not (
            self._frame_left or (self.relay is not None and self.state == self.STATE_OPEN)
        ):
            return bool(super().processData())
        data = self.data
        pos, end = 0, len(data)
        view = memoryview(data)
        try:
            while True:
                if self._frame_left:
                    n = min(self._frame_left, end - pos)
                    if n == 0:
                        break
                    assert self._unmasker is not None
                    chunk = self._unmasker.unmask(view[pos : pos + n])
                    pos += n
                    self._frame_left -= n
                    if not self._frame_left:
                        self._frame_end()
                    if self.relay is not None:
                        self.relay.from_browser(chunk)  # type: ignore[arg-type]
                    continue
                if pos == end:
                    break
                if self.relay is None or self.state != self.STATE_OPEN:
                    self.data = data[pos:]
                    return bool(super().processData())
                header = parse_client_header(data, pos)
                if header is None:
                    break
                if not self._relayable(header):
                    self.data = data[pos:]
                    return bool(super().processData())
                pos += header.size
                if not self._frame_begin(header):
                    self.data = b""
                    return False
        finally:
            view.release()
        self.data = data[pos:] if pos else data
        return False

    def _relayable(self, header: ClientFrameHeader) -> bool:
        """A masked binary frame, or the continuation of one, that RFC 6455 allows."""
        if header.rsv or not header.masked or not minimal_length(header):
            return False
        if header.opcode == OPCODE_BINARY:
            return not self.inside_message
        return header.opcode == OPCODE_CONTINUATION and self.inside_message and self._fast_message

    def _frame_begin(self, header: ClientFrameHeader) -> bool:
        """Start relaying a frame's payload; False when it breaks a size limit (closed 1009)."""
        if header.opcode == OPCODE_BINARY:
            # What Autobahn's own frame handling expects once a message has begun.
            self.inside_message = True
            self._fast_message = True
            self._isMessageCompressed = False
            self.utf8validateIncomingCurrentMessage = False
            self.message_is_binary = True
            self.message_data = []
            self.message_data_total_length = 0
            self._message_size = 0
        self._message_size += header.length
        self.message_data_total_length = self._message_size
        limit = self.maxMessagePayloadSize
        if 0 < limit < self._message_size:
            self.wasMaxMessagePayloadSizeExceeded = True
            self._max_message_size_exceeded(
                self._message_size, limit,
                f"received WebSocket message size {self._message_size} exceeds payload limit"
                f" of {limit} octets",
            )
            return False
        self._frame_fin = header.fin
        self._frame_left = header.length
        self._unmasker = Unmasker(header.mask)
        if not header.length:
            self._frame_end()
        return True

    def _frame_end(self) -> None:
        self._unmasker = None
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            # Data from the browser answers for it as a pong would (as Autobahn does).
            self._cancelAutoPingTimeoutCall()
        if self._frame_fin:
            self.inside_message = False
            self._fast_message = False

    def _closeConnection(self, abort: bool = False) -> None:
        """Autobahn aborts the socket after a protocol error, which throws away what is still
        in the write buffer: the 101 and the close frame that says why.  Flush first; abort
        only a peer that will not take them."""
        close_now(self.transport)
        if abort and self._abort_timer is None:
            self._abort_timer = self.factory.clock.callLater(ABORT_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """Check the request head strictly before Autobahn sees it; bound what is buffered."""
        if self._head_refused:
            return  # answered and closing: whatever else arrives is not read
        if self._head is None:
            if self.state == self.STATE_CONNECTING:
                # Nothing may come between the request and our 101 but a little pipelining.
                self._early_bytes += len(data)
                if self._early_bytes > MAX_HEAD:
                    self.transport.abortConnection()  # type: ignore[union-attr]
                    return
            # Autobahn's own entry point: its Twisted dataReceived only adds a debug line
            # whose arguments it builds on every read.
            self._dataReceived(data)
            return
        self._head += data
        try:
            end = head_end(self._head)
            if end is None:
                return
            check_head(self._head[:end])
        except BadHead as bad:
            self._head = None
            self._head_refused = True
            self._http_status = bad.status
            self._cancel_request_timer()
            self.transport.write(  # type: ignore[union-attr]
                f"HTTP/1.1 {bad.status} {bad.reason}\r\nConnection: close\r\n\r\n".encode()
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        buffered, self._head = self._head, None
        self._early_bytes = len(buffered) - end
        if self.factory.web_root and not _is_upgrade(buffered[:end]):
            self._serve_file(buffered[:end])
            return
        super().dataReceived(buffered)

    def _serve_file(self, head: bytes) -> None:
        """A plain GET on the WebSocket listener: a file of ``[web] root`` (the noVNC client)."""
        self._head_refused = True  # nothing after this request is read
        self._cancel_request_timer()
        method, target = head.split(b" ", 2)[:2]
        answer = web.response(self.factory.web_root, target.decode("ascii"), method.decode())
        self._http_status = int(answer[9:12])
        self.transport.write(answer)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _connectionMade(self) -> None:
        with lazy_pformat():
            super()._connectionMade()
        # Neither is ever used here (no text is accepted, nothing is sent chopped or synced);
        # together they are about 1 KB a connection.
        self.send_queue = _NO_SEND_QUEUE  # type: ignore[assignment]
        self.utf8validator = None  # type: ignore[assignment]

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.add(self)
        self._request_timer = self.factory.clock.callLater(
            self.factory.settings.request_timeout, self._request_too_slow
        )

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_request_timer()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self._browser_left()
        super().connectionLost(reason)
        self.factory.count(self, -1)
        self._closed()
        self.factory.connections.discard(self)
        if not self.factory.connections and self.factory.drained is not None:
            drained, self.factory.drained = self.factory.drained, None
            drained.callback(None)

    def _browser_left(self) -> None:
        if self._gone:
            return
        self._gone = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._watch is not None:
            self.factory.gate.unwatch(self._watch)
            self._watch = None
        self.factory.live.discard(self)
        if self.relay is not None:
            self.relay.browser_gone()
        elif self._upstream is not None:
            self._upstream.close(1000, "browser left")

    def outcome(self) -> str:
        """How the connection ended, as a close code (1006: no close frame at all)."""
        if self._http_status is not None:
            return f"http_{self._http_status}"
        if self.closedByMe and self.localCloseCode is not None:
            return str(self.localCloseCode)
        if self.remoteCloseCode is not None:
            return str(self.remoteCloseCode)
        if self.localCloseCode is not None:
            return str(self.localCloseCode)
        return "1006"

    def _closed(self) -> None:
        """The last lifecycle event, and the metrics of the whole connection."""
        end = self.factory.clock.seconds()
        outcome = self.outcome()
        up = self.relay.up_bytes if self.relay is not None else 0
        down = self.relay.down_bytes if self.relay is not None else 0
        wait = (self._ready_at or self._opened_at or end) - self._started
        relayed = end - self._opened_at if self._opened_at is not None else 0.0
        self.factory.metrics.connections.labels(outcome).inc()
        if self.relay is not None:
            self.factory.metrics.relay_closed(up, down)
        self._log.info(
            "closed {session_id} from {client}: {outcome} waited={wait_seconds:.3f}s"
            " relayed={relay_seconds:.3f}s up={up_bytes} down={down_bytes}",
            session_id=self.session_id,
            client=self.client,
            outcome=outcome,
            wait_seconds=wait,
            relay_seconds=relayed,
            up_bytes=up,
            down_bytes=down,
        )
        # The connection's objects point back at this protocol: the relay (through its
        # browser side), the upstream (through the relay), and Autobahn's is_closed future
        # (fired with this protocol).  Let go of them, so that reference counting frees the
        # whole connection now rather than the garbage collector later.
        self.relay = None
        self._upstream = None
        self.is_closed = None  # type: ignore[assignment]

    # -- Peer, for the relay (producer and consumer: TransportPeer) -------------------------

    def send(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            # One binary frame per chunk from the VM: a header in front, the bytes not copied.
            send_now(self.transport, server_frame_header(len(data)), data)
        elif self.relay is not None:
            # A close handshake has begun (ours, the browser's, or a ping timeout): the VM's
            # bytes have nowhere to go, so let the VM go too.
            self.relay.browser_gone()

    def close(self, code: int, reason: str) -> None:
        close_frame(self, code, reason)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's own writes (the 101, close frames, pings) go out at once too, not a
        reactor turn later: the 101 is on the path every new connection waits for."""
        if sync or chopsize:
            super().sendData(data, sync, chopsize)  # never used here: fails loudly
            return
        send_now(self.transport, b"", data)


class NoVNCServerFactory(WebSocketServerFactory):
    """Accepts noVNC clients on every listener and hands them the shared gate and connector."""

    protocol = NoVNCServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        settings: NovncSettings,
        gate: ReadinessGate,
        connect: Connector,
        clock: Any,
        metrics: Metrics | None = None,
        auth: AuthSettings | None = None,
        secret: bytes = b"",
        targets: TargetPolicy | None = None,
        web_root: str = "",
    ) -> None:
        # Autobahn's own Server header would name its version to every scanner.
        super().__init__(server="twisted_novnc", reactor=clock)
        self.settings = settings
        self.auth = auth if auth is not None else AuthSettings()
        self.secret = secret
        self.targets = targets if targets is not None else TargetPolicy()
        self.web_root = web_root
        #: Open connections by client address and by session, waiting ones by address.
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.per_session: collections.Counter[str] = collections.Counter()
        self.waiting_per_ip: collections.Counter[str] = collections.Counter()
        self._full_logged = -1.0
        self.gate = gate
        self.connect = connect
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.paths = PathTemplate(settings.path)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        #: Every open browser connection, and those with a live relay, for the drain.
        self.connections: set[NoVNCServerProtocol] = set()
        self.live: set[NoVNCServerProtocol] = set()
        #: Fired when ``connections`` becomes empty, while a drain waits for it.
        self.drained: Deferred[None] | None = None
        self.setProtocolOptions(
            # Our own readiness deadline governs the wait; Autobahn's would cut it short.
            openHandshakeTimeout=0,
            # RFC 6455 only: the refusal of another version names 13 (noVNC speaks 13).
            versions=[13],
            # No status page, and above all no ?redirect=URL (an open redirect): a request
            # that is not a WebSocket upgrade gets 426.
            webStatus=False,
            maxFramePayloadSize=settings.max_message_size,
            maxMessagePayloadSize=settings.max_message_size,
            # Say why (e.g. 1009 too big) in a close frame instead of dropping the socket (1006).
            failByDrop=False,
            # Never compress: VNC payloads are already encoded, and it costs memory per socket.
            perMessageCompressionAccept=lambda offers: None,
            # Text is refused (1003) whatever it holds: no UTF-8 validator per connection.
            utf8validateIncoming=False,
            # Autobahn's timers fire on whole-second buckets, so its default of 1 s may end a
            # close handshake at once and drop the socket before a distant browser's reply;
            # then the browser would see 1006 instead of our close code.
            closeHandshakeTimeout=5,
        )
        if settings.ping_interval > 0:
            # Keeps idle sessions alive through load balancers and finds vanished browsers.
            self.setProtocolOptions(
                autoPingInterval=settings.ping_interval,
                autoPingTimeout=settings.ping_timeout,
            )
        self._options_as_class_attributes()

    def _options_as_class_attributes(self) -> None:
        """Autobahn copies each option onto every connection that lacks it (~2 KB a
        connection); set once as class attributes of this factory's protocol, they are found
        without a copy.  Options set after this would not reach new connections: set them
        all in ``__init__``."""
        values = {
            # A function as a class attribute would become a method of each connection.
            name: staticmethod(value) if isinstance(value, types.FunctionType) else value
            for name in NoVNCServerProtocol.CONFIG_ATTRS
            if hasattr(self, name)
            for value in [getattr(self, name)]
        }
        self.protocol = type(  # type: ignore[assignment]
            NoVNCServerProtocol.__name__, (NoVNCServerProtocol,), values
        )

    def startFactory(self) -> None:
        """Start-up is done when the first listener starts: move everything allocated so far
        out of the collector's sight.  A full collection then no longer walks the start-up
        heap (tens of MB of modules and settings), which made each one a pause of up to
        100 ms under load (bench/README.md, "Garbage collection")."""
        super().startFactory()
        gc.collect()
        gc.freeze()

    def count(self, protocol: NoVNCServerProtocol, delta: int) -> None:
        """Count a connection under its client address and session (once in, once out)."""
        if (delta > 0) == protocol._counted:
            return
        protocol._counted = delta > 0
        keys = ((self.per_ip, protocol.client), (self.per_session, protocol.session_id))
        for counter, key in keys:
            if key is None:
                continue
            counter[key] += delta
            if counter[key] <= 0:
                del counter[key]

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.connections) >= self.settings.max_connections:
            now = self.clock.seconds()
            if now - self._full_logged >= 1:
                self._full_logged = now
                _log.warn("max_connections ({n}) reached: closing new connections",
                          n=self.settings.max_connections)
            return None
        return super().buildProtocol(addr)

    def live_bytes(self) -> tuple[int, int]:
        """Bytes moved so far by the relays still open: (up, down)."""
        relays = [p.relay for p in self.live if p.relay is not None]
        return sum(r.up_bytes for r in relays), sum(r.down_bytes for r in relays)
