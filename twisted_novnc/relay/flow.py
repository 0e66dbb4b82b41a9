"""Flow control of one relayed socket: what we read is bounded by what its peer reads.

Each side of a relay that speaks WebSocket (the browser's socket; the VM's in ``[upstream]
mode = websocket``) has a flow.  Reasons pause reading from its socket, and reading resumes only
once none holds:

- the relay's other end cannot take more (``PEER_FULL``: the other side's output is full);
- this socket's peer does not read what we send it (``OUTPUT_FULL``): its transport's write
  buffer passed ``bufferSize`` (the relay's threshold, ``RELAY_BUFFER_SIZE``, or Twisted's
  64 KiB on the stock path).  What we send is not only the relayed bytes but Autobahn's own
  replies, a pong per ping and a close reply, so a peer (a client, or whoever runs the VM's
  websockify) that sends pings and never reads would otherwise grow the buffer without end;
- the relay has not started (``NOT_RELAYING``: the VM's side, until the browser's is open).

:class:`ConnectionFlow` is registered as its transport's producer for the whole WebSocket
connection (before, during and after the relay): the transport pauses and resumes it as its
buffer fills and drains, and it passes that on to the other side's producer, which the relay
attaches to it as to a consumer.  While the buffer stays full it checks, once every
``write_timeout``, that the peer takes bytes at all; one that does not is reported stalled (and
dropped).  Everything here happens per buffer threshold or per timeout, never per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IPushProducer,
    IReactorTime,
)
from zope.interface import implementer

from twisted_novnc._compat.twisted import pending_bytes

#: The reasons reading is paused, as bits.
PEER_FULL = 1
OUTPUT_FULL = 2
NOT_RELAYING = 4


class FlowOwner(Protocol):
    """The connection a flow watches (the browser's protocol, or the VM's WebSocket)."""

    def write_stalled(self, pending: int | None) -> None:
        """The peer took no byte of a full write buffer for ``write_timeout``: drop it."""


@implementer(IPushProducer, IConsumer)
class ConnectionFlow:
    """A transport's producer (its output, watched) and the relay's consumer on that side.

    ``owner.write_stalled`` is called when the write buffer stayed full for ``write_timeout``
    seconds without the peer taking a byte (0: never).  ``pending`` says how many bytes a
    transport holds (None when it cannot tell: then a buffer still full after
    ``write_timeout`` counts as stalled).  The relay's other side pauses reading through the
    owner, which calls :meth:`pause_reading` / :meth:`resume_reading` with ``PEER_FULL``
    (no object of its own: a flow is per connection, and kept small).
    """

    __slots__ = (
        "_clock",
        "_last_pending",
        "_owner",
        "_paused",
        "_peer",
        "_pending",
        "_registered",
        "_timer",
        "_write_timeout",
        "transport",
    )

    def __init__(
        self,
        transport: Any,
        clock: IReactorTime,
        write_timeout: float,
        owner: FlowOwner,
        pending: Callable[[Any], int | None] = pending_bytes,
    ) -> None:
        self.transport = transport
        self._clock = clock
        self._write_timeout = write_timeout
        self._owner = owner
        self._pending = pending
        #: The reasons reading is paused (PEER_FULL | OUTPUT_FULL | NOT_RELAYING).
        self._paused = 0
        #: The producer the relay attached (the other side's), paused while the output is full.
        self._peer: IPushProducer | None = None
        self._registered = False
        self._timer: IDelayedCall | None = None
        self._last_pending: int | None = None

    def start(self) -> None:
        """Watch the transport's write buffer from now on."""
        self.transport.registerProducer(self, True)
        self._registered = True

    def detach(self) -> None:
        """Stop being the transport's producer: a transport with a producer registered does not
        close after its last write (Twisted's ``loseConnection``), so this comes first.  The
        write timer, if running, goes on: the last bytes must still be taken."""
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def closing(self) -> None:
        """The connection is being closed after a flush: detach, and have the flush watched."""
        self.detach()
        if self._write_timeout and self._timer is None:
            pending = self._pending(self.transport)
            if pending != 0:  # nothing left to write: the close follows at once
                self._arm(pending)

    def peer_stopped(self) -> None:
        """The other side's socket is gone: this one goes too, as its transport did when it
        was the other side's producer (detached first, or it would not close)."""
        self.detach()
        self.transport.stopProducing()

    def connection_lost(self) -> None:
        """Nothing more to watch or pause."""
        self._registered = False
        self._peer = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # -- reading, paused while any reason holds ------------------------------------------------

    def pause_reading(self, reason: int) -> None:
        if not self._paused:
            self.transport.pauseProducing()
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused:
                self.transport.resumeProducing()

    # -- IPushProducer: the transport's write buffer ---------------------------------------

    def pauseProducing(self) -> None:
        """The write buffer passed its bound: read nothing more (no more replies to queue), let
        the other side send nothing more, and see that the peer takes what is queued."""
        if self._paused & OUTPUT_FULL:
            return
        self.pause_reading(OUTPUT_FULL)
        if self._peer is not None:
            self._peer.pauseProducing()
        if self._write_timeout and self._timer is None:
            self._arm(self._pending(self.transport))

    def resumeProducing(self) -> None:
        """The write buffer is empty again."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._paused & OUTPUT_FULL:
            return
        if self._peer is not None:
            self._peer.resumeProducing()
        self.resume_reading(OUTPUT_FULL)

    def stopProducing(self) -> None:
        """This socket is gone: so is the other side's (as the relay had it)."""
        peer = self._peer
        self._registered = False
        self.connection_lost()
        if peer is not None:
            peer.stopProducing()

    # -- IConsumer: where the relay registers the other side's producer --------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        # The relay registers push producers only (a transport, or a protocol over a flow).
        self._peer = peer = cast(IPushProducer, producer)
        if self._paused & OUTPUT_FULL:
            peer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._peer = None

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    # -- the write timeout -------------------------------------------------------------------

    def _arm(self, pending: int | None) -> None:
        self._last_pending = pending
        self._timer = self._clock.callLater(self._write_timeout, self._check_progress)

    def _check_progress(self) -> None:
        """One write_timeout after the buffer filled (or the last progress): taken any?"""
        self._timer = None
        pending = self._pending(self.transport)
        if pending == 0:
            return  # all taken; a new fill arms again
        last = self._last_pending
        if pending is not None and last is not None and pending < last:
            self._arm(pending)
            return
        self._owner.write_stalled(pending)
