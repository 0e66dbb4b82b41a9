"""The browser side: Autobahn's server protocol as a thin adapter over the request pipeline.

``onConnect`` hands the request to :mod:`twisted_novnc.front.pipeline` (match, admit, wait for
readiness, authorize, connect) and returns its Deferred, so the HTTP 101 is sent only once the
VM is connected; ``onOpen`` starts the relay; a refusal becomes a close code after a completed
handshake (browsers cannot read an HTTP status) or, with ``reject = http``, the HTTP status.

Two protocol classes relay the same way to the outside:

- :class:`NoVNCServerProtocol`, the stock path (``[novnc] fast_path = off``): only public
  APIs, Autobahn's ``onMessage`` and ``sendMessage`` and the transport's ``write``;
- :class:`FastNoVNCServerProtocol`, the fast path (the default): the browser's frames are
  parsed chunk by chunk (:mod:`twisted_novnc.front.fastpath`) and bytes are written at once
  (:mod:`twisted_novnc.relay.sending`), through Autobahn's internals, all of them in
  :mod:`twisted_novnc._compat.autobahn`.

Each WebSocket connection logs one event per step of its life (request and waiting, ready,
upstream connected and relay open, closed) with the same keys: ``session_id``, ``client``, and
at the end ``outcome``, ``wait_seconds``, ``relay_seconds``, ``up_bytes``, ``down_bytes``.  A
connection that is no WebSocket upgrade is a plain HTTP request, logged and counted as one
(:mod:`twisted_novnc.front.plainhttp`).
"""

from __future__ import annotations

import collections
import ipaddress
import os
import socket
import types
from typing import Any, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_novnc._compat.autobahn import AutobahnFastPath, autobahn_position, open_adopted
from twisted_novnc._compat.twisted import (
    TCPServerTransport,
    adopt_connected_socket,
    is_plain_tcp,
    take_unsent,
)
from twisted_novnc.config import AuthSettings, NovncSettings, WebSettings
from twisted_novnc.database.interfaces import ITokenStore
from twisted_novnc.database.readiness import ReadinessGate, Watch
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.front import web
from twisted_novnc.front.fastpath import BrowserFrames, FramePosition
from twisted_novnc.front.forwarded import client_address, parse_networks
from twisted_novnc.front.frames import server_frame_header
from twisted_novnc.front.pipeline import (
    SUBPROTOCOL,
    Attempt,
    BrowserRequest,
    Connected,
    Connector,
    Pipeline,
    log_refusal,
)
from twisted_novnc.front.plainhttp import PlainRequest, request_ended, request_line
from twisted_novnc.front.requesthead import (
    MAX_HEAD,
    BadHead,
    check_head,
    head_end,
    header_fields,
)
from twisted_novnc.front.viewer import Viewer
from twisted_novnc.operations.metrics import Metrics, outcome_label
from twisted_novnc.reactors import ISocketReactor
from twisted_novnc.recording.recorder import Recorder
from twisted_novnc.relay.flow import PEER_FULL, ConnectionFlow
from twisted_novnc.relay.handoff import MovedRelay
from twisted_novnc.relay.relay import Relay, TransportPeer
from twisted_novnc.relay.sending import (
    RelayTransport,
    close_now,
    send_now,
    tune_relay_transport,
)
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.relay.upstream import TCPUpstream, WebSocketUpstream, adopt_upstream
from twisted_novnc.session import Target
from twisted_novnc.vnc.browser_greeting import BrowserGreeting

__all__ = [
    "SUBPROTOCOL",
    "Connector",
    "FastNoVNCServerProtocol",
    "NoVNCServerFactory",
    "NoVNCServerProtocol",
    "close_frame",
]

#: Seconds a peer has to take our last bytes (a close frame) before its socket is aborted.
ABORT_GRACE = 2.0
#: Seconds a refused client has to answer the refusal's close frame before its socket is
#: dropped: it holds no slot meanwhile, only its socket (Autobahn's closeHandshakeTimeout,
#: longer, is for ending relays).
REFUSAL_CLOSE_TIMEOUT = 2.0

_log = Logger()


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


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


