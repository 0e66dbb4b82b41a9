"""Connecting to the VM: a target in, a connected peer out.

The VNC server speaks first; its banner must wait until the browser's WebSocket is open, so what
the VM sends before the relay starts is held (and reading paused past HOLD_LIMIT).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from typing import Any, cast

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from OpenSSL import SSL
from twisted.internet import address, error, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IWriteDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_novnc._compat.autobahn import autobahn_position, open_adopted
from twisted_novnc._compat.twisted import (
    TCPServerTransport,
    adopt_connected_socket,
    is_plain_tcp,
    start_tls_client,
)
from twisted_novnc.backoff import jittered_backoff
from twisted_novnc.config import UpstreamSettings
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.reactors import IConnectingReactor, ISocketReactor
from twisted_novnc.relay.flow import NOT_RELAYING, PEER_FULL, ConnectionFlow
from twisted_novnc.relay.relay import Relay, TransportPeer
from twisted_novnc.relay.sending import RelayTransport, send_now, tune_relay_transport
from twisted_novnc.session import Target

_DONE = Failure(error.ConnectionDone())

_log = Logger()

KEEPALIVE = [
    (getattr(socket, name), value)
    for name, value in [("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)]
    if hasattr(socket, name)
]


#: (level, option, value) for every upstream socket, set straight on the socket.
SOCKET_OPTIONS = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *((socket.IPPROTO_TCP, option, value) for option, value in KEEPALIVE),
]


def tune_tcp(transport: Any) -> None:
    """No Nagle delay, and keepalives: a VM that vanishes without a FIN or RST is noticed in
    about 20 s, as a dead VM (4502).  Under TLS the TCP transport is the wrapper's own."""
    tcp = getattr(transport, "transport", None) or transport  # TLSMemoryBIOProtocol wraps it
    sock = getattr(tcp, "socket", None)
    if sock is None:
        return  # not a socket (a test's StringTransport)
    with contextlib.suppress(OSError):
        for level, option, value in SOCKET_OPTIONS:
            sock.setsockopt(level, option, value)


#: The kinds of VM side, as a moved relay's record names them.
UPSTREAM_TCP = "tcp"
UPSTREAM_WEBSOCKET = "websocket"

#: Bytes a VM may send (under TLS) before the relay starts; then reading pauses.
HOLD_LIMIT = 256 * 1024


