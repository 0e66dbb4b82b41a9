"""The fast path's frame parser on its own: bytes in, unmasked chunks and hand-offs out.

BrowserFrames knows no socket and no Autobahn, so it is driven here the way the protocol's
mixin drives it: fed reads cut anywhere, with a stand-in for Autobahn's parser that takes each
frame the fast path hands over (a control frame) and gives the rest back.
"""

from __future__ import annotations

import itertools
import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_frames import client_frame

from twisted_novnc.front.fastpath import BrowserFrames
from twisted_novnc.front.frames import parse_client_header

MASK = b"\x11\x22\x33\x44"


@attrs.define
class Events:
    """Records what the parser reports, and keeps the message state as the mixin keeps
    Autobahn's; ``open`` is what ``frame_ended`` answers."""

    begun: int = 0
    ended: list[bool] = attrs.field(factory=list)
    too_big: list[tuple[int, int]] = attrs.field(factory=list)
    open: bool = True
    inside_message: bool = False

    def message_begun(self) -> None:
        self.begun += 1
        self.inside_message = True

    def frame_ended(self, fin: bool) -> bool:
        self.ended.append(fin)
        if fin:
            self.inside_message = False
        return self.open

    def message_too_big(self, size: int, limit: int) -> None:
        self.too_big.append((size, limit))