# Autobahn's own bases disagree on two attribute types; mypy compares them once a class
# has two bases.
class NoVNCServerProtocol(TransportPeer, WebSocketServerProtocol):  # type: ignore[misc]
    """One browser connection, on Autobahn's public API only (the stock path).

    Autobahn owns ``self.log``, so our logger is ``_log``.
    """

    _log = Logger()
    factory: NoVNCServerFactory
    relay: Relay | None = None
    #: The request's way through the pipeline, from onConnect on.
    attempt: Attempt | None = None
    _connected: Connected | None = None
    _watch: Watch | None = None
    _refused: Refused | None = None
    _http_status: int | None = None
    _opened_at: float | None = None
    _request_timer: IDelayedCall | None = None
    _idle_timer: IDelayedCall | None = None
    _idle_seen: int = -1
    #: The request head as it arrives; None once it was checked and handed to Autobahn.
    _head: bytes | None = b""
    _head_refused: bool = False
    _early_bytes: int = 0
    _gone: bool = False
    _abort_timer: IDelayedCall | None = None
    _refusal_timer: IDelayedCall | None = None
    #: The address counted in ``factory.unfinished`` until the request head is read.
    _unfinished: str | None = None
    #: A plain HTTP answer ([web] root) on its way, and the address it is counted under.
    _download: web.Download | None = None
    #: The connection's request when it is no WebSocket upgrade (logged as an HTTP request).
    _plain: PlainRequest | None = None
    _accepted_at: float = 0.0
    _web_client: str | None = None
    #: Reading paused while the browser's write buffer is full; the write timeout (onOpen on).
    _flow: ConnectionFlow | None = None
    _write_timed_out: bool = False
    _text_refused: bool = False
    #: Handed to a process of the new generation: its end here is not the relay's end.
    _moved: bool = False

    @property
    def session_id(self) -> str | None:
        return self.attempt.session_id if self.attempt is not None else None

    @property
    def client(self) -> str:
        return self.attempt.client if self.attempt is not None else "-"

    # -- the request head, checked before Autobahn reads it ----------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._accepted_at = self.factory.clock.seconds()
        self.factory.connections.add(self)
        self._request_timer = self.factory.clock.callLater(
            self.factory.settings.request_timeout, self._request_too_slow
        )

    def dataReceived(self, data: bytes) -> None:
        """Check the request head strictly before Autobahn sees it; bound what is buffered."""
        if self._head_refused:
            return  # answered and closing: whatever else arrives is not read
        if self._head is None:
            if self.state == self.STATE_CONNECTING:
                # Nothing may come between the request and our 101 but a little pipelining.
                self._early_bytes += len(data)
                if self._early_bytes > MAX_HEAD:
                    self.transport.abortConnection()
                    return
            self.websocket_data(data)
            return
        self._head += data
        try:
            end = head_end(self._head)
            if end is None:
                return
            self._head_read()
            check_head(self._head[:end])
        except BadHead as bad:
            self._head_read()
            end = head_end(self._head) if bad.status != 431 else None
            self._plain = PlainRequest(
                self._client_of(self._head[:end] if end else None),
                *request_line(self._head), status=bad.status,
            )
            self._head = None
            self._answer_and_close(bad.status, f"HTTP/1.1 {bad.status} {bad.reason}\r\n"
                                   "Connection: close\r\n\r\n".encode())
            return
        buffered, self._head = self._head, None
        self._early_bytes = len(buffered) - end
        if not _is_upgrade(buffered[:end]):
            self._plain = PlainRequest(self._client_of(buffered[:end]), *request_line(buffered))
            if self._answers_itself(buffered[:end]):
                self._serve_file(buffered[:end])
                return
            # Autobahn answers it (426, or 400): failHandshake below takes the status.
        self.websocket_data(buffered)

    def _client_of(self, head: bytes | None) -> str:
        """The client's address: the peer's (the PROXY header's, behind ``haproxy:``), or
        from a trusted proxy the one its forwarding header names, when the head is whole."""
        peer = getattr(self.transport.getPeer(), "host", "unix")
        if head is None:
            return str(peer)
        return client_address(
            peer, header_fields(head), self.factory.pipeline.trusted_proxies,
            self.factory.settings.forwarded_header,
        )

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Autobahn refuses the request with an HTTP status: remember which."""
        self._http_status = code
        if self._plain is not None:
            self._plain.status = code
        super().failHandshake(reason, code, responseHeaders)

    def _head_read(self) -> None:
        """The request head is in (or the connection is gone): no longer an unfinished one."""
        if self._unfinished is not None:
            limits = self.factory.limits
            limits.add(self.factory.unfinished, self._unfinished, -1)
            self._unfinished = None

    def _answers_itself(self, head: bytes) -> bool:
        """Whether a plain request is the viewer's or for [web] root; else Autobahn's 426."""
        viewer = self.factory.viewer
        target = head.split(b" ", 2)[1].decode("ascii")
        return bool(self.factory.web_root) or (viewer is not None and viewer.claims(target))

    def _serve_file(self, head: bytes) -> None:
        """A plain GET on the WebSocket listener: the viewer's page or file ([web] viewer),
        else a file of [web] root (the noVNC client), sent under back-pressure, counted under
        its client's address with its WebSockets (``max_per_ip``) until the connection is
        gone."""
        factory = self.factory
        self._head_refused = True
        self._cancel_request_timer()
        method, target = head.split(b" ", 2)[:2]
        assert self._plain is not None
        client = self._plain.client
        limits = factory.limits
        limits.add(limits.per_ip, client, +1)
        self._web_client = client
        if limits.per_ip[client] > factory.settings.max_per_ip:
            too_many = Refusal.TOO_MANY
            self._log.info("refused file request from {client}: {status} {reason} (max_per_ip)",
                           event="file_refused", client=client, status=too_many.http_status,
                           reason=too_many.reason)
            answer = web.refusal(too_many.http_status, too_many.reason)
        elif factory.viewer is not None and factory.viewer.claims(target.decode("ascii")):
            answer = factory.viewer.answer(target.decode("ascii"), method.decode())
        else:
            answer = web.answer(factory.web_root, target.decode("ascii"), method.decode())
        self._plain.status = answer.status
        self._download = web.Download(
            answer, self.transport, factory.clock, factory.web_send_timeout, peer=client
        )
        self._download.start()

    def websocket_data(self, data: bytes) -> None:
        """Bytes for Autobahn to read (the upgrade request, then frames)."""
        WebSocketServerProtocol.dataReceived(self, data)

    def _answer_and_close(self, status: int, answer: bytes) -> None:
        """Answer in plain HTTP and read nothing more from this connection."""
        self._head_refused = True
        self._cancel_request_timer()
        self.transport.write(answer)
        self.transport.loseConnection()

    def _request_too_slow(self) -> None:
        self._request_timer = None
        self._log.info("dropping {peer}: no complete request in {timeout:g}s",
                       event="request_timeout",
                       peer=self.peer, timeout=self.factory.settings.request_timeout)
        self.transport.abortConnection()

    def _cancel_request_timer(self) -> None:
        _cancel(self._request_timer)
        self._request_timer = None

    # -- the handshake: the pipeline's ----------------------------------------------------------

    # Autobahn documents a Deferred result for onConnect; its annotation omits it.
    def onConnect(self, request: ConnectionRequest) -> Deferred[Any]:  # type: ignore[override]
        self._cancel_request_timer()
        self._plain = None  # a WebSocket upgrade after all (Autobahn's reading of the head)
        self.attempt = attempt = self.factory.pipeline.start(
            BrowserRequest(
                path=request.path,
                query=urlsplit(self.http_request_uri).query,
                params=request.params,
                headers=request.headers,
                origin=request.origin,
                protocols=request.protocols,
                peer=getattr(self.transport.getPeer(), "host", "unix"),
            )
        )
        d: Deferred[Any] = attempt.result
        d.addCallbacks(self._accept, self._refuse)
        return d

    def _accept(self, connected: Connected) -> str | None:
        self._connected = connected
        return connected.subprotocol

    def _refuse(self, failure: Failure) -> str | None:
        if failure.check(CancelledError):
            raise ConnectionDeny(499, "client closed request")
        refused = cast(Refused, failure.value)
        assert self.attempt is not None
        if self.factory.settings.reject == "http" or refused.refusal is Refusal.BAD_SUBPROTOCOL:
            # A browser that offered subprotocols fails a handshake that selects none of them
            # before it can read any close code, so this one is always an HTTP refusal.
            self._http_status = refused.refusal.http_status
            raise ConnectionDeny(refused.refusal.http_status, refused.refusal.reason)
        self._refused = refused
        return SUBPROTOCOL if SUBPROTOCOL in self.attempt.request.protocols else None

    # -- the open connection: the relay ------------------------------------------------------

    def onOpen(self) -> None:
        self._flow = ConnectionFlow(
            self.transport, self.factory.clock, self.factory.settings.write_timeout, self
        )
        self._flow.start()
        if self._refused is not None:
            refusal = self._refused.refusal
            self.sendClose(refusal.close_code, refusal.reason)
            self._refusal_timer = self.factory.clock.callLater(
                REFUSAL_CLOSE_TIMEOUT, self._refusal_unanswered
            )
            return
        assert self._connected is not None and self.attempt is not None
        factory, target = self.factory, self._connected.target
        self._opened_at = factory.clock.seconds()
        upstream = self._connected.upstream
        # Logged in to the VM with the session's credentials: the browser gets an RFB opening
        # of the proxy's own, with no password to ask for (twisted_novnc.vnc).
        greeting = BrowserGreeting() if getattr(upstream, "login", None) is not None else None
        self.relay = Relay(target.session_id, browser=self, vm=upstream, greeting=greeting)
        if factory.recorder is not None:
            # Before start: the proxy's own RFB opening is what the browser sees first.
            self.relay.recording = factory.recorder.begin(
                target.session_id, self.client, target.record
            )
        self.relay.start()
        self.relay_started(self.relay)
        self._connected.upstream.attach(self.relay)
        self._watch = factory.gate.watch(target, self._revoked)
        factory.live.add(self)
        if factory.settings.idle_timeout:
            self._idle_timer = factory.clock.callLater(
                factory.settings.idle_timeout, self._idle_check
            )
        self.forget_handshake()
        # What the relay needs is wired: the rest of the request's way is garbage now.
        self._connected = None
        self.attempt.opened()
        # One line for two steps that are microseconds apart (the 101 is sent when the
        # upstream connects): a line costs a connection as much as its whole relay set-up.
        ready_at = self.attempt.ready_at
        assert ready_at is not None
        self._log.info(
            "upstream connected {session_id} {host}:{port} in {connect_seconds:.3f}s:"
            " relay open from {client} after {wait_seconds:.3f}s", event="relay_open",
            session_id=self.session_id,
            client=self.client,
            host=target.host,
            port=target.port,
            connect_seconds=self._opened_at - ready_at,
            wait_seconds=self._opened_at - self.attempt.started,
        )

    def relay_started(self, relay: Relay) -> None:
        """The relay is wired: browser messages reach it through ``onMessage``."""

    def forget_handshake(self) -> None:
        """The handshake is done; the stock path keeps what Autobahn parsed of it."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay is None:
            return
        if not isBinary:
            self._refuse_text()
            return
        self.relay.from_browser(payload)

    def onMessageBegin(self, isBinary: bool) -> None:
        """Text is refused on its first frame's header, before any of its payload is kept."""
        super().onMessageBegin(isBinary)
        if not isBinary:
            self._refuse_text()

    def onMessageFrameData(self, payload: bytes) -> None:
        """Autobahn goes on reading frames while it closes: keep none of a refused text
        message, nor of any message once the connection is closing."""
        if self._text_refused or self.state != self.STATE_OPEN:
            return
        super().onMessageFrameData(payload)

    def _refuse_text(self) -> None:
        if self._text_refused:
            return
        self._text_refused = True
        if self.relay is not None:
            self.relay.browser_gone()
        close_frame(self, 1003, "binary messages only")

    def _idle_check(self) -> None:
        """Close a relay that moved nothing since the last look, one idle_timeout ago."""
        self._idle_timer = None
        if self.relay is None or self.relay.ended_by is not None:
            return
        if self.relay.activity == self._idle_seen:
            self._log.info("idle {session_id} from {client}: closing", event="relay_idle",
                           session_id=self.session_id, client=self.client)
            self.end_relay(Refusal.IDLE.close_code, Refusal.IDLE.reason, "idle")
            return
        self._idle_seen = self.relay.activity
        self._idle_timer = self.factory.clock.callLater(
            self.factory.settings.idle_timeout, self._idle_check
        )

    def _revoked(self, refused: Refused) -> None:
        """The session ended, expired or moved while relayed."""
        self._watch = None
        log_refusal("revoked", refused, self.session_id, self.client)
        self.end_relay(refused.refusal.close_code, refused.refusal.reason, "revoked")

    def end_relay(self, code: int, reason: str, by: str) -> None:
        """Close both sides of a live relay with this code (revocation, shutdown)."""
        if self.relay is not None:
            self.relay.end(by, code, reason)

    # -- Peer, for the relay (producer and consumer: the flow's, see relay/flow.py) ----------

    @property
    def producer(self) -> Any:
        """Reading from the browser, which the VM's side pauses for a reason of its own:
        this protocol's pauseProducing and resumeProducing below."""
        return self if self._flow is not None else self.transport

    @property
    def consumer(self) -> Any:
        """The browser's output, which pauses the VM's producer while it is full."""
        return self._flow if self._flow is not None else self.transport

    def pauseProducing(self) -> None:
        assert self._flow is not None
        self._flow.pause_reading(PEER_FULL)

    def resumeProducing(self) -> None:
        assert self._flow is not None
        self._flow.resume_reading(PEER_FULL)

    def stopProducing(self) -> None:
        if self._flow is not None:
            self._flow.peer_stopped()

    def send(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)
        elif self.relay is not None:
            # A close handshake has begun (ours, the browser's, or a ping timeout): the VM's
            # bytes have nowhere to go, so let the VM go too.
            self.relay.browser_gone()

    def close(self, code: int, reason: str) -> None:
        close_frame(self, code, reason)

    # -- moving to a process of the new generation (processes/upgrade.py) ---------------------

    def unmovable(self) -> str | None:
        """Why this relay cannot be handed to another process now (None: it can).

        Both sockets must be plain TCP (no TLS: its session state cannot leave OpenSSL), the
        relay open, and each WebSocket reader between two frames (the fast path's may be in
        the middle of a binary frame: its position travels), so that the new process's parser
        starts exactly where this one stops.
        """
        relay = self.relay
        if relay is None or relay.ended_by is not None or self._gone or self._watch is None:
            return "not relaying"
        if self.state != self.STATE_OPEN:
            return "closing"
        if relay.greeting is not None:
            return "the browser's RFB opening is under way"
        if not is_plain_tcp(self.transport):
            return "TLS or a wrapped transport"
        between, inside, _ = autobahn_position(self)
        if not between or (inside and not self.relays_own_frames()):
            return "in the middle of a frame"
        upstream = cast(TCPUpstream | WebSocketUpstream, relay.vm)
        return upstream.unmovable()

    def relays_own_frames(self) -> bool:
        """Whether the browser's frames are parsed outside Autobahn (the fast path's)."""
        return False

    def frame_position(self) -> FramePosition:
        """Where the browser's frame parser stands, as it travels with a moved relay."""
        return FramePosition()

    def hand_off(self, ident: int) -> tuple[MovedRelay, list[int]]:
        """Stop relaying here and give the relay up: its state, and a duplicate of each of its
        two sockets (the caller sends them and closes them once the new process has them).

        Nothing is closed toward the browser or the VM: each socket is let go here without a
        shutdown, so the other copy goes on as the same connection.  Only for a relay that is
        not :meth:`unmovable`.
        """
        relay, watch, attempt = self.relay, self._watch, self.attempt
        assert relay is not None and watch is not None and attempt is not None
        assert self._opened_at is not None
        upstream = cast(TCPUpstream | WebSocketUpstream, relay.vm)
        # The duplicates first: if there is no descriptor left, nothing has changed yet.
        browser_fd = os.dup(self.transport.fileno())
        try:
            vm_fd = os.dup(upstream.transport.fileno())
        except OSError:
            os.close(browser_fd)
            raise
        target = watch.target
        now = self.factory.clock.seconds()
        unread = autobahn_position(self)[2]
        moved = MovedRelay(
            ident=ident,
            session_id=target.session_id,
            host=target.host,
            port=target.port,
            expires_at=target.expires_at,
            client=attempt.client,
            upstream=upstream.kind,
            subprotocol=self.websocket_protocol_in_use,
            fast_path=self.relays_own_frames(),
            up_bytes=relay.up_bytes,
            down_bytes=relay.down_bytes,
            activity=relay.activity,
            wait_seconds=(attempt.ready_at or self._opened_at) - attempt.started,
            relay_seconds=now - self._opened_at,
            browser_unread=unread,
            frame=self.frame_position(),
            browser_unsent=take_unsent(self.transport),
            vm_unsent=take_unsent(upstream.transport),
            vm_unread=upstream.unread(),
            session_counted=attempt.session_counted,
            handed_at=now,
            recording=relay.recording.moved() if relay.recording is not None else None,
        )
        fds = [browser_fd, vm_fd]
        self._moved = True
        relay.moved()
        self.factory.metrics.relay_moved_out(relay.up_bytes, relay.down_bytes)
        self._browser_left()
        # Let both sockets go here without a shutdown (an abort closes without one): the
        # duplicates, and then the new process's copies, keep each connection as it is.
        upstream.transport.abortConnection()
        self.transport.abortConnection()
        return moved, fds

    def adopted(
        self, moved: MovedRelay, transport: Any, upstream: TCPUpstream | WebSocketUpstream
    ) -> None:
        """Go on with a relay another process handed here, on its sockets: what it had not
        sent goes first, then the relay is wired as ``onOpen`` wires one, and what it had
        read and not parsed is parsed here."""
        factory = self.factory
        clock = factory.clock
        open_adopted(self, transport, moved.subprotocol, server=True)
        self._head = None
        factory.connections.add(self)
        now = clock.seconds()
        self._opened_at = now - moved.relay_seconds
        started = self._opened_at - moved.wait_seconds
        self.attempt = factory.pipeline.adopted(
            moved.session_id, moved.client, started, self._opened_at, moved.session_counted
        )
        if moved.browser_unsent:
            transport.write(moved.browser_unsent)
        if moved.vm_unsent:
            upstream.transport.write(moved.vm_unsent)
        self._flow = ConnectionFlow(transport, clock, factory.settings.write_timeout, self)
        self._flow.start()
        self.relay = relay = Relay(
            moved.session_id, browser=self, vm=upstream, up_bytes=moved.up_bytes,
            down_bytes=moved.down_bytes, activity=moved.activity,
        )
        if moved.recording is not None and factory.recorder is not None:
            # The same file, appended to: one recording, however many processes it crossed.
            relay.recording = factory.recorder.resume(moved.recording)
        factory.metrics.relay_moved_in(moved.up_bytes, moved.down_bytes)
        relay.start()
        self.relay_started(relay)
        self.resume_frames(moved.frame)
        upstream.attach(relay)
        target = Target(moved.session_id, moved.host, moved.port, moved.expires_at)
        self._watch = factory.gate.watch(target, self._revoked)
        # A NOTIFY that ended the session during the move went to the old process.
        factory.gate.recheck(target.session_id)
        factory.live.add(self)
        if factory.settings.idle_timeout:
            self._idle_seen = relay.activity
            self._idle_timer = clock.callLater(factory.settings.idle_timeout, self._idle_check)
        self.forget_handshake()
        moving = max(0.0, now - moved.handed_at) if moved.handed_at else 0.0
        factory.metrics.relay_move.observe(moving)
        self._log.info(
            "adopted {session_id} from {client} after {move_seconds:.3f}s on the move"
            " (relayed {relay_seconds:.3f}s so far, up={up_bytes} down={down_bytes})",
            event="relay_adopted",
            session_id=moved.session_id, client=moved.client, move_seconds=moving,
            relay_seconds=moved.relay_seconds, up_bytes=moved.up_bytes,
            down_bytes=moved.down_bytes,
        )
        if moved.browser_unread:
            self.dataReceived(moved.browser_unread)
        if moved.vm_unread and relay.ended_by is None:
            upstream.dataReceived(moved.vm_unread)

    def resume_frames(self, position: FramePosition) -> None:
        """The stock path parses whole frames only: it takes relays moved between frames."""

    def let_go(self) -> None:
        """This process gives the relay up without closing anything (a failed take-over)."""
        self._moved = True
        if self.relay is not None:
            self.relay.moved()
            if self.relay.recording is not None:
                self.relay.recording.let_go()
        self._browser_left()

    # -- the end ---------------------------------------------------------------------------------

    def dropConnection(self, abort: bool = False) -> None:
        """Autobahn aborts the socket after a protocol error and once a close handshake it
        began is answered, which throws away what is still in the write buffer: the 101 and
        the close frame that says why.  Close after a flush instead; abort only a peer that
        will not take them within ABORT_GRACE."""
        if abort and self._abort_timer is None and self.state != self.STATE_CLOSED:
            self._abort_timer = self.factory.clock.callLater(ABORT_GRACE, self._abort)
        if self._flow is not None and self.state != self.STATE_CLOSED:
            self._flow.closing()  # a transport with a producer would not close
        super().dropConnection(abort=False)

    def _refusal_unanswered(self) -> None:
        """A refused client that does not finish the close handshake is dropped (flushed, then
        aborted after ABORT_GRACE) as at Autobahn's own close handshake timeout."""
        self._refusal_timer = None
        self.onCloseHandshakeTimeout()

    def unregisterProducer(self) -> None:
        """Autobahn unregisters the transport's producer as it drops the connection: that is
        the flow's (relay/flow.py) from the open on, detached once."""
        if self._flow is not None:
            self._flow.closing()
        else:
            super().unregisterProducer()

    def _abort(self) -> None:
        self._abort_timer = None
        self.transport.abortConnection()

    def write_stalled(self, pending: int | None) -> None:
        """The browser took nothing of a full write buffer for write_timeout: drop it."""
        self._write_timed_out = True
        self._log.info(
            "dropping {session_id} from {client}: took no byte in {timeout}s"
            " ({pending} bytes pending)", event="browser_write_timeout",
            session_id=self.session_id, client=self.client,
            timeout=self.factory.settings.write_timeout,
            pending="unknown" if pending is None else pending,
        )
        self.transport.abortConnection()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._browser_left()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_request_timer()
        self._head_read()
        if self._download is not None:
            self._download.stop()
            self._download = None
        if self._web_client is not None:
            self.factory.limits.add(self.factory.limits.per_ip, self._web_client, -1)
            self._web_client = None
        for timer in (self._idle_timer, self._abort_timer, self._refusal_timer):
            _cancel(timer)
        self._idle_timer = self._abort_timer = self._refusal_timer = None
        if self._flow is not None:
            self._flow.connection_lost()
        self._browser_left()
        super().connectionLost(reason)
        self._closed()
        factory = self.factory
        factory.connections.discard(self)
        if not factory.connections and factory.drained is not None:
            drained, factory.drained = factory.drained, None
            drained.callback(None)

    def _browser_left(self) -> None:
        """Stop whatever the request or the relay has under way (once)."""
        if self._gone:
            return
        self._gone = True
        if self.attempt is not None:
            self.attempt.leave()
        if self._watch is not None:
            self.factory.gate.unwatch(self._watch)
            self._watch = None
        self.factory.live.discard(self)
        if self.relay is not None:
            self.relay.browser_gone()
        elif self._connected is not None:
            self._connected.upstream.close(1000, "browser left")

    def outcome(self) -> str:
        """How the connection ended, as a close code (1006: no close frame at all)."""
        if self._moved:
            return "moved"
        if self._write_timed_out:
            return "write_timeout"
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
        factory = self.factory
        end = factory.clock.seconds()
        if self._plain is None and self._head is not None:
            # No whole request head ever came: no WebSocket, an HTTP request without one.
            self._plain = PlainRequest(self._client_of(None))
        if self._plain is not None:
            request_ended(self._plain, end - self._accepted_at, factory.metrics)
            self.connection_ended()
            return
        outcome = self.outcome()
        relay = self.relay
        up = relay.up_bytes if relay is not None else 0
        down = relay.down_bytes if relay is not None else 0
        attempt = self.attempt
        wait = (
            (attempt.ready_at or self._opened_at or end) - attempt.started
            if attempt is not None
            else 0.0
        )
        relayed = end - self._opened_at if self._opened_at is not None else 0.0
        factory.metrics.connections.labels(outcome_label(outcome)).inc()
        if self._moved:
            self._log.info(
                "moved {session_id} from {client} to the new generation after"
                " {relay_seconds:.3f}s: up={up_bytes} down={down_bytes}", event="relay_moved",
                session_id=self.session_id, client=self.client, relay_seconds=relayed,
                up_bytes=up, down_bytes=down,
            )
            self.connection_ended()
            return
        if relay is not None:
            factory.metrics.relay_closed(up, down)
            if relay.recording is not None:
                relay.recording.finish(outcome, up, down)
        self._log.info(
            "closed {session_id} from {client}: {outcome} waited={wait_seconds:.3f}s"
            " relayed={relay_seconds:.3f}s up={up_bytes} down={down_bytes}",
            event="connection_closed",
            session_id=self.session_id,
            client=self.client,
            outcome=outcome,
            wait_seconds=wait,
            relay_seconds=relayed,
            up_bytes=up,
            down_bytes=down,
        )
        self.connection_ended()

    def connection_ended(self) -> None:
        """Let go of what points back at this protocol, so that reference counting frees the
        whole connection now rather than the garbage collector later: the relay (through its
        browser side), the upstream (through the relay), and Autobahn's ``is_closed`` future
        (fired with this protocol)."""
        self.relay = None
        self._connected = None
        self.is_closed = None
        self._flow = None  # it holds this protocol