@implementer(IHandshakeListener)
class TCPUpstream(TransportPeer, Protocol):
    """The VM side of a relay over raw TCP (or TLS)."""

    # A connected TCP transport: ITCPTransport and IPushProducer, which typing cannot join.
    transport: Any
    relay: Relay | None = None
    _closing: bool = False

    #: The fast path: relay buffer sizes, and writes sent at once (StockTCPUpstream: neither).
    fast = True
    #: What a moved relay's record calls this kind of VM side (relay/handoff.py).
    kind = UPSTREAM_TCP

    #: How the proxy logged in to the VM (twisted_novnc.vnc.login), when it did.
    login: Any = None
    #: Why the connection was lost, for a login that was under way.
    lost_reason: Failure | None = None
    _tls_started: Callable[[], None] | None = None

    def __init__(self, tls: bool = False) -> None:
        self.tls = tls
        #: Fires once connected (under TLS: once the VM's certificate has been accepted).
        #: (None once the connection is gone: it would hold the protocol in a cycle.)
        self.handshake: Deferred[TCPUpstream] = Deferred()
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._paused = False

    def connectionMade(self) -> None:
        tune_tcp(self.transport)
        if self.fast:
            tune_relay_transport(self.transport)
        if not self.tls:
            # The VNC server speaks first, and the browser's 101 and the attach follow in this
            # same call: nothing can be read before it, so reading is not paused (that was two
            # epoll_ctl calls a connection).  Should the attach ever come later, early bytes
            # are held (up to HOLD_LIMIT, then reading pauses), as under TLS.
            self.handshake.callback(self)

    def handshakeCompleted(self) -> None:
        if self.handshake is not None and not self.handshake.called:
            self.handshake.callback(self)
        elif self._tls_started is not None:
            started, self._tls_started = self._tls_started, None
            started()

    def start_tls(self, creator: Any, started: Callable[[], None]) -> None:
        """Go on under TLS, as the client (VeNCrypt); ``started`` is called once the
        handshake is done.  A relay under TLS writes through the TLS layer and never moves."""
        self.tls = True
        self._tls_started = started
        start_tls_client(self.transport, creator)

    def _pause(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    # Peer (producer and consumer: TransportPeer)
    def send(self, data: bytes) -> None:
        send_now(self.transport, b"", data)

    def close(self, code: int, reason: str) -> None:
        self._closing = True
        self.transport.loseConnection()

    def unmovable(self) -> str | None:
        """Why this side cannot move to another process now (None: it can)."""
        if self.tls:
            return "TLS to the VM"
        if self._closing or not is_plain_tcp(self.transport):
            return "the VM's socket is closing"
        return None

    def unread(self) -> bytes:
        """Bytes read from the VM and not relayed yet: none, raw TCP relays every read."""
        return b""

    def detach(self, unread: bytes) -> None:
        """Stop delivering to a login (twisted_novnc.vnc.login): the VM's bytes are held again,
        ``unread`` (what the login read past its end) first."""
        self.relay = None
        if unread:
            self._held.insert(0, unread)
            self._held_bytes += len(unread)

    def attach(self, relay: Relay) -> None:
        """Start delivering the VM's bytes (held since connect) to the relay."""
        self.relay = relay
        held, self._held = self._held, []
        for data in held:
            relay.from_vm(data)
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_vm(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HOLD_LIMIT and not self._paused:
            self._pause()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.tls and self.handshake is not None and not self.handshake.called:
            self.handshake.errback(
                Refused(Refusal.VM_UNREACHABLE, f"TLS to the VM failed: {reason.getErrorMessage()}")
            )
        elif self.relay is not None:
            self.lost_reason = reason
            self.relay.vm_gone(clean=reason.check(error.ConnectionDone) is not None)
        # Both point back here (the relay's VM side; the handshake fired with this protocol):
        # without them reference counting frees the connection at once.
        self.relay = None
        self.handshake = None  # type: ignore[assignment]


class StockTCPUpstream(TCPUpstream):
    """The VM side on the stock path (``[novnc] fast_path = off``): Twisted's own buffer
    sizes, and the browser's bytes written with ``transport.write``."""

    fast = False

    def send(self, data: bytes) -> None:
        self.transport.write(data)


#: Socket creation failed for lack of descriptors (per process, or system-wide).
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

#: One connection attempt never waits longer than this, so a retry can follow.
ATTEMPT_TIMEOUT = 5.0


def tls_trust(mode: str, ca_file: str) -> Any:
    """What ``[upstream] tls = verify`` trusts, read once at start-up (None otherwise).

    Raises ValueError naming the problem when ``ca_file`` is unreadable or holds no certificate.
    """
    if mode != "verify":
        return None
    if not ca_file:
        return ssl.platformTrust()
    try:
        with open(ca_file, "rb") as f:
            blocks = _pem_blocks(f.read())
        if not blocks:
            raise ValueError(f"no PEM certificate in {ca_file}")
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    except (OSError, SSL.Error) as e:
        raise ValueError(f"cannot read {ca_file}: {e}") from None


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN" in block]


def tls_options(mode: str, trust: Any, host: str) -> Any:
    """The client TLS options for one connection to ``host`` (None for tls = off)."""
    if mode == "off":
        return None
    if mode == "on":
        return ssl.CertificateOptions(verify=False)
    return ssl.optionsForClientTLS(host, trustRoot=trust)


class _AttemptFactory(ClientFactory):
    """One connection attempt: its protocol, and a Deferred of the peer once it is ready.

    Twisted's ``connectProtocol`` makes a new factory *class* per call and wraps the protocol
    twice (about 3 KB a relay, and a log line each way); this is one small object.  It lets go
    of the connector and the Deferred once decided, so that nothing of it is left in a
    reference cycle for the garbage collector to find.
    """

    noisy = False

    def __init__(self, protocol: Any, ready: Callable[[Any], Any]) -> None:
        self.protocol_instance = protocol
        self.ready = ready
        self.connector: Any = None
        #: The connect has an outcome: a protocol was built, or the attempt failed.
        self.decided = False
        self.result: Deferred[Any] | None = Deferred(self._cancel)

    def buildProtocol(self, addr: Any) -> Any:
        self.connector = None
        self.decided = True
        # Until ready (connected, TLS or WebSocket handshake done) the Deferred waits.
        d = self.ready(self.protocol_instance)
        if isinstance(d, Deferred):
            d.addBoth(self._decide)
        else:
            self._decide(d)
        return self.protocol_instance

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connector = None
        self.decided = True
        self._decide(reason)

    def _decide(self, outcome: Any) -> None:
        result, self.result = self.result, None
        if result is None or result.called:
            return  # cancelled or timed out already: nothing waits for this one
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    def _cancel(self, _: Deferred[Any]) -> None:
        self.result = None
        if self.connector is not None:
            connector, self.connector = self.connector, None
            connector.stopConnecting()
            return
        transport = getattr(self.protocol_instance, "transport", None)
        if transport is not None:
            transport.abortConnection()


_CONNECTING = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})


