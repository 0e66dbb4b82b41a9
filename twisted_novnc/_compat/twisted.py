"""Twisted's internals the daemon relies on, each behind one named function or class.

Each one is here because it buys something measured (bench/README.md) or something Twisted has
no public way to do; each has a canary in ``tests/compat/test_twisted_internals.py`` that names
it and the installed Twisted when a release changes it; where Twisted has a public way, the
function falls back to it.

- writing to a TCP socket at once (:func:`send_now`, :func:`close_now`), and how much is
  still to write (:func:`pending_bytes`, for the write timeout): a transport's write buffer
  (``_tempDataLen``, ``dataBuffer``, ``offset``) and ``_writeDisconnected``;
- transports of our own class (:class:`TCPServerTransport`, :func:`adopt_connected_socket`,
  :func:`accept_into`): ``tcp.Server``'s constructor and a port's ``transport`` class;
- listening services (:func:`when_listening`, :func:`raise_listen_errors`):
  ``StreamServerEndpointService``'s ``_waitingForPort`` and ``_raiseSynchronously``;
- listening sockets shared by worker processes (:func:`keep_socket_open_on_close`,
  :func:`adopt_shared_port`): a port's ``_shouldShutdown``, ``_bindPath``,
  ``_fromListeningDescriptor`` and accept loop (``numberAccepts``);
- the log (:func:`log_observers`, :func:`is_twistd_text_observer`): the global publisher's
  ``_observers`` and the shape of twistd's text observer;
- relays moved to another process (:func:`take_unsent`, :func:`is_plain_tcp`): the same write
  buffer, taken out of a transport whose socket is handed on;
- small ones (:func:`endpoint_port`, :func:`read_pipe`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import stat
from typing import Any, Protocol, TypeGuard

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import abstract, process, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IReactorFDSet
from twisted.logger import FileLogObserver, ILogObserver, Logger, LogPublisher, timeFormatRFC3339
from twisted.python.failure import Failure

from twisted_novnc.reactors import IDaemonReactor

_log = Logger()

# -- Writing to a TCP socket now ------------------------------------------------------------
#
# Twisted's TCP transport only queues a ``write``: the bytes go out in ``doWrite`` one reactor
# turn later, after an ``epoll_ctl`` to watch for writability and another to stop, and several
# writes are joined into one buffer first (a copy).  On the relay that is a loop turn of latency
# per message and a good share of the CPU (bench/README.md, "Profiles").

#: Transport classes whose buffer and socket are known here: send_now and close_now write to
#: their socket directly.  Any other transport (TLS, a wrapper, a test double) gets ``write``.
_DIRECT: set[type] = {tcp.Server, tcp.Client}

#: The attributes of Twisted's ``FileDescriptor`` that :func:`_writes_through` reads.
TRANSPORT_INTERNALS = (
    "_tempDataLen", "_tempDataBuffer", "dataBuffer", "offset", "_writeDisconnected"
)


class TCPServerTransport(tcp.Server):
    """Twisted's TCP connection, as a base for a class that only sets class attributes.

    Subclasses (the relay's ``RelayTransport``: bigger buffers, set once on the class rather
    than per instance) are written to directly like ``tcp.Server``.  The repr works without
    a listening port (Twisted's ``repstr`` is set only when there is one).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _DIRECT:  # empty once check_transport_internals has turned direct writes off
            _DIRECT.add(cls)

    def __repr__(self) -> str:
        repstr = self.__dict__.get("repstr")
        if repstr is not None:
            return repstr
        return f"<{type(self.protocol).__name__} to {self.client[0]}:{self.client[1]}>"


_DIRECT.add(TCPServerTransport)


def _writes_through(transport: Any) -> bool:
    """A plain TCP transport, open, with nothing queued: its socket may be written directly."""
    return (
        type(transport) in _DIRECT
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    )


def send_now(transport: Any, header: bytes, payload: Any) -> None:
    """Write ``header`` then ``payload`` (bytes or a bytearray); ``header`` may be empty.

    One ``sendmsg`` (header and payload gathered by the kernel, not joined) when nothing is
    queued; only what the kernel did not take goes to the transport's own buffer, so ordering,
    back-pressure (``bufferSize`` and the registered producer) stay Twisted's; a send that
    fails aborts the connection (a lost one, as when Twisted's own send fails).  Any other
    transport, or one with bytes queued: ``write``.
    """
    if not _writes_through(transport):
        _queue(transport, header, payload)
        return
    try:
        if header:
            sent = transport.socket.sendmsg((header, payload))
        else:
            sent = transport.socket.send(payload)
    except BlockingIOError:
        sent = 0
    except OSError:
        # The peer is gone (reset, broken pipe).  The kernel reports a reset once, and this
        # send took it: the transport's next read would find only an end of file and close
        # as cleanly as a FIN (a VM's reset read as its clean close, 1000 instead of 4502).
        # Abort, as Twisted ends a connection whose own send fails: ConnectionLost.
        transport.abortConnection()
        return
    if sent < len(header):
        _queue(transport, header[sent:], payload)
    else:
        sent -= len(header)
        if sent < len(payload):
            transport.write(bytes(memoryview(payload)[sent:]))


def close_now(transport: Any) -> None:
    """``loseConnection``, with the FIN sent at once when nothing is left to write.

    Twisted closes on its next turn (``doWrite`` finds the buffer empty), so a browser that
    waits for the server's FIN after the closing handshake, as RFC 6455 has it, waits for
    whatever else that turn does.  Here the write side is shut now and marked so, as Twisted's
    own ``loseWriteConnection`` leaves it (``_writeDisconnected``: later writes are dropped, no
    empty send fails with EPIPE), and the rest of the close (``connectionLost``, a clean
    ConnectionDone) follows on the next turn, out of the caller's stack.  Under TLS, or with
    bytes still queued, it is just ``loseConnection``: those must go first.
    """
    if not _writes_through(transport):
        transport.loseConnection()
        return
    try:
        transport.socket.shutdown(socket.SHUT_WR)
    except OSError:
        transport.loseConnection()  # the peer is gone already: Twisted finds out as usual
        return
    transport._writeDisconnected = True
    transport.stopReading()
    transport.reactor.callLater(0, transport.loseConnection)


def pending_bytes(transport: Any) -> int | None:
    """Bytes written to a plain TCP transport that the kernel has not taken yet (the same
    internals as :func:`send_now`); None for any other transport, which cannot tell."""
    if type(transport) not in _DIRECT or transport.TLS:
        return None
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def is_plain_tcp(transport: Any) -> bool:
    """A plain TCP transport (no TLS, no wrapper) whose buffer is known here: its socket and
    what it still has to write can be handed to another process (processes/upgrade.py)."""
    return (
        type(transport) in _DIRECT
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
    )


def start_tls_client(transport: Any, creator: Any) -> None:
    """Start TLS on a connected TCP transport, as the client, whichever way it was connected:
    ``ITLSTransport.startTLS`` goes "the transport's own way" with ``normal``, and the relay's
    VM sockets are connected by hand and adopted as ``tcp.Server`` (:class:`SocketConnector`)."""
    transport.startTLS(creator, not isinstance(transport, tcp.Server))


def take_unsent(transport: Any) -> bytes:
    """What a plain TCP transport was given to write and the kernel has not taken, removed
    from the transport (its ``dataBuffer`` from ``offset``, then ``_tempDataBuffer``): the
    process that adopts the socket writes it first.  Only for :func:`is_plain_tcp` transports."""
    unsent = bytes(transport.dataBuffer[transport.offset:]) + b"".join(
        bytes(part) for part in transport._tempDataBuffer
    )
    transport.dataBuffer = b""
    transport.offset = 0
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return unsent


def _queue(transport: Any, header: bytes, payload: Any) -> None:
    if header:
        transport.write(header)
    transport.write(payload if type(payload) is bytes else bytes(payload))


class _NoReactor:
    """Enough of a reactor for a ``FileDescriptor`` that is only looked at."""


def check_transport_internals() -> list[str]:
    """At start: the transport internals :func:`send_now` reads that this Twisted lacks.

    When any is missing, direct writes are turned off for the life of the process (every
    transport gets ``write`` and ``loseConnection``: correct, slower) and the log says so.
    """
    probe = abstract.FileDescriptor(_NoReactor())  # type: ignore[arg-type]
    missing = [name for name in TRANSPORT_INTERNALS if not hasattr(probe, name)]
    if missing:
        _DIRECT.clear()
        from twisted import __version__

        _log.warn(
            "Twisted {version}: a transport has no {missing}: relaying through"
            " transport.write instead of writing to sockets directly (slower; see"
            " docs/installing.rst, 'Private internals')", event="direct_writes_off",
            version=__version__, missing=", ".join(missing),
        )
    return missing


# -- Transports of our own class ------------------------------------------------------------

_sessions = itertools.count()


def adopt_connected_socket(
    transport_class: type[tcp.Server],
    sock: socket.socket,
    protocol: IProtocol,
    host: str,
    port: int,
    reactor: IReactorFDSet,
) -> tcp.Server:
    """A transport of ``transport_class`` for a socket already connected to ``host:port``.

    As ``reactor.adoptStreamConnection`` makes one, but without its ``dup`` of the descriptor
    and its factory: the constructor Twisted documents as internal, ``(sock, protocol, peer,
    server port, session number, reactor)``, with no listening port (``None``, as Twisted's
    own adoption passes).  The public way, ``reactor.connectTCP``, is what a fake reactor gets.
    """
    # The peer as tcp.Server keeps it (a 4-tuple makes its addresses IPv6).
    peer = (host, port, 0, 0) if ":" in host else (host, port)
    return transport_class(
        sock, protocol, peer, None, next(_sessions), reactor  # type: ignore[arg-type]
    )


def accept_into(port: Any, transport_class: type[tcp.Server]) -> bool:
    """Have a listening TCP port accept into ``transport_class``; False if it is no such port.

    A ``tcp.Port`` builds each accepted connection as its ``transport`` class attribute says
    (undocumented).  Only a port that accepts into ``tcp.Server`` is changed (a ``unix.Port``
    is a ``tcp.Port`` too); any other keeps its transports, which the relay then tunes one by
    one (the public way).
    """
    if getattr(port, "transport", None) is not tcp.Server:
        return False
    port.transport = transport_class
    return True


# -- Listening services ---------------------------------------------------------------------

def when_listening(service: StreamServerEndpointService) -> Deferred[Any]:
    """The Deferred of the port a started ``StreamServerEndpointService`` listens on.

    Its ``_waitingForPort``: what it ``listen``-ed, which ``stopService`` later stops; a
    callback added here sees the port (None if listening failed) and must return it.
    """
    return service._waitingForPort


def raise_listen_errors(service: StreamServerEndpointService) -> None:
    """Have ``privilegedStartService`` raise when the port cannot listen, so twistd stops.

    ``_raiseSynchronously``, as Twisted's own ``strports.service`` sets it; without it a port
    that cannot listen is only logged and the daemon runs without it.
    """
    service._raiseSynchronously = True


# -- Listening sockets shared by worker processes -------------------------------------------

def keep_socket_open_on_close(port: Any) -> None:
    """Closing this port must not ``shutdown()`` its socket, which other processes share.

    A port's ``_shouldShutdown``, as Twisted sets it on the ports it adopts: a shut-down
    socket ends every copy's accepts at once (``accept()`` fails with EINVAL), mid-drain.
    """
    port._shouldShutdown = False


#: Connections a worker accepts per wake-up.  Twisted's ports accept up to 100 (and more
#: under load) each time the socket is readable: one worker would take a whole burst while the
#: others, woken for the same connections, find nothing left.
FAIR_ACCEPTS = 1


class _FairAccepts:
    """Caps Twisted's accept loop (``numberAccepts``, which it raises by 20 whenever the
    loop ran full) so that a burst of connections is spread over the workers."""

    _accepts = FAIR_ACCEPTS

    @property
    def numberAccepts(self) -> int:
        return self._accepts

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        self._accepts = max(1, min(value, FAIR_ACCEPTS))


class _SharedTCPPort(_FairAccepts, tcp.Port):
    """An adopted TCP socket, accepting its fair share."""


class _SharedUNIXPort(_FairAccepts, unix.Port):
    """An adopted UNIX socket that leaves the supervisor's socket alone, and accepts fairly.

    Twisted's own adopted UNIX port would, when it stops, shut the socket down (for every
    process sharing it) and unlink its file, and when it starts, chmod that file to 0666.
    """

    _shouldShutdown = False

    def startListening(self) -> None:
        with contextlib.suppress(OSError, TypeError, ValueError):
            self.mode = stat.S_IMODE(os.stat(self._bindPath).st_mode)
        super().startListening()

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


def adopt_shared_port(reactor: IDaemonReactor, fd: int, family: int, factory: Any) -> Any:
    """Listen on an inherited listening socket that other processes accept on too.

    TCP: the reactor's public ``adoptStreamPort``, then the port's class swapped for one whose
    accept loop takes its fair share (``numberAccepts``; a subclass that adds only that).
    UNIX: Twisted's private ``_fromListeningDescriptor`` into a port that, unlike Twisted's,
    neither chmods, shuts down nor unlinks the shared socket.  The descriptor is duplicated;
    the caller closes ``fd``.
    """
    if family == socket.AF_UNIX:
        port = _SharedUNIXPort._fromListeningDescriptor(reactor, fd, factory)
        port.startListening()
        return port
    port = reactor.adoptStreamPort(fd, socket.AddressFamily(family), factory)
    if type(port) is tcp.Port:
        port.__class__ = _SharedTCPPort
    return port


# -- The log --------------------------------------------------------------------------------

def log_observers(publisher: LogPublisher) -> list[ILogObserver]:
    """The observers a log publisher (twistd's global one) sends events to.

    Its ``_observers``: Twisted has no public way to list them, and the daemon must find
    twistd's to replace or speed them up.  Without it: none found (the log is written as
    twistd does, and ``[log]`` in another format is written besides twistd's).
    """
    return list(getattr(publisher, "_observers", []))


#: The closure ``textFileLogObserver`` (which twistd uses) formats each event with.
_TWISTD_FORMAT_EVENT = "textFileLogObserver.<locals>.formatEvent"


def is_twistd_text_observer(observer: object) -> TypeGuard[FileLogObserver]:
    """A ``FileLogObserver`` made by ``textFileLogObserver`` with the default time format.

    Told by its ``formatEvent``: the closure's qualified name and its one cell (the time
    format).  Such an observer writes ``formatEventAsClassicLogText`` with RFC 3339 times,
    which a faster formatter may replace byte for byte; any other observer is left alone.
    """
    if not isinstance(observer, FileLogObserver):
        return False
    format_event = observer.formatEvent
    if getattr(format_event, "__qualname__", "") != _TWISTD_FORMAT_EVENT:
        return False
    closure = getattr(format_event, "__closure__", None) or ()
    return [cell.cell_contents for cell in closure] == [timeFormatRFC3339]


# -- Small ones -----------------------------------------------------------------------------

def endpoint_port(endpoint: object) -> int | None:
    """The port number a parsed server endpoint (``tcp:70000``) will listen on, if known.

    Its ``_port``: Twisted parses any number and fails only when listening; reading it lets a
    config check say so at once.  None when the endpoint has none (the check is skipped).
    """
    port = getattr(endpoint, "_port", None)
    return port if isinstance(port, int) else None


class PipeReader(Protocol):
    """What :func:`read_pipe` feeds: the two child-pipe methods of a ``ProcessProtocol``."""

    def childDataReceived(self, name: str, data: bytes) -> None: ...

    def childConnectionLost(self, name: str, reason: Failure) -> None: ...


def read_pipe(reactor: IReactorFDSet, protocol: PipeReader, name: str, fd: int) -> Any:
    """Read an inherited pipe ``fd``: ``protocol.childDataReceived(name, data)`` per read and
    ``childConnectionLost(name, reason)`` at its end.

    Twisted's ``process.ProcessReader``, which ``spawnProcess`` uses for a child's pipes; the
    public ``stdio.StandardIO`` would also take over (and at the end close) standard output.
    """
    return process.ProcessReader(reactor, protocol, name, fd)
