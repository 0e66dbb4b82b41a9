"""Canaries for the Autobahn internals the fast path uses (``twisted_novnc/_compat/autobahn.py``).

Each fails with the internal, the installed Autobahn version and the way out, so that an
Autobahn release that renames or reshapes one is named at once, rather than found as reordered
bytes or a lost ping.  The protocol tests (tests/test_frames.py, tests/test_front.py) check
the behaviour itself, on the fast path and on the stock one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import canary
import pytest
from autobahn.twisted.websocket import WebSocketAdapterProtocol, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.protocol import WebSocketServerProtocol as Generic
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twisted_novnc._compat.autobahn import AutobahnFastPath, autobahn_position, open_adopted
from twisted_novnc.config import NovncSettings
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.front.protocol import FastNoVNCServerProtocol, NoVNCServerFactory
from twisted_novnc.testing import MemorySessionSource


def broken(what: str) -> str:
    return canary.broken("autobahn", what, "the fast path (twisted_novnc/_compat/autobahn.py)")


def source(function: Callable[..., object]) -> str:
    return inspect.getsource(function)


def parameters(function: Callable[..., object]) -> list[str]:
    return list(inspect.signature(function).parameters)


def connected() -> WebSocketServerProtocol:
    """A fast-path protocol right after Autobahn's _connectionMade."""
    clock = Clock()
    source_ = MemorySessionSource()
    gate = ReadinessGate(source_, clock, 5.0, frozenset(), 5900)
    factory = NoVNCServerFactory(NovncSettings(), gate, lambda *a: succeed(None), clock)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    return protocol


CANARIES: list[tuple[str, Callable[[], bool]]] = [
    (
        "WebSocketProtocol.processData() parses frames from self.data, and consumeData() calls"
        " it while it returns True",
        lambda: parameters(WebSocketProtocol.processData) == ["self"]
        and "while self.processData()" in source(WebSocketProtocol.consumeData)
        and "self.current_frame" in source(WebSocketProtocol.processData),
    ),
    (
        "WebSocketProtocol._dataReceived(data) appends to self.data and calls consumeData()",
        lambda: parameters(WebSocketProtocol._dataReceived) == ["self", "data"]
        and "self.data += data" in source(WebSocketProtocol._dataReceived)
        and "self.consumeData()" in source(WebSocketProtocol._dataReceived),
    ),
    (
        "the Twisted adapter's dataReceived only calls _dataReceived",
        lambda: "self._dataReceived(data)" in source(WebSocketAdapterProtocol.dataReceived),
    ),
    (
        "WebSocketProtocol.sendData(data, sync, chopsize) writes everything Autobahn sends,"
        " queueing only in send_queue",
        lambda: parameters(WebSocketProtocol.sendData) == ["self", "data", "sync", "chopsize"]
        and "len(self.send_queue)" in source(WebSocketProtocol.sendData)
        and "self.sendData(" in source(WebSocketProtocol.sendFrame),
    ),
    (
        "dropConnection(abort) closes through the adapter's _closeConnection(abort)",
        lambda: "self._closeConnection(abort)" in source(WebSocketProtocol.dropConnection)
        and parameters(WebSocketAdapterProtocol._closeConnection) == ["self", "abort"],
    ),
    (
        "_connectionMade() sets up the state the fast path reads (data, send_queue,"
        " utf8validator, the ping options) and formats the options with pformat",
        lambda: all(
            hasattr(connected(), name)
            for name in ("data", "send_queue", "utf8validator", "autoPingTimeoutCall",
                         "autoPingRestartOnAnyTraffic")
        )
        and "pformat(" in source(WebSocketProtocol._connectionMade),
    ),
    (
        "the server's handshake starts the frame state: current_frame and inside_message",
        lambda: all(
            f"self.{name} = " in inspect.getsource(Generic)
            for name in ("current_frame", "inside_message")
        ),
    ),
    (
        "onFrameBegin() keeps a message's state in inside_message, _isMessageCompressed,"
        " utf8validateIncomingCurrentMessage, and onMessageBegin() in message_is_binary,"
        " message_data and message_data_total_length",
        lambda: all(
            f"self.{name}" in source(WebSocketProtocol.onFrameBegin)
            for name in ("inside_message", "_isMessageCompressed",
                         "utf8validateIncomingCurrentMessage")
        )
        and all(
            f"self.{name}" in source(WebSocketProtocol.onMessageBegin)
            for name in ("message_is_binary", "message_data", "message_data_total_length")
        ),
    ),
    (
        "_max_message_size_exceeded(msg_size, max_msg_size, reason) fails the connection"
        " with 1009",
        lambda: parameters(WebSocketProtocol._max_message_size_exceeded)
        == ["self", "msg_size", "max_msg_size", "reason"]
        and "CLOSE_STATUS_CODE_MESSAGE_TOO_BIG"
        in source(WebSocketProtocol._max_message_size_exceeded),
    ),
    (
        "_cancelAutoPingTimeoutCall() is how data from the peer answers a ping",
        lambda: "self._cancelAutoPingTimeoutCall()" in source(WebSocketProtocol.processData)
        or "self._cancelAutoPingTimeoutCall()" in source(WebSocketProtocol.onFrameData)
        or "self._cancelAutoPingTimeoutCall()" in inspect.getsource(WebSocketProtocol),
    ),
    (
        "the server handshake keeps _wskey and the request's http_* attributes",
        lambda: all(
            f"self.{name}" in source(Generic.processHandshake)
            for name in ("_wskey", "http_request_uri", "http_request_path", "http_headers",
                         "http_request_params", "http_request_host")
        ),
    ),
]