# (The same disagreement of Autobahn's bases, as above.)
class FastNoVNCServerProtocol(AutobahnFastPath, NoVNCServerProtocol):  # type: ignore[misc]
    """One browser connection on the fast path (``[novnc] fast_path = on``).

    :class:`~twisted_novnc._compat.autobahn.AutobahnFastPath` turns Autobahn's private hooks
    into the public methods below; everything else is the stock protocol's.
    """

    def relay_started(self, relay: Relay) -> None:
        """Bigger reads and writes, and browser frames parsed as they arrive (fastpath.py)."""
        tune_relay_transport(self.transport)
        self.frames = BrowserFrames(
            # One call per chunk into the relay; a chunk is a bytearray, unmasked in place.
            cast(Any, relay.from_browser), self, self.factory.settings.max_message_size
        )

    def relays_own_frames(self) -> bool:
        return self.frames is not None

    def frame_position(self) -> FramePosition:
        assert self.frames is not None
        return cast(BrowserFrames, self.frames).position()

    def resume_frames(self, position: FramePosition) -> None:
        assert self.frames is not None
        cast(BrowserFrames, self.frames).resume(position)
        if position.in_message:
            self.message_begun()

    def send(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            # One binary frame per chunk from the VM: a header in front, the bytes not copied.
            send_now(self.transport, server_frame_header(len(data)), data)
        elif self.relay is not None:
            self.relay.browser_gone()

    def write_now(self, data: bytes) -> None:
        """Autobahn's own writes (the 101, close frames, pings), sent at once."""
        send_now(self.transport, b"", data)

    def close_transport(self, abort: bool) -> None:
        """Close with the FIN sent at once when nothing is left to write (``close_now``);
        ``dropConnection`` above never asks for an abort."""
        if abort:
            self.transport.abortConnection()
        else:
            close_now(self.transport)

    def connection_ended(self) -> None:
        super().connection_ended()
        self.frames = None  # it holds the relay and this protocol


class ClosedAtAccept(Protocol):
    """A connection beyond ``max_connections``: aborted as soon as it is made.

    Not ``None`` from ``buildProtocol``, which only a bare port understands: the ``ssl:`` and
    ``haproxy:`` wrappers would wrap ``None``, log a traceback and keep the socket open.
    """

    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).abortConnection()


