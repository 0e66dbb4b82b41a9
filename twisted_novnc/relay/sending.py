"""Writing relayed bytes to a socket now, not on the reactor's next turn.

Twisted's TCP transport only queues a ``write``: the bytes go out one reactor turn later, after
two ``epoll_ctl`` calls and a copy that joins the queued writes.  On the relay that is a loop
turn of latency per message and a good share of the CPU (bench/README.md, "Profiles").

:func:`send_now` sends at once with one ``sendmsg`` when nothing is queued, and leaves only what
the kernel did not take to the transport's own buffer; :func:`close_now` sends the FIN at once.
Both read Twisted's transport internals, so they live in :mod:`twisted_novnc._compat.twisted`
(with their canaries); transports that are not plain TCP (TLS, wrappers) simply get ``write``
and ``loseConnection``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

from twisted_novnc._compat.twisted import TCPServerTransport, close_now, send_now

__all__ = ["RELAY_BUFFER_SIZE", "RelayTransport", "close_now", "send_now", "tune_relay_transport"]

#: Bytes per read and the size of the write buffer above which the other side is paused.
#: Twisted's default of 64 KiB costs a read, a frame and a write per 64 KiB.
RELAY_BUFFER_SIZE = 256 * 1024


class RelayTransport(TCPServerTransport):
    """Twisted's TCP connection with the relay's buffer sizes as class attributes.

    Set per instance (``tune_relay_transport``), the two sizes grow each transport's
    ``__dict__`` past a resize: about 400 bytes a socket, 0.8 KB a relay.  The listeners
    accept into this class and the VM side is connected as it (``SocketConnector``).
    """

    bufferSize = RELAY_BUFFER_SIZE
    SEND_LIMIT = RELAY_BUFFER_SIZE


def tune_relay_transport(transport: Any) -> None:
    """Bigger reads and writes for a transport that relays bulk data."""
    if isinstance(transport, tcp.Connection) and transport.bufferSize != RELAY_BUFFER_SIZE:
        transport.bufferSize = RELAY_BUFFER_SIZE
        transport.SEND_LIMIT = RELAY_BUFFER_SIZE
