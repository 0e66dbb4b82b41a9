"""The proxy's RFB greeting to the browser, against scripted browsers: every version, the one
security type it offers (None), every way a browser can break it, the bytes cut anywhere.

A script is what the browser sends (``Browser``) and what the proxy must answer at that point
(``Us``), and how it ends; ClientInit and what follows it must come out as ``Greeted``'s
leftover, whole, whatever the cuts.
"""

from __future__ import annotations

import itertools
import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_novnc.errors import Refusal
from twisted_novnc.vnc.browser_greeting import Action, BrowserGreeting, Greeted
from twisted_novnc.vnc.vm_login import Failed, Send

#: ClientInit (shared) and the browser's first messages after it (SetEncodings, a request).
CLIENT_INIT = b"\x01" + b"\x02\x00\x00\x01\x00\x00\x00\x00" + b"\x03\x00" + bytes(8)


@attrs.frozen
class Browser:
    """Bytes the browser sends."""

    data: bytes


@attrs.frozen
class Us:
    """Bytes the proxy must send at this point."""

    data: bytes


def version(text: str) -> bytes:
    return f"RFB {text}\n".encode()


def u32(*values: int) -> bytes:
    return struct.pack(f"!{len(values)}I", *values)


NOT_OFFERED = u32(1, 25) + b"security type not offered"


@attrs.frozen
class Case:
    """One scripted browser and the action that ends its greeting."""

    name: str
    steps: tuple[Browser | Us, ...]
    end: Greeted | Failed
    #: What the browser sends after its security choice (Greeted's leftover), or after the
    #: byte that fails the greeting (ignored).
    after: bytes = b""

    def sent(self) -> bytes:
        return b"".join(step.data for step in self.steps if isinstance(step, Browser)) + self.after

    def expected(self) -> list[tuple[int, Action]]:
        """Each action with the count of the browser's bytes that must prompt it."""
        offset, actions = 0, []
        for step in self.steps:
            if isinstance(step, Browser):
                offset += len(step.data)
            else:
                actions.append((offset, Send(step.data)))
        end = attrs.evolve(self.end, leftover=self.after) if isinstance(
            self.end, Greeted) else self.end
        return [*actions, (offset, end)]


CASES = [
    Case("3.3", (Browser(version("003.003")), Us(u32(1))), Greeted("3.3", b""),
         after=CLIENT_INIT),
    Case("3.5 is 3.3", (Browser(version("003.005")), Us(u32(1))), Greeted("3.3", b""),
         after=CLIENT_INIT),
    Case("3.3 with nothing after", (Browser(version("003.003")), Us(u32(1))),
         Greeted("3.3", b"")),
    Case("3.7, no SecurityResult", (Browser(version("003.007")), Us(b"\x01\x01"),
                                    Browser(b"\x01")),
         Greeted("3.7", b""), after=CLIENT_INIT),
    Case("3.8", (Browser(version("003.008")), Us(b"\x01\x01"), Browser(b"\x01"), Us(u32(0))),
         Greeted("3.8", b""), after=CLIENT_INIT),
    Case("3.8 with nothing after", (Browser(version("003.008")), Us(b"\x01\x01"),
                                    Browser(b"\x01"), Us(u32(0))),
         Greeted("3.8", b"")),
    Case("Apple 3.889 is 3.8", (Browser(version("003.889")), Us(b"\x01\x01"), Browser(b"\x01"),
                                Us(u32(0))),
         Greeted("3.8", b""), after=CLIENT_INIT),
    Case("4.001 is 3.8", (Browser(version("004.001")), Us(b"\x01\x01"), Browser(b"\x01"),
                          Us(u32(0))),
         Greeted("3.8", b""), after=CLIENT_INIT),
    Case("HTTP instead of RFB", (Browser(b"G"),),
         Failed(Refusal.BAD_RFB, "not an RFB version line: b'G'")),
    Case("short version", (Browser(b"RFB 3."),),
         Failed(Refusal.BAD_RFB, "not an RFB version line: b'RFB 3.'"), after=b"8\n"),
    Case("version 2.0", (Browser(version("002.000")),),
         Failed(Refusal.BAD_RFB, "RFB version 2.0 is too old")),
    Case("3.8 VncAuth chosen", (Browser(version("003.008")), Us(b"\x01\x01"), Browser(b"\x02"),
                                Us(NOT_OFFERED)),
         Failed(Refusal.BAD_RFB, "the browser chose security type 2, not None"),
         after=CLIENT_INIT),
    Case("3.8 type 0 chosen", (Browser(version("003.008")), Us(b"\x01\x01"), Browser(b"\x00"),
                               Us(NOT_OFFERED)),
         Failed(Refusal.BAD_RFB, "the browser chose security type 0, not None")),
    Case("3.7 VeNCrypt chosen", (Browser(version("003.007")), Us(b"\x01\x01"), Browser(b"\x13")),
         Failed(Refusal.BAD_RFB, "the browser chose security type 19, not None"),
         after=CLIENT_INIT),
]


