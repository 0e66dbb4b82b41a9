"""Browser frames relayed, and the server's frames built, by the protocol in both modes.

The protocol runs over a StringTransport with its session ready in memory and a fake VM, so
the bytes the browser sends can be cut anywhere: what reaches the VM must be exactly the
binary payloads, in order, whatever the cuts; control frames interleaved with fragments must
still be answered; and everything the fast path does not take must behave as Autobahn does.
Each test runs on the fast path (frames relayed chunk by chunk) and on the stock path
(Autobahn's ``onMessage`` and ``sendMessage``): the browser and the VM cannot tell them apart.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_novnc.config import NovncSettings
from twisted_novnc.database.readiness import ReadinessGate
from twisted_novnc.front.frames import (
    Unmasker,
    minimal_length,
    nvx_available,
    parse_client_header,
    server_frame_header,
    xor_python,
)
from twisted_novnc.front.protocol import NoVNCServerFactory
from twisted_novnc.relay.targets import TargetPolicy
from twisted_novnc.session import SessionRow
from twisted_novnc.testing import MemoryPeer, MemorySessionSource

SID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"
HANDSHAKE = (
    f"GET /websockify/{SID} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
).encode()


def client_frame(
    payload: bytes, opcode: int = 2, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04",
    rsv: int = 0, masked: bool = True, long_form: bool = False,
) -> bytes:
    """A client frame as a browser sends it (masked), optionally with a non-minimal length."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    bit = 0x80 if masked else 0
    if long_form:
        head = struct.pack("!BBQ", first, bit | 127, n)
    elif n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


#: Run a test on the fast path and on the stock path.
BOTH_MODES = pytest.mark.parametrize(
    "fast_path", [True, False], ids=["fast_path=on", "fast_path=off"]
)


def open_relay(
    fast_path: bool, max_message_size: int = 1024 * 1024, handshake: bytes = HANDSHAKE
):
    """A browser connection whose handshake is done and whose relay is open."""
    clock = Clock()
    source = MemorySessionSource()
    source.rows[SID] = SessionRow(SID, "127.0.0.1", 5900, "running")
    gate = ReadinessGate(source, clock, 5.0, frozenset({"ended"}), 5900)
    vm = MemoryPeer()
    factory = NoVNCServerFactory(
        NovncSettings(max_message_size=max_message_size, ping_interval=0), gate,
        lambda *args: succeed(vm), clock, targets=TargetPolicy.from_config("127.0.0.0/8"),
        fast_path=fast_path,
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(handshake)
    clock.advance(0)  # the gate batches its reads to the next turn
    assert protocol.state == protocol.STATE_OPEN, transport.value()
    assert protocol.relay is not None
    transport.clear()
    return protocol, transport, vm


def feed(protocol, data: bytes, cuts: list[int]) -> None:
    """Deliver ``data`` cut at the given offsets, as reads from the socket would."""
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        protocol.dataReceived(data[start:cut])
        start = cut


payloads = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=6)


cut_lists = st.lists(st.integers(min_value=0, max_value=3000), max_size=20)
masks = st.binary(min_size=4, max_size=4)


@given(payloads, cut_lists, masks)
def test_binary_payloads_reach_the_vm_whatever_the_cuts(chunks, cuts, mask):
    """Binary messages (whole or fragmented, with pings between fragments) reach the VM in
    order and exactly, however the reads cut them; each ping is answered with its pong.  Both
    paths, on every example (pytest-twisted cannot run a parametrized hypothesis test)."""
    wire = b""
    for i, chunk in enumerate(chunks):
        if i % 2:
            # fragmented: first half, a ping, then the rest as a continuation
            half = len(chunk) // 2
            wire += client_frame(chunk[:half], opcode=2, fin=False, mask=mask)
            wire += client_frame(b"p%d" % i, opcode=9, mask=mask)
            wire += client_frame(chunk[half:], opcode=0, fin=True, mask=mask)
        else:
            wire += client_frame(chunk, mask=mask)
    for fast_path in (True, False):
        protocol, transport, vm = open_relay(fast_path)
        feed(protocol, wire, cuts)
        assert vm.transport.value() == b"".join(chunks), fast_path
        pongs = transport.value()
        for i in range(1, len(chunks), 2):
            assert bytes((0x8A, len(b"p%d" % i))) + b"p%d" % i in pongs, fast_path
        assert protocol.state == protocol.STATE_OPEN


@BOTH_MODES
def test_large_frames_cross_reads(fast_path):
    """A 1 MiB frame cut into 64 KiB reads arrives whole and unmasked."""
    protocol, transport, vm = open_relay(fast_path, max_message_size=2 * 1024 * 1024)
    payload = os.urandom(1024 * 1024)
    wire = client_frame(payload, mask=b"\x9a\x01\xff\x42")
    feed(protocol, wire, list(range(65536, len(wire), 65536)))
    assert vm.transport.value() == payload


@BOTH_MODES
def test_text_frame_is_refused_with_1003(fast_path):
    """A text message goes to Autobahn and ends the relay with 1003, nothing relayed."""
    protocol, transport, vm = open_relay(fast_path)
    protocol.dataReceived(client_frame(b"hello", opcode=1))
    assert vm.transport.value() == b""
    close = transport.value()
    assert close[0] == 0x88 and struct.unpack("!H", close[2:4])[0] == 1003