class NoVNCServerFactory(WebSocketServerFactory):
    """Accepts noVNC clients on every listener and hands them the shared pipeline."""

    protocol = NoVNCServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        settings: NovncSettings,
        gate: ReadinessGate,
        connect: Connector,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        auth: AuthSettings | None = None,
        secret: bytes = b"",
        targets: TargetPolicy | None = None,
        web_root: str = "",
        tokens: ITokenStore | None = None,
        fast_path: bool = True,
        web_send_timeout: float = WebSettings().send_timeout,
        viewer: Viewer | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        # Autobahn's own Server header would name its version to every scanner.
        super().__init__(server="twisted_novnc", reactor=clock)
        self.settings = settings
        self.gate = gate
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.web_root = web_root
        self.web_send_timeout = web_send_timeout
        #: The viewer page and its files ([web] viewer), or None when it is off.
        self.viewer = viewer
        #: Records each relay (``[record]``), or None when nothing is recorded.
        self.recorder = recorder
        self.fast_path = fast_path
        self.pipeline = Pipeline(
            settings,
            gate,
            # The session store is the token store too, unless another is given.
            tokens if tokens is not None else ITokenStore(gate.source),
            targets if targets is not None else TargetPolicy(),
            connect,
            clock,
            self.metrics,
            auth if auth is not None else AuthSettings(),
            secret,
        )
        #: Open connections by client address and by session, waiting ones by address.
        self.limits = self.pipeline.limits
        self._full_logged = -1.0
        #: Connections whose request head is still coming, by peer address, capped by
        #: max_per_ip (trusted proxies are not counted: their connections carry many clients).
        self.unfinished: collections.Counter[str] = collections.Counter()
        self._unfinished_logged = -1.0
        self._proxies = self.pipeline.trusted_proxies + parse_networks(
            settings.proxy_protocol_from
        )
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
        self._options_as_class_attributes(
            FastNoVNCServerProtocol if fast_path else NoVNCServerProtocol
        )

    def _options_as_class_attributes(self, base: type[NoVNCServerProtocol]) -> None:
        """Autobahn copies each option onto every connection that lacks it (~2 KB a
        connection); set once as class attributes of this factory's protocol, they are found
        without a copy.  Options set after this would not reach new connections: set them
        all in ``__init__``."""
        values = {
            # A function as a class attribute would become a method of each connection.
            name: staticmethod(value) if isinstance(value, types.FunctionType) else value
            for name in base.CONFIG_ATTRS
            if hasattr(self, name)
            for value in [getattr(self, name)]
        }
        self.protocol = type(base.__name__, (base,), values)  # type: ignore[assignment]

    def startFactory(self) -> None:
        """Say which path relays, once, when the first listener starts."""
        super().startFactory()
        if self.fast_path:
            _log.info("relaying on the fast path ([novnc] fast_path = on)", event="relay_path")
        else:
            _log.info("relaying on the stock path, public APIs only ([novnc] fast_path = off)",
                      event="relay_path")

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.connections) >= self.settings.max_connections:
            now = self.clock.seconds()
            if now - self._full_logged >= 1:
                self._full_logged = now
                _log.warn("max_connections ({n}) reached: closing new connections",
                          event="max_connections",
                          n=self.settings.max_connections)
            return ClosedAtAccept()
        host = getattr(addr, "host", None)
        if not isinstance(host, str) or self._is_trusted_proxy(host):
            host = None  # a unix socket, or a proxy: not counted
        if host is not None and self.unfinished[host] >= self.settings.max_per_ip:
            now = self.clock.seconds()
            if now - self._unfinished_logged >= 1:
                self._unfinished_logged = now
                _log.warn("{peer} has max_per_ip ({n}) connections still sending their"
                          " request head: closing its new connections",
                          event="max_unfinished_heads",
                          n=self.settings.max_per_ip, peer=host)
            return ClosedAtAccept()
        protocol = super().buildProtocol(addr)
        if host is not None and isinstance(protocol, NoVNCServerProtocol):
            self.limits.add(self.unfinished, host, +1)
            protocol._unfinished = host
        return protocol

    def _is_trusted_proxy(self, host: str) -> bool:
        """A peer in ``trusted_proxies`` or ``proxy_protocol_from``: many clients behind one
        address, whose own addresses are unknown until the head (or PROXY header) is read."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def adopt(
        self, moved: MovedRelay, browser_fd: int, vm_fd: int, reactor: ISocketReactor
    ) -> NoVNCServerProtocol:
        """Take up a relay another process handed over, on its two sockets (whose descriptors
        this takes: adopted, or closed on failure).  ValueError when this process cannot
        continue it (the stock path mid-frame, an unknown upstream kind)."""
        try:
            browser_sock = socket.socket(fileno=browser_fd)
        except OSError:
            os.close(browser_fd)
            os.close(vm_fd)
            raise
        try:
            vm_sock = socket.socket(fileno=vm_fd)
        except OSError:
            browser_sock.close()
            os.close(vm_fd)
            raise
        try:
            if not self.fast_path and (moved.frame.frame_left or moved.frame.in_message
                                       or moved.frame.held):
                raise ValueError("this process runs the stock path ([novnc] fast_path = off),"
                                 " which cannot go on in the middle of a frame")
            browser_sock.setblocking(False)
            vm_sock.setblocking(False)
            peer = browser_sock.getpeername()
            target = Target(moved.session_id, moved.host, moved.port, moved.expires_at)
            upstream = adopt_upstream(
                moved.upstream, vm_sock, target, reactor, fast=self.fast_path,
                max_message_size=self.settings.max_message_size,
                write_timeout=self.settings.write_timeout,
            )
        except BaseException:
            browser_sock.close()
            vm_sock.close()
            raise
        protocol = cast(NoVNCServerProtocol, self.protocol())
        protocol.factory = self
        transport_class = RelayTransport if self.fast_path else TCPServerTransport
        transport = adopt_connected_socket(
            transport_class, browser_sock, protocol, peer[0], peer[1], reactor
        )
        try:
            protocol.adopted(moved, transport, upstream)
        except BaseException:
            # Let go of both sockets here without a shutdown: the sender goes on with them.
            protocol.let_go()
            upstream.transport.abortConnection()
            transport.abortConnection()
            raise
        return protocol

    def live_bytes(self) -> tuple[int, int]:
        """Bytes moved so far by the relays still open: (up, down)."""
        relays = [p.relay for p in self.live if p.relay is not None]
        return sum(r.up_bytes for r in relays), sum(r.down_bytes for r in relays)