def play(case: Case, cuts: set[int] | range = range(0)) -> list[tuple[int, Action]]:
    """Feed the case's browser bytes to a fresh greeting, cut at ``cuts``; each action with the
    bytes fed up to it.  Bytes not fed after Greeted are added to its leftover."""
    greeting = BrowserGreeting()
    assert greeting.start() == b"RFB 003.008\n"
    sent = case.sent()
    bounds = sorted({0, len(sent)} | {cut for cut in cuts if 0 < cut < len(sent)})
    chunks = [sent[a:b] for a, b in itertools.pairwise(bounds)]
    played: list[tuple[int, Action]] = []
    fed = 0
    for position, chunk in enumerate(chunks):
        fed += len(chunk)
        for action in greeting.receive(chunk):
            if isinstance(action, Greeted):
                rest = b"".join(chunks[position + 1:])
                played.append((fed - len(action.leftover),
                               attrs.evolve(action, leftover=action.leftover + rest)))
            else:
                played.append((fed, action))
        if played and isinstance(played[-1][1], Greeted | Failed):
            break
    return played


def actions_of(played: list[tuple[int, Action]]) -> list[Action]:
    return [action for _, action in played]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_whole(case):
    """The browser's bytes in one read give the script's actions."""
    assert actions_of(play(case)) == actions_of(case.expected())


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_byte_by_byte(case):
    """One byte at a time, each action comes exactly with the byte that prompts it."""
    assert play(case, range(len(case.sent()))) == case.expected()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_split(case):
    """Cut in two at every offset, the actions are those of the script."""
    expected = actions_of(case.expected())
    for cut in range(1, len(case.sent())):
        assert actions_of(play(case, {cut})) == expected, cut


@given(st.data())
def test_random_cuts(data):
    """Cut anywhere, any number of times, the actions are those of the script."""
    case = data.draw(st.sampled_from(CASES))
    cuts = data.draw(st.sets(st.integers(1, max(1, len(case.sent()) - 1))))
    assert actions_of(play(case, cuts)) == actions_of(case.expected())


def test_receive_after_greeted_raises():
    """After Greeted the browser's bytes are the relay's: handing them here is a driver's bug."""
    greeting = BrowserGreeting()
    assert greeting.receive(version("003.003"))[-1] == Greeted("3.3", b"")
    with pytest.raises(RuntimeError, match="relay"):
        greeting.receive(CLIENT_INIT)


def test_failed_then_quiet():
    """After a failure, bytes still arriving from the browser change nothing."""
    greeting = BrowserGreeting()
    assert isinstance(greeting.receive(b"GET / HTTP/1.1\r\n")[-1], Failed)
    assert greeting.receive(version("003.008")) == []


def test_start_is_the_same_every_time():
    """start() is the proxy's version line, whenever it is asked."""
    greeting = BrowserGreeting()
    assert greeting.start() == greeting.start() == b"RFB 003.008\n"