@BOTH_MODES
@pytest.mark.parametrize(
    "frame, code",
    [
        (client_frame(b"x", masked=False), 1002),  # unmasked client frame
        (client_frame(b"x", rsv=1), 1002),  # no extension negotiated
        (client_frame(b"x", opcode=0), 1002),  # continuation outside a message
        (client_frame(b"x", opcode=3), 1002),  # reserved opcode
        (client_frame(b"x" * 10, long_form=True), 1002),  # non-minimal length
    ],
)
def test_frames_autobahn_refuses_are_still_refused(fast_path, frame, code):
    """What the fast path does not take is Autobahn's: protocol errors close with 1002."""
    protocol, transport, vm = open_relay(fast_path)
    protocol.dataReceived(frame)
    assert vm.transport.value() == b""
    close = transport.value()
    assert close[0] == 0x88 and struct.unpack("!H", close[2:4])[0] == code


@BOTH_MODES
def test_compression_offer_is_declined_and_the_relay_opens(fast_path):
    """Browsers offer permessage-deflate; the 101 declines it (no extension) and the relay
    opens — the options the factory sets, functions included, reach every connection."""
    offer = HANDSHAKE.replace(
        b"\r\n\r\n",
        b"\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    )
    protocol, transport, vm = open_relay(fast_path, handshake=offer)
    assert protocol.websocket_extensions_in_use == []
    protocol.dataReceived(client_frame(b"ok"))
    assert vm.transport.value() == b"ok"


@BOTH_MODES
def test_binary_frame_inside_a_fragmented_message_is_a_protocol_error(fast_path):
    """A new binary frame before the fragmented one finished is refused (1002); the fast
    path has relayed the first fragment, the stock path nothing of the unfinished message."""
    protocol, transport, vm = open_relay(fast_path)
    protocol.dataReceived(client_frame(b"ab", fin=False) + client_frame(b"cd"))
    assert vm.transport.value() == (b"ab" if fast_path else b"")
    close = transport.value()
    assert struct.unpack("!H", close[2:4])[0] == 1002


@BOTH_MODES
def test_message_over_the_limit_is_refused_with_1009_and_not_relayed(fast_path):
    """A message above max_message_size (across fragments too) closes with 1009; nothing of
    the fragment that breaks it is relayed (the stock path relays only whole messages)."""
    protocol, transport, vm = open_relay(fast_path, max_message_size=100)
    protocol.dataReceived(client_frame(b"a" * 60, fin=False) + client_frame(b"b" * 60, opcode=0))
    assert vm.transport.value() == (b"a" * 60 if fast_path else b"")
    close = transport.value()
    assert struct.unpack("!H", close[2:4])[0] == 1009


@BOTH_MODES
def test_close_frame_is_answered_and_the_vm_let_go(fast_path):
    """The browser's close frame is Autobahn's to answer; the VM side is closed."""
    protocol, transport, vm = open_relay(fast_path)
    protocol.dataReceived(client_frame(b"ab") + client_frame(struct.pack("!H", 1000), opcode=8))
    assert vm.transport.value() == b"ab"
    assert transport.value().startswith(b"\x88\x02\x03\xe8")
    assert transport.disconnecting  # the server drops TCP after the close handshake
    protocol.connectionLost(Failure(ConnectionDone()))
    assert vm.closed == [(1000, "browser closed")]


@BOTH_MODES
def test_vm_bytes_go_out_as_one_binary_frame_each(fast_path):
    """What the VM sends reaches the browser as unmasked binary frames, in order."""
    protocol, transport, vm = open_relay(fast_path)
    for size in (1, 125, 126, 65535, 65536, 200000):
        protocol.relay.from_vm(b"v" * size)
        out = transport.value()
        transport.clear()
        assert out == server_frame_header(size) + b"v" * size


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 2**32])
def test_server_frame_header_round_trips(size):
    """Headers we build parse back to the same length, FIN set, binary, unmasked."""
    header = parse_client_header(server_frame_header(size))
    assert header is not None
    assert (header.fin, header.opcode, header.masked, header.length) == (True, 2, False, size)
    assert minimal_length(header)


def test_incomplete_headers_are_none():
    """A header cut anywhere is not parsed until it is whole."""
    frame = client_frame(b"x" * 70000)
    for n in range(14):
        assert parse_client_header(frame[:n]) is None
    assert parse_client_header(frame[:14]).length == 70000


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8), masks)
def test_unmasking_in_chunks_equals_unmasking_whole(data, cuts, mask):
    """Unmasking chunk by chunk gives the same bytes as the whole payload at once, and the
    pure-Python fallback agrees with the native masker."""
    whole = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    unmasker = Unmasker(mask)
    out = bytearray()
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        out += unmasker.unmask(data[start:cut])
        start = cut
    assert bytes(out) == whole
    assert bytes(xor_python(bytearray(data[3:]), mask, 3)) == whole[3:]


def test_nvx_is_available_here():
    """The native masker is what the relay uses on this install."""
    assert nvx_available()