@pytest.mark.parametrize("what, check", CANARIES, ids=[c[0][:50] for c in CANARIES])
def test_autobahn_internal_is_as_the_fast_path_expects(what, check):
    """Each Autobahn internal the fast path's mixin uses is still there, in the same shape."""
    assert check(), broken(what)


#: The Autobahn methods the mixin overrides.
OVERRIDES = {"dataReceived", "processData", "sendData", "_closeConnection", "_connectionMade"}


def test_the_mixin_overrides_exist_in_autobahn():
    """Every Autobahn method the mixin overrides still exists in Autobahn's classes (an
    override of a method Autobahn no longer has would silently do nothing), and the mixin
    overrides no other."""
    own = {
        name for name, value in vars(AutobahnFastPath).items()
        if callable(value) and not (name.startswith("__") and name.endswith("__"))
    }
    for name in OVERRIDES:
        assert name in own
        assert hasattr(WebSocketServerProtocol, name), broken(f"{name} is gone")
    others = {name for name in own - OVERRIDES if hasattr(WebSocketServerProtocol, name)}
    assert not others, f"also overrides {others}: list them in OVERRIDES and give a canary"


def test_the_fast_protocol_puts_the_mixin_first():
    """The mixin comes before our protocol and Autobahn's in the fast class's MRO, so its
    overrides are the ones Autobahn calls."""
    mro = FastNoVNCServerProtocol.__mro__
    assert mro.index(AutobahnFastPath) < mro.index(WebSocketServerProtocol)


MOVES = "moving relays in an upgrade (twisted_novnc._compat.autobahn)"
MOVES_OFF = "relays then stay in the old generation and drain instead of moving"


def test_reader_position_is_current_frame_inside_message_and_data():
    """autobahn_position reads where the reader stands from current_frame, inside_message and
    data, which the frame parser keeps."""
    protocol = connected()
    protocol.current_frame, protocol.inside_message, protocol.data = None, False, b"\x82"
    assert autobahn_position(protocol) == (True, False, b"\x82")
    assert all(
        f"self.{name}" in source(WebSocketProtocol.processData)
        for name in ("current_frame", "data")
    ), canary.broken("autobahn", "processData() no longer keeps current_frame and data", MOVES,
                     MOVES_OFF)


def test_adopted_connection_is_open_without_a_handshake():
    """open_adopted leaves a protocol open on a transport, its auto-ping armed and is_open
    fired, with nothing written (no handshake), through _connectionMade, the open state and
    _sendAutoPing as a successful handshake leaves them."""
    clock = Clock()
    gate = ReadinessGate(MemorySessionSource(), clock, 5.0, frozenset(), 5900)
    factory = NoVNCServerFactory(
        NovncSettings(ping_interval=5), gate, lambda *a: succeed(None), clock
    )
    protocol = factory.protocol()
    protocol.factory = factory
    transport = StringTransport()
    open_adopted(protocol, transport, "binary", server=True)
    assert protocol.state == WebSocketProtocol.STATE_OPEN, canary.broken(
        "autobahn", "the open state is no longer STATE_OPEN", MOVES, MOVES_OFF
    )
    assert protocol.websocket_protocol_in_use == "binary"
    assert protocol.current_frame is None and protocol.inside_message is False
    assert protocol.autoPingPendingCall is not None, canary.broken(
        "autobahn", "autoPingPendingCall/_sendAutoPing no longer start the keep-alive", MOVES,
        MOVES_OFF,
    )
    assert protocol.is_open.called and transport.value() == b""
    protocol.sendMessage(b"x", isBinary=True)
    assert transport.value() == b"\x82\x01x"
    protocol.autoPingPendingCall.cancel()