@implementer(IWriteDescriptor)
class SocketConnector:
    """One TCP connection attempt made on a socket directly, not through Twisted's Connector.

    ``reactor.connectTCP`` builds a Connector and a Client, defers ``connect()`` to the next
    reactor turn, calls ``connect()`` and ``getsockopt`` twice and moves the descriptor in and
    out of epoll four times; in a burst of ready sessions that is a good part of each one's
    CPU.  This is a socket, ``connect()`` (twice: a loopback connect is done when the first
    returns), a wait for writability and ``SO_ERROR`` when it is not done yet; the
    connected socket becomes a transport the way ``reactor.adoptStreamConnection`` makes one
    (a ``tcp.Server``: a :class:`RelayTransport`, without the dup).  Toward the factory it
    behaves as a Connector does: ``buildProtocol``, or ``clientConnectionFailed`` with the same
    errors (refused, timed out, ``UserError`` after ``stopConnecting``, a ``ConnectError``
    carrying ``EMFILE``).
    """

    def __init__(
        self, reactor: ISocketReactor, host: str, port: int, factory: Any, timeout: float
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self._ipv6 = ":" in host
        self._socket: socket.socket | None = None
        self._timer: Any = None
        self._done = False

    def start(self) -> None:
        family = socket.AF_INET6 if self._ipv6 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
        except OSError as e:
            self._fail(error.getConnectError((e.errno, e.strerror)))
            return
        result = sock.connect_ex((self.host, self.port))
        if result == errno.EINPROGRESS:
            # On loopback the kernel has done the whole handshake inside the call, yet says
            # EINPROGRESS: asking again (EALREADY while a remote VM's handshake is on the
            # way) saves the writer registration, the timer and a reactor turn.
            result = sock.connect_ex((self.host, self.port))
        if result in (0, errno.EISCONN):
            self._socket = sock
            self._connected()
            return
        if result not in _CONNECTING:
            sock.close()
            self._fail(error.getConnectError((result, os.strerror(result))))
            return
        self._socket = sock
        self.reactor.addWriter(self)
        self._timer = self.reactor.callLater(self.timeout, self._timed_out)

    # IConnector, as far as a ClientFactory and _AttemptFactory use it
    def stopConnecting(self) -> None:
        self._close()
        self._fail(error.UserError())

    def getDestination(self) -> address.IPv4Address | address.IPv6Address:
        kind = address.IPv6Address if self._ipv6 else address.IPv4Address
        return kind("TCP", self.host, self.port)

    # IWriteDescriptor, while connecting
    def fileno(self) -> int:
        return self._socket.fileno() if self._socket is not None else -1

    def doWrite(self) -> None:
        self.reactor.removeWriter(self)
        assert self._socket is not None
        code = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._close()
            self._fail(error.getConnectError((code, os.strerror(code))))
            return
        self._connected()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the descriptor: epoll said error or hang-up (a refused or
        failed connect, whose cause is in SO_ERROR), or the reactor is shutting down."""
        code = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if self._socket else 0
        self._close()
        if code:
            self._fail(error.getConnectError((code, os.strerror(code))))
        else:
            self._fail(error.ConnectError(string=reason.getErrorMessage()))

    def logPrefix(self) -> str:
        return "connecting to the VM"

    # the outcomes
    def _connected(self) -> None:
        self._cancel_timer()
        sock, self._socket = self._socket, None
        assert sock is not None
        self._done = True
        destination = self.getDestination()
        protocol = self.factory.buildProtocol(destination)
        if protocol is None:
            sock.close()
            return
        transport = adopt_connected_socket(
            RelayTransport, sock, protocol, self.host, self.port, self.reactor
        )
        protocol.makeConnection(transport)

    def _timed_out(self) -> None:
        self._timer = None
        self._close()
        self._fail(error.TimeoutError())

    def _fail(self, reason: Exception) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_timer()
        self.factory.clientConnectionFailed(self, Failure(reason))

    def _close(self) -> None:
        if self._socket is None:
            return
        self.reactor.removeWriter(self)  # while fileno() still names the socket
        sock, self._socket = self._socket, None
        sock.close()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


def dial(
    reactor: IConnectingReactor,
    host: str,
    port: int,
    factory: Any,
    timeout: float,
    fast: bool = True,
) -> Any:
    """Start a TCP connection attempt; the IConnector-like object it returns can stop it.

    On a real reactor that is a :class:`SocketConnector`; a fake one (``MemoryReactor``, in
    the unit tests of the retry logic), or ``fast = False``, gets ``connectTCP``.
    """
    if fast and isinstance(reactor, PosixReactorBase):
        connector = SocketConnector(cast(ISocketReactor, reactor), host, port, factory, timeout)
        connector.start()
        return connector
    return reactor.connectTCP(host, port, factory, timeout)


@attrs.define(eq=False)
class _Connect:
    """Attempts, with retries, until one is ready or the deadline passes (connect_tcp)."""

    reactor: IConnectingReactor
    target: Target
    deadline: float
    retry: bool
    make_protocol: Callable[[], Any]
    ready: Callable[[Any], Any]
    tls: Any
    fast: bool = True
    result: Deferred[Any] | None = None
    _current: Any = None
    #: The retry delays, made at the first retry (most connects never need one).
    _delays: Any = None

    def start(self) -> Deferred[Any]:
        result: Deferred[Any] = Deferred(self._cancel)
        self.result = result
        self._attempt()
        return result

    def _attempt(self) -> None:
        remaining = self.deadline - self.reactor.seconds()
        per_try = max(0.1, min(ATTEMPT_TIMEOUT, remaining))
        factory = _AttemptFactory(self.make_protocol(), self.ready)
        wrapped = factory if self.tls is None else TLSMemoryBIOFactory(self.tls, True, factory)
        d = factory.result
        assert d is not None
        # dial's timeout is the TCP connect (error.TimeoutError, retried); the Deferred's also
        # bounds the TLS or WebSocket handshake that follows.  A connect can fail or succeed
        # before dial returns: d then already holds its result for the callbacks below.
        connector = dial(
            self.reactor, self.target.host, self.target.port, wrapped, per_try, self.fast
        )
        if not factory.decided:
            factory.connector = connector
        if self.tls is not None or self.ready is not _handshake:
            # A TLS or WebSocket handshake follows the connect: bound the whole attempt.  Plain
            # TCP is ready at connect, which dial's own timeout already bounds.
            d.addTimeout(per_try, self.reactor)
        self._current = d
        d.addCallbacks(self._connected, self._failed)

    def _finish(self) -> Deferred[Any] | None:
        self._current = None
        result, self.result = self.result, None
        return result

    def _connected(self, upstream: Any) -> None:
        result = self._finish()
        if result is not None:
            result.callback(upstream)

    def _failed(self, f: Failure) -> None:
        self._current = None
        if self.result is None:
            return  # cancelled
        remaining = self.deadline - self.reactor.seconds()
        if self._delays is None:
            self._delays = jittered_backoff(0.1, 1.0)
            next(self._delays)  # the first attempt was immediate
        delay = next(self._delays)
        retryable = f.check(error.ConnectionRefusedError, error.TimeoutError, TimeoutError)
        if self.retry and retryable and remaining > delay:
            self._current = self.reactor.callLater(delay, self._attempt)
            return
        result = self._finish()
        assert result is not None
        if f.check(Refused):
            result.errback(f)
            return
        where = f"{self.target.host}:{self.target.port}"
        if f.check(error.ConnectError) and f.value.osError in OUT_OF_DESCRIPTORS:
            _log.warn("no file descriptor left to connect to {where} ({error}): this process's"
                      " descriptor limit, not the VM, refused the connection",
                      event="upstream_no_descriptor",
                      where=where, error=f.getErrorMessage())
            result.errback(Refused(Refusal.AT_CAPACITY, f"{where}: {f.getErrorMessage()}"))
            return
        result.errback(Refused(Refusal.VM_UNREACHABLE, f"{where}: {f.getErrorMessage()}"))

    def _cancel(self, _: Deferred[Any]) -> None:
        pending = self._current
        self._finish()
        if isinstance(pending, Deferred) or (pending is not None and pending.active()):
            pending.cancel()


def connect_tcp(
    reactor: IConnectingReactor,
    target: Target,
    timeout: float,
    retry: bool = False,
    make_protocol: Callable[[], Any] | None = None,
    ready: Callable[[Any], Any] | None = None,
    tls: Any = None,
    fast: bool = True,
) -> Deferred[Any]:
    """Open a TCP connection to the target within ``timeout`` seconds.

    ``make_protocol`` builds the protocol for each attempt, and ``ready`` turns a connected one
    into the peer (or a Deferred of it): the TLS or WebSocket upstream waits for its handshake.

    With ``retry``, a VM that refuses (still booting) is tried again with capped backoff until
    the time is up.  Failures become :class:`Refused` (4502).  Cancelling stops everything.
    ``fast = False`` (``[novnc] fast_path = off``) connects with ``reactor.connectTCP`` and
    writes with ``transport.write``.
    """
    return _Connect(
        reactor,
        target,
        reactor.seconds() + timeout,
        retry,
        make_protocol or (lambda: (TCPUpstream if fast else StockTCPUpstream)(tls is not None)),
        ready or _handshake,
        tls,
        fast,
    ).start()


def _handshake(protocol: TCPUpstream) -> Deferred[TCPUpstream]:
    return protocol.handshake


class WebSocketUpstream(WebSocketClientProtocol):
    """The VM side of a relay over a WebSocket to a websockify on the VM.

    Whoever runs that websockify is a peer like a browser: Autobahn answers its pings, so one
    that pings and never reads would grow our write buffer to it without end.  From the open on
    its socket has a flow (relay/flow.py), as the browser's does: reading from the VM pauses
    while that buffer is full (and the browser with it), while the browser cannot take more,
    and until the relay starts; a VM that takes no byte of a full buffer for ``write_timeout``
    is dropped (the browser gets 4502).
    """

    # A connected TCP (or TLS) transport: ITCPTransport and IPushProducer, which typing
    # cannot join.
    transport: Any
    relay: Relay | None = None
    _flow: ConnectionFlow | None = None
    #: Set by connect_websocket: the clock, the write timeout, and whom the log names.
    clock: IReactorTime | None = None
    write_timeout: float = 0
    target: Target | None = None
    kind = UPSTREAM_WEBSOCKET
    #: How the proxy logged in to the VM (twisted_novnc.vnc.login), when it did.
    login: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[WebSocketUpstream] = Deferred()
        self._held: list[bytes] = []

    def onOpen(self) -> None:
        assert self.clock is not None
        self._flow = ConnectionFlow(self.transport, self.clock, self.write_timeout, self)
        self._flow.start()
        # Like the TCP upstream: nothing is read until the browser's side is open too.
        self._flow.pause_reading(NOT_RELAYING)
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay is None:
            self._held.append(payload)  # parsed with the 101, before attach
        else:
            self.relay.from_vm(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(
                Refused(Refusal.VM_UNREACHABLE, f"upstream WebSocket handshake failed: {reason}")
            )
        elif self.relay is not None:
            self.relay.vm_gone(clean=wasClean and code in (1000, 1001, None))

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._flow is not None:
            self._flow.connection_lost()
        super().connectionLost(reason)
        self._flow = None  # it holds this protocol

    # Peer (producer and consumer: the flow's, see relay/flow.py)
    @property
    def producer(self) -> Any:
        """Reading from the VM, which the browser's side pauses for a reason of its own:
        this protocol's pauseProducing and resumeProducing below."""
        return self if self._flow is not None else self.transport

    @property
    def consumer(self) -> Any:
        """The VM's output, which pauses the browser's producer while it is full."""
        return self._flow if self._flow is not None else self.transport

    def pauseProducing(self) -> None:
        if self._flow is not None:
            self._flow.pause_reading(PEER_FULL)

    def resumeProducing(self) -> None:
        if self._flow is not None:
            self._flow.resume_reading(PEER_FULL)

    def stopProducing(self) -> None:
        if self._flow is not None:
            self._flow.peer_stopped()
        else:
            self.transport.stopProducing()

    def send(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            # The browser's bytes may come as a bytearray (unmasked in place).
            self.sendMessage(data if type(data) is bytes else bytes(data), isBinary=True)

    def close(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, reason[:100])
        else:
            if self._flow is not None:
                self._flow.closing()  # a transport with a producer would not close
            self.transport.loseConnection()

    def unmovable(self) -> str | None:
        """Why this side cannot move to another process now (None: it can): under TLS, not
        open, or in the middle of a frame or a message from the VM."""
        if not is_plain_tcp(self.transport):
            return "TLS to the VM"
        if self.state != self.STATE_OPEN:
            return "the VM's WebSocket is closing"
        between, inside, _ = autobahn_position(self)
        if not between or inside:
            return "the VM is in the middle of a message"
        return None

    def unread(self) -> bytes:
        """The VM's bytes read and not parsed yet (at most part of a frame header)."""
        return autobahn_position(self)[2]

    def detach(self, unread: bytes) -> None:
        """Stop delivering to a login (twisted_novnc.vnc.login): reading pauses until the relay
        is attached, and ``unread`` goes to it first."""
        self.relay = None
        if unread:
            self._held.insert(0, unread)
        if self._flow is not None:
            self._flow.pause_reading(NOT_RELAYING)

    def attach(self, relay: Relay) -> None:
        self.relay = relay
        held, self._held = self._held, []
        for payload in held:
            relay.from_vm(payload)
        if self._flow is not None:
            self._flow.resume_reading(NOT_RELAYING)

    # -- the end ---------------------------------------------------------------------------------

    def unregisterProducer(self) -> None:
        """Autobahn unregisters the transport's producer as it drops the connection: that is
        the flow's from the open on, detached once (and its flush watched)."""
        if self._flow is not None:
            self._flow.closing()
        else:
            super().unregisterProducer()

    def write_stalled(self, pending: int | None) -> None:
        """The VM took nothing of a full write buffer for write_timeout: drop it (the browser
        gets 4502, as for any VM connection lost)."""
        target = self.target
        _log.info(
            "dropping the VM of {session_id} at {vm}: took no byte in {timeout}s"
            " ({pending} bytes pending)", event="vm_write_timeout",
            session_id=target.session_id if target is not None else "?",
            vm=f"{target.host}:{target.port}" if target is not None else "?",
            timeout=self.write_timeout,
            pending="unknown" if pending is None else pending,
        )
        self.transport.abortConnection()


def connect_websocket(
    reactor: IConnectingReactor,
    target: Target,
    timeout: float,
    suffix: str,
    query: str,
    retry: bool = False,
    max_message_size: int = 1024 * 1024,
    tls: Any = None,
    fast: bool = True,
    write_timeout: float = 0,
) -> Deferred[WebSocketUpstream]:
    """Open ``ws(s)://host:port/<suffix>?<query>`` offering ``binary``; 4502 on failure.

    The reactor is the clock of the VM socket's flow; a VM that takes no byte of a full
    write buffer for ``write_timeout`` seconds is dropped (0: never)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    scheme = "wss" if tls is not None else "ws"
    url = f"{scheme}://{host}:{target.port}/{suffix}" + (f"?{query}" if query else "")
    factory = websocket_client_factory(url, max_message_size)

    def make_protocol() -> WebSocketUpstream:
        protocol = cast(WebSocketUpstream, factory.buildProtocol(None))
        protocol.clock = reactor
        protocol.write_timeout = write_timeout
        protocol.target = target
        return protocol

    return connect_tcp(
        reactor, target, timeout, retry,
        make_protocol=make_protocol,
        ready=lambda protocol: protocol.opened,
        tls=tls,
        fast=fast,
    )


def websocket_client_factory(url: str, max_message_size: int) -> WebSocketClientFactory:
    """The Autobahn client factory of one VM-side WebSocket, offering ``binary``."""
    factory = WebSocketClientFactory(url, protocols=["binary"])
    factory.protocol = WebSocketUpstream
    factory.setProtocolOptions(
        openHandshakeTimeout=0,  # bounded by our own deadline
        maxFramePayloadSize=16 * max_message_size,
        maxMessagePayloadSize=16 * max_message_size,
        failByDrop=False,
        perMessageCompressionOffers=[],
    )
    factory.noisy = False
    return factory


def adopt_upstream(
    kind: str,
    sock: socket.socket,
    target: Target,
    reactor: ISocketReactor,
    fast: bool = True,
    max_message_size: int = 1024 * 1024,
    write_timeout: float = 0,
) -> TCPUpstream | WebSocketUpstream:
    """The VM side of a relay moved here from another process, on its connected socket:
    raw TCP, or an open WebSocket to the VM's websockify (no new handshake).  ValueError
    for a kind this version does not know."""
    transport_class = RelayTransport if fast else TCPServerTransport
    if kind == UPSTREAM_TCP:
        tcp_side = (TCPUpstream if fast else StockTCPUpstream)(False)
        transport = adopt_connected_socket(
            transport_class, sock, tcp_side, target.host, target.port, reactor
        )
        tcp_side.makeConnection(transport)
        return tcp_side
    if kind != UPSTREAM_WEBSOCKET:
        raise ValueError(f"an upstream of kind {kind!r}")
    host = f"[{target.host}]" if ":" in target.host else target.host
    factory = websocket_client_factory(f"ws://{host}:{target.port}/", max_message_size)
    ws_side = cast(WebSocketUpstream, factory.buildProtocol(None))
    ws_side.clock = reactor
    ws_side.write_timeout = write_timeout
    ws_side.target = target
    transport = adopt_connected_socket(
        transport_class, sock, ws_side, target.host, target.port, reactor
    )
    open_adopted(ws_side, transport, "binary", server=False)
    tune_tcp(transport)
    ws_side.onOpen()
    return ws_side


def upstream_connector(
    settings: UpstreamSettings,
    reactor: IConnectingReactor,
    max_message_size: int,
    fast: bool = True,
    write_timeout: float = 0,
) -> Callable[[Target, float, str, str], Deferred[Any]]:
    """The connector the request path calls, as ``[upstream]`` chooses it: raw TCP or a
    WebSocket to a websockify on the VM, each over TLS or not, to the row's port or to
    ``[upstream] port``.  ``[upstream] ca_file`` is read once, here.  ``write_timeout``
    (``[novnc] write_timeout``) drops a websockify that takes no byte of a full buffer."""
    trust = tls_trust(settings.tls, settings.ca_file)

    def connect(target: Target, timeout: float, suffix: str, query: str) -> Deferred[Any]:
        if settings.port:
            target = attrs.evolve(target, port=settings.port)
        tls = tls_options(settings.tls, trust, target.host)
        if settings.mode == "websocket":
            return connect_websocket(
                reactor, target, timeout, suffix, query, retry=settings.connect_retry,
                max_message_size=max_message_size, tls=tls, fast=fast,
                write_timeout=write_timeout,
            )
        return connect_tcp(
            reactor, target, timeout, retry=settings.connect_retry, tls=tls, fast=fast
        )

    return connect
