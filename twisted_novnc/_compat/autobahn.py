"""Every private hook and attribute of Autobahn's WebSocket protocol the fast path uses.

:class:`AutobahnFastPath` is a mixin for a server protocol built on Autobahn's
``WebSocketServerProtocol``.  It overrides Autobahn's private methods and reads and sets
Autobahn's internal state, and turns each into a call of a public method of the class it is
mixed into, so that only this module knows how Autobahn works inside:

- ``processData`` (Autobahn's frame parser), and ``dataReceived`` while relaying: the bytes go
  to the fast path's frame parser (``self.frames.feed``); a frame it does not take, and what
  follows, goes back to Autobahn's parser (``consumeData``);
- ``_dataReceived`` (Autobahn's entry point without a debug line per read):
  ``websocket_data(data)``, which the stock class implements with Autobahn's public
  ``dataReceived``;
- ``sendData`` (Autobahn's own writes: the 101, close frames, pings): ``write_now(data)``;
- ``_closeConnection``: ``close_transport(abort)``;
- ``_connectionMade``: the same, with the options' ``pformat`` lazy, and no send queue or
  UTF-8 validator kept per connection;
- ``inside_message``, ``message_*``, ``_isMessageCompressed``, ``_max_message_size_exceeded``
  and ``_cancelAutoPingTimeoutCall``: what the frame parser reports
  (:class:`~twisted_novnc.front.fastpath.FrameEvents`: ``message_begun``, ``frame_ended``,
  ``message_too_big``);
- ``_wskey`` and the parsed request: ``forget_handshake()``;
- for a relay moved from another process: where the reader stands (``current_frame``,
  ``inside_message``, ``data``: :func:`autobahn_position`) and an open connection made without
  a handshake (:func:`open_adopted`: ``_connectionMade`` of the base class, ``state``, the
  auto-ping timer, ``_transport_details``).

The class mixed into is :class:`twisted_novnc.front.protocol.FastNoVNCServerProtocol`; with
``[novnc] fast_path = off`` none of this is used.  tests/test_compat_autobahn.py has a canary
for each internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import txaio
from autobahn.twisted.util import create_transport_details
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import WebSocketProtocol

from twisted_novnc._compat.lazydebug import lazy_pformat

_OPEN = WebSocketProtocol.STATE_OPEN


class FrameFeeder(Protocol):
    """The fast path's frame parser, as this mixin drives it (front/fastpath.py)."""

    frame_left: int

    def feed(self, data: bytes, inside_message: bool) -> bytes | None: ...

    def take_held(self) -> bytes: ...


class _NoSendQueue:
    """Stands in for Autobahn's per-connection send queue (a deque), which only chopped or
    synchronous sends use; nothing here sends either way."""

    def __len__(self) -> int:
        return 0

    def append(self, item: object) -> None:
        raise RuntimeError("twisted_novnc never sends chopped or synchronous frames")


_NO_SEND_QUEUE = _NoSendQueue()

# To the type checker the mixin is the protocol it is mixed into, whose attributes it uses.
if TYPE_CHECKING:
    _Base = WebSocketServerProtocol
else:
    _Base = object


