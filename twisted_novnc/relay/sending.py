"""Writing relayed bytes to a socket now, not on the reactor's next turn.

Twisted's TCP transport only queues a ``write``: the bytes go out in ``doWrite`` one reactor
iteration later, after an ``epoll_ctl`` to watch for writability and another to stop, and
several writes are joined into one buffer first (a copy).  On the relay that is a loop turn of
latency per message and a good share of the CPU (bench/README.md, "Profiles").

:func:`send_now` sends at once with one ``sendmsg`` (header and payload gathered by the kernel,
not joined) when nothing is queued, and leaves only what the kernel did not take to the
transport's own buffer — so ordering, back-pressure (``bufferSize`` and the registered
producer) and error handling stay Twisted's.  Transports that are not plain TCP (TLS, wrappers)
simply get ``write``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

#: Bytes per read and the size of the write buffer above which the other side is paused.
#: Twisted's default of 64 KiB costs a read, a frame and a write per 64 KiB.
RELAY_BUFFER_SIZE = 256 * 1024

class RelayTransport(tcp.Server):
    """Twisted's TCP connection with the relay's buffer sizes as class attributes.

    Set per instance (``tune_relay_transport``), the two sizes grow each transport's
    ``__dict__`` past a resize: about 400 bytes a socket, 0.8 KB a relay.  The listeners
    accept into this class and the VM side is connected as it (``SocketConnector``).
    """

    bufferSize = RELAY_BUFFER_SIZE
    SEND_LIMIT = RELAY_BUFFER_SIZE

    def __repr__(self) -> str:
        repstr = self.__dict__.get("repstr")
        if repstr is not None:
            return repstr  # type: ignore[no-any-return]
        return f"<{type(self.protocol).__name__} to {self.client[0]}:{self.client[1]}>"


#: Transports whose buffer and socket we know: Twisted's TCP server and client connections.
_PLAIN_TCP = frozenset({tcp.Server, tcp.Client, RelayTransport})


def tune_relay_transport(transport: Any) -> None:
    """Bigger reads and writes for a transport that relays bulk data."""
    if isinstance(transport, tcp.Connection) and transport.bufferSize != RELAY_BUFFER_SIZE:
        transport.bufferSize = RELAY_BUFFER_SIZE
        transport.SEND_LIMIT = RELAY_BUFFER_SIZE


def _writes_through(transport: Any) -> bool:
    """A plain TCP transport, open, with nothing queued: its socket may be written directly."""
    return (
        type(transport) in _PLAIN_TCP
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    )


def send_now(transport: Any, header: bytes, payload: Any) -> None:
    """Write ``header`` then ``payload`` (bytes or a bytearray); ``header`` may be empty."""
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
        # Let the transport find the error itself when it tries, and close as usual.
        _queue(transport, header, payload)
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
    own ``loseWriteConnection`` leaves it (later writes are dropped, no empty send fails with
    EPIPE), and the rest of the close (``connectionLost``, a clean ConnectionDone) follows on
    the next turn, out of the caller's stack.  Under TLS, or with bytes still queued, it is
    just ``loseConnection``: those must go first.
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


def _queue(transport: Any, header: bytes, payload: Any) -> None:
    if header:
        transport.write(header)
    transport.write(payload if type(payload) is bytes else bytes(payload))