@attrs.define
class Driver:
    """The parser, its events and chunks, and Autobahn's part as the mixin plays it: a frame
    handed over is read whole (when it has arrived) and the bytes after it fed back."""

    limit: int = 0
    events: Events = attrs.field(factory=Events)
    chunks: list[bytearray] = attrs.field(factory=list)
    autobahn: bytes = b""
    control: list[tuple[int, bytes]] = attrs.field(factory=list)
    frames: BrowserFrames = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.frames = BrowserFrames(self.chunks.append, self.events, self.limit)

    def read(self, data: bytes) -> None:
        if not self.autobahn:
            rest = self.frames.feed(data, self.events.inside_message)
            if rest is None:
                return
            data = rest
        self.autobahn += data
        while self.autobahn:
            header = parse_client_header(self.autobahn)
            if header is None or len(self.autobahn) < header.size + header.length:
                return  # Autobahn waits for the rest of its frame
            end = header.size + header.length
            payload = bytes(
                b ^ header.mask[i % 4] for i, b in enumerate(self.autobahn[header.size : end])
            )
            self.control.append((header.opcode, payload))
            rest = self.frames.feed(self.autobahn[end:], self.events.inside_message)
            self.autobahn = rest or b""

    @property
    def relayed(self) -> bytes:
        return b"".join(self.chunks)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` in pieces at the given offsets, as reads from a socket."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


messages = st.lists(
    st.tuples(st.binary(max_size=300), st.integers(1, 3), st.booleans()), min_size=1, max_size=6
)


@given(messages, st.lists(st.integers(0, 3000), max_size=25), st.binary(min_size=4, max_size=4))
def test_binary_messages_come_out_whole_and_in_order_whatever_the_cuts(batch, cuts, mask):
    """Binary messages, whole or in fragments with pings between them, come out exactly and in
    order however the reads cut them; each ping goes to Autobahn's parser, each fragment
    and message is reported once."""
    wire = b""
    pings = []
    for n, (payload, parts, ping) in enumerate(batch):
        size = -(-len(payload) // parts) if payload else 0
        pieces = [payload[i : i + size] for i in range(0, len(payload), size)] if size else [b""]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            wire += client_frame(piece, opcode=2 if i == 0 else 0, fin=last, mask=mask)
            if ping and not last:
                wire += client_frame(b"p%d" % n, opcode=9, mask=mask)
                pings.append((9, b"p%d" % n))
    driver = Driver()
    for piece in cut(wire, cuts):
        driver.read(piece)
    assert driver.relayed == b"".join(payload for payload, _, _ in batch)
    assert driver.events.begun == len(batch)
    assert driver.events.ended.count(True) == len(batch)
    assert driver.control == pings
    assert driver.autobahn == b"" and driver.frames.frame_left == 0


def test_one_chunk_per_frame_in_a_read_and_per_read_across_a_frame():
    """The relay gets one call per frame in a read, and one per read of a frame cut across
    reads: nothing more is added per message."""
    driver = Driver()
    driver.read(client_frame(b"a" * 10) + client_frame(b"b" * 20) + client_frame(b"c" * 30))
    assert [bytes(c) for c in driver.chunks] == [b"a" * 10, b"b" * 20, b"c" * 30]
    assert driver.events.ended == [True, True, True] and driver.events.begun == 3
    driver.chunks.clear()
    wire = client_frame(b"x" * 3000)
    for piece in cut(wire, [500, 1500]):
        driver.read(piece)
    assert [len(c) for c in driver.chunks] == [500 - 8, 1000, 3000 - 1492]
    assert all(type(c) is bytearray for c in driver.chunks)


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(b"hello", opcode=1),  # text: Autobahn's, and refused there
        client_frame(b"x", opcode=9),  # ping
        client_frame(struct.pack("!H", 1000), opcode=8),  # close
        client_frame(b"x", masked=False),  # unmasked client frame
        client_frame(b"x", rsv=1),  # no extension negotiated
        client_frame(b"x", opcode=0),  # continuation outside a message
        client_frame(b"x", opcode=3),  # reserved opcode
        client_frame(b"x" * 10, long_form=True),  # non-minimal length
    ],
    ids=["text", "ping", "close", "unmasked", "rsv", "stray-continuation", "reserved", "long"],
)
def test_frames_it_does_not_take_are_handed_over_untouched(frame):
    """Anything but a well-formed masked binary frame is handed over from its first byte,
    with what follows it, and nothing of it is relayed or reported."""
    frames = BrowserFrames(pytest.fail, Events(), 0)
    after = client_frame(b"next")
    assert frames.feed(frame + after, inside_message=False) == frame + after
    assert frames.frame_left == 0


def test_a_text_frame_is_handed_over_at_its_header():
    """A text frame goes to Autobahn (whose onMessageBegin refuses it with 1003) as soon as
    its header is complete, before any of its payload: the parser holds at most a header."""
    frames = BrowserFrames(pytest.fail, Events(), 1024 * 1024)
    header = client_frame(b"t" * 70000, opcode=1)[: 2 + 8 + 4]
    assert frames.feed(header[:5], inside_message=False) is None
    assert frames.feed(header[5:], inside_message=False) == header
    assert frames.frame_left == 0 and frames.take_held() == b""


def test_relayed_frames_before_a_hand_over_are_delivered():
    """Frames before the first one it does not take are relayed; the rest is handed over."""
    driver = Driver()
    text = client_frame(b"t", opcode=1)
    rest = driver.frames.feed(client_frame(b"ab") + text, inside_message=False)
    assert rest == text and driver.relayed == b"ab"


def test_a_binary_frame_inside_autobahns_message_is_handed_over():
    """While Autobahn assembles a message (a fragmented text), a new binary frame is its to
    refuse, and a continuation is its to read."""
    frames = BrowserFrames(pytest.fail, Events(), 0)
    binary, continuation = client_frame(b"b"), client_frame(b"c", opcode=0)
    assert frames.feed(binary, inside_message=True) == binary
    assert frames.feed(continuation, inside_message=True) == continuation


def test_a_new_binary_frame_inside_a_fragmented_one_is_handed_over():
    """A binary frame before the fragmented binary message ends goes to Autobahn (which
    fails the connection with 1002), after the fragment already relayed."""
    driver = Driver()
    second = client_frame(b"cd")
    assert driver.frames.feed(client_frame(b"ab", fin=False) + second, False) == second
    assert driver.relayed == b"ab" and driver.events.ended == [False]


def test_a_message_over_the_limit_is_reported_once_and_nothing_more_is_read():
    """The size counts across fragments; past the limit the parser reports it, relays nothing
    of the frame that broke it, and takes the rest of the read with it."""
    driver = Driver(limit=100)
    wire = client_frame(b"a" * 60, fin=False) + client_frame(b"b" * 60, opcode=0)
    assert driver.frames.feed(wire + client_frame(b"c"), inside_message=False) is None
    assert driver.relayed == b"a" * 60
    assert driver.events.too_big == [(120, 100)]


def test_a_message_at_the_limit_passes():
    """A message of exactly the limit is relayed."""
    driver = Driver(limit=100)
    driver.read(client_frame(b"a" * 100))
    assert driver.relayed == b"a" * 100 and driver.events.too_big == []


def test_empty_frames_end_at_once():
    """An empty binary frame begins and ends a message and relays nothing."""
    driver = Driver()
    driver.read(client_frame(b""))
    assert driver.chunks == [] and driver.events.begun == 1 and driver.events.ended == [True]


def test_a_header_cut_by_a_read_is_held_until_the_rest_arrives():
    """A header split across reads is kept, not handed over; ``take_held`` gives it up when
    the protocol stops feeding the parser."""
    frames = BrowserFrames(pytest.fail, Events(), 0)
    frame = client_frame(b"x" * 200)
    assert frames.feed(frame[:3], inside_message=False) is None
    assert frames.take_held() == frame[:3]
    assert frames.take_held() == b""
    chunks: list[bytearray] = []
    frames = BrowserFrames(chunks.append, Events(), 0)
    for n in range(1, len(frame) + 1):
        assert frames.feed(frame[n - 1 : n], inside_message=False) is None
    assert b"".join(chunks) == b"x" * 200


def test_closing_hands_over_after_the_frame_under_way():
    """Once ``frame_ended`` says the connection is closing, the frame under way is still read
    to its end (its payload is not Autobahn's to parse), then everything after is handed
    over."""
    driver = Driver()
    frame = client_frame(b"x" * 100)
    assert driver.frames.feed(frame[:50], inside_message=False) is None
    driver.events.open = False
    after = client_frame(b"y")
    assert driver.frames.feed(frame[50:] + after, inside_message=True) == after
    assert driver.relayed == b"x" * 100


def test_unmasked_with_the_frame_mask_across_chunks():
    """Each frame has its own mask, and a chunk boundary inside a frame keeps the mask's
    phase."""
    driver = Driver()
    wire = client_frame(b"0123456789", mask=b"\x01\x02\x03\x04") + client_frame(
        b"abcdefghij", mask=b"\xf0\x0f\xaa\x55"
    )
    for piece in cut(wire, [7, 9, 21, 23]):
        driver.read(piece)
    assert driver.relayed == b"0123456789abcdefghij"
