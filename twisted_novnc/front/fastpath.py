"""The fast path's framing: browser frames relayed chunk by chunk, without any I/O.

Autobahn buffers each browser message whole and copies it several times before ``onMessage``
(bench/README.md, "Profiles"); noVNC's messages are a byte stream to the VM, so the fast path
unmasks each part of a binary frame as it is read (one copy) and hands it on at once.

:class:`BrowserFrames` is that parser as a plain object, in the style of txtorcon's
``_SocksMachine``: it is fed bytes, passes on unmasked payload chunks, and says where a frame
begins that it does not take (a control frame, text, anything Autobahn must refuse), so that
Autobahn's own parser takes over from there with the same state (an open message, size limits,
ping timeouts).  It knows nothing of sockets or of Autobahn: three calls of
:class:`FrameEvents` are all it asks of its owner
(:class:`twisted_novnc._compat.autobahn.AutobahnFastPath` translates them to Autobahn's state).

Every byte it is fed passes through one loop: one call per chunk to unmask it, one to deliver it,
and per frame one header parse and one ``frame_ended``.  It is the relay's hot path: keep it so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs

from twisted_novnc.front.frames import (
    OPCODE_BINARY,
    OPCODE_CONTINUATION,
    Unmasker,
    minimal_length,
    parse_client_header,
)


class FrameEvents(Protocol):
    """What the parser tells its owner, besides the chunks it delivers."""

    def message_begun(self) -> None:
        """A binary message began on the fast path: the connection's message state must say so
        (a frame of another message before it ends is a protocol error)."""

    def frame_ended(self, fin: bool) -> bool:
        """A relayed frame's payload is complete (``fin``: and its message).  True to go on
        parsing; False to hand whatever follows to the other parser (the connection is closing)."""

    def message_too_big(self, size: int, limit: int) -> None:
        """A message grew past the limit: the connection must be failed (1009)."""


@attrs.frozen
class FramePosition:
    """Where a :class:`BrowserFrames` stands between two reads, to go on in another process:
    the frame being relayed (payload bytes left, its mask from the next byte on, whether it
    ends its message), the binary message it belongs to, and a header cut by the last read."""

    frame_left: int = 0
    mask: bytes = b""
    fin: bool = False
    in_message: bool = False
    message_size: int = 0
    held: bytes = b""


class BrowserFrames:
    """Masked binary frames from a browser in, their unmasked payloads out, chunk by chunk.

    :meth:`feed` takes the bytes as they are read.  It returns None when it took them all (a
    header cut by the read is held until the rest arrives), or the bytes from the first frame
    it does not take: the other parser's, along with everything after.  ``inside_message`` is
    the connection's own message state as the other parser left it (a text message it is
    assembling, or a binary one begun here).
    """

    __slots__ = (
        "_deliver",
        "_events",
        "_fin",
        "_held",
        "_in_message",
        "_limit",
        "_message_size",
        "_unmasker",
        "frame_left",
    )

    def __init__(
        self, deliver: Callable[[bytearray], object], events: FrameEvents, limit: int
    ) -> None:
        self._deliver = deliver
        self._events = events
        #: The largest message, in bytes (0: no limit).
        self._limit = limit
        #: Payload bytes of the current frame not read yet: a frame is being relayed.
        self.frame_left = 0
        self._fin = False
        self._unmasker: Unmasker | None = None
        #: A binary message begun here and not finished (its continuations are ours too).
        self._in_message = False
        self._message_size = 0
        self._held = b""

    def position(self) -> FramePosition:
        """Where the parser stands now (see :class:`FramePosition`)."""
        unmasker = self._unmasker
        return FramePosition(
            self.frame_left,
            unmasker.mask_from_here() if unmasker is not None else b"",
            self._fin,
            self._in_message,
            self._message_size,
            self._held,
        )

    def resume(self, position: FramePosition) -> None:
        """Go on from where another process's parser stopped."""
        self.frame_left = position.frame_left
        self._unmasker = Unmasker(position.mask) if position.frame_left else None
        self._fin = position.fin
        self._in_message = position.in_message
        self._message_size = position.message_size
        self._held = position.held

    def take_held(self) -> bytes:
        """The start of a header held until more arrives, for the other parser to take."""
        held, self._held = self._held, b""
        return held

    def feed(self, data: bytes, inside_message: bool) -> bytes | None:
        """Relay what ``data`` holds; None, or the bytes the other parser must take."""
        if self._held:
            data = self._held + data
            self._held = b""
        events = self._events
        deliver = self._deliver
        pos, end = 0, len(data)
        view = memoryview(data)
        try:
            while True:
                left = self.frame_left
                if left:
                    n = end - pos
                    if not n:
                        return None
                    if n > left:
                        n = left
                    assert self._unmasker is not None
                    chunk = self._unmasker.unmask(view[pos : pos + n])
                    pos += n
                    left -= n
                    self.frame_left = left
                    deliver(chunk)
                    if not left:
                        self._unmasker = None
                        if self._fin:
                            self._in_message = inside_message = False
                        if not events.frame_ended(self._fin):
                            return data[pos:]
                    continue
                if pos == end:
                    return None
                header = parse_client_header(data, pos)
                if header is None:
                    self._held = data[pos:]
                    return None
                opcode = header.opcode
                if (
                    header.rsv
                    or not header.masked
                    or not minimal_length(header)
                    or not (
                        (opcode == OPCODE_BINARY and not inside_message)
                        or (opcode == OPCODE_CONTINUATION and inside_message and self._in_message)
                    )
                ):
                    return data[pos:]
                pos += header.size
                length = header.length
                if opcode == OPCODE_BINARY:
                    self._in_message = inside_message = True
                    self._message_size = length
                    events.message_begun()
                else:
                    self._message_size += length
                if 0 < self._limit < self._message_size:
                    events.message_too_big(self._message_size, self._limit)
                    return None  # the connection is failed: nothing more is read here
                self._fin = header.fin
                if length:
                    self.frame_left = length
                    self._unmasker = Unmasker(header.mask)
                    continue
                if header.fin:
                    self._in_message = inside_message = False
                if not events.frame_ended(header.fin):
                    return data[pos:]
        finally:
            view.release()