class AutobahnFastPath(_Base):
    """Mixed in before the protocol class: Autobahn's private hooks, as our public calls.

    The class it is mixed into provides ``write_now(data)``, ``close_transport(abort)`` and
    ``websocket_data(data)``, and sets ``frames`` (a :class:`FrameFeeder`) once the relay is
    open; until then, and for every frame the parser does not take, Autobahn parses as usual.
    """

    #: The fast path's frame parser, once the relay is open.
    frames: FrameFeeder | None = None
    _isMessageCompressed: bool

    # -- what the class mixed into provides -------------------------------------------------

    def write_now(self, data: bytes) -> None:
        """Write Autobahn's own bytes (the 101, close frames, pings) to the transport."""
        raise NotImplementedError

    def close_transport(self, abort: bool) -> None:
        """Close the transport once what is written is sent (``abort``: a peer at fault)."""
        raise NotImplementedError

    # -- bytes in ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """While relaying, a read goes straight to the frame parser (Autobahn's buffer empty,
        no frame of Autobahn's begun); anything else takes the usual way in."""
        frames = self.frames
        if (
            frames is not None
            and not self.data
            and self.current_frame is None
            and (self.state == _OPEN or frames.frame_left)
        ):
            rest = frames.feed(data, self.inside_message)
            if rest is not None:
                self._autobahn_parses(rest)
            return
        super().dataReceived(data)

    def websocket_data(self, data: bytes) -> None:
        """Autobahn's own entry point: its Twisted ``dataReceived`` only adds a debug line
        whose arguments it builds on every read."""
        self._dataReceived(data)

    def processData(self) -> bool:
        """Autobahn's parser, called while its buffer holds bytes: the fast path's parser takes
        them unless a frame of Autobahn's is under way or the connection is closing."""
        frames = self.frames
        if frames is None or self.current_frame is not None:
            return bool(super().processData())
        if not frames.frame_left and self.state != _OPEN:
            self.data = frames.take_held() + self.data
            return bool(super().processData())
        rest = frames.feed(self.data, self.inside_message)
        if rest is None:
            self.data = b""
            return False
        self.data = rest
        return bool(super().processData())

    def _autobahn_parses(self, rest: bytes) -> None:
        """The frame at the start of ``rest`` is Autobahn's; what follows is parsed as usual."""
        self.data = rest
        if super().processData():
            self.consumeData()

    # -- what the frame parser reports (FrameEvents) ------------------------------------------

    def message_begun(self) -> None:
        """What Autobahn's own frame handling expects once a binary message has begun."""
        self.inside_message = True
        self._isMessageCompressed = False
        self.utf8validateIncomingCurrentMessage = False
        self.message_is_binary = True
        self.message_data: list[bytes] = []
        self.message_data_total_length = 0

    def frame_ended(self, fin: bool) -> bool:
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            # Data from the browser answers for it as a pong would (as Autobahn does).
            self._cancelAutoPingTimeoutCall()
        if fin:
            self.inside_message = False
        return self.state == _OPEN

    def message_too_big(self, size: int, limit: int) -> None:
        self.wasMaxMessagePayloadSizeExceeded = True
        self._max_message_size_exceeded(
            size, limit,
            f"received WebSocket message size {size} exceeds payload limit of {limit} octets",
        )

    # -- bytes out, and the connection's end -------------------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's own writes (the 101, close frames, pings) go out at once too, not a
        reactor turn later: the 101 is on the path every new connection waits for."""
        if sync or chopsize:
            super().sendData(data, sync, chopsize)  # never used here: fails
            return
        self.write_now(data)

    def _closeConnection(self, abort: bool = False) -> None:
        self.close_transport(abort)

    def _connectionMade(self) -> None:
        with lazy_pformat():
            super()._connectionMade()
        # Neither is ever used here (no text is accepted, nothing is sent chopped or synced);
        # together they are about 1 KB a connection.
        self.send_queue = cast(Any, _NO_SEND_QUEUE)
        self.utf8validator = cast(Any, None)

    def forget_handshake(self) -> None:
        """The request is parsed and answered; what Autobahn kept of it is ~1.5 KB a relay."""
        self.http_request_data = b""
        self.http_response_data = ""
        self.http_headers: dict[str, str] = {}
        self.http_status_line = self.http_request_uri = self.http_request_path = ""
        self.http_request_host = self._wskey = ""
        self.http_request_params: dict[str, list[str]] = {}
        self.websocket_protocols: list[str] = []
        self.websocket_extensions: list[Any] = []


# -- Relays moved to another process (processes/upgrade.py) ----------------------------------

def autobahn_position(protocol: WebSocketProtocol) -> tuple[bool, bool, bytes]:
    """Where Autobahn's reader stands on an open connection: (between frames, inside a
    message, the bytes it has read and not parsed).  Its ``current_frame``, ``inside_message``
    and ``data``: a connection is moved only between frames, so that the new process's
    parser starts where this one stops."""
    return protocol.current_frame is None, bool(protocol.inside_message), bytes(protocol.data)


def open_adopted(protocol: Any, transport: Any, subprotocol: str | None, server: bool) -> None:
    """Make ``protocol`` an open WebSocket connection on ``transport`` without a handshake:
    the connection was opened by another process, which moved it here.

    What Autobahn's ``connectionMade`` and a successful opening handshake leave (its
    ``_connectionMade`` of the base class, which a client would follow with a new handshake,
    then the open state and the auto-ping timer), and nothing of the handshake itself.
    """
    protocol.transport = transport
    protocol.connected = 1
    protocol._transport_details = create_transport_details(transport, server)
    protocol._transport_details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
    protocol.peer = protocol._transport_details.peer
    if server:
        protocol._connectionMade()  # the server's: the base's, and a count in the factory
    else:
        WebSocketProtocol._connectionMade(protocol)  # the client's would send a handshake
    protocol.websocket_version = 13
    protocol.websocket_protocol_in_use = subprotocol
    protocol.websocket_extensions_in_use = []
    protocol.state = _OPEN
    protocol.inside_message = False
    protocol.current_frame = None
    if protocol.autoPingInterval:
        protocol.autoPingPendingCall = protocol.factory._batched_timer.call_later(
            protocol.autoPingInterval, protocol._sendAutoPing
        )
    cast(Any, txaio).resolve(protocol.is_open, None)
